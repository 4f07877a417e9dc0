"""OpenAI-compatible routes: ``/v1/models``, ``/v1/completions``,
``/v1/chat/completions``.

A chat request is rendered with the model's own chat template (the same one
the DSL's roles come from), so the two never disagree. ``response_format``
(``json_object``, ``json_schema``) and SGLang's ``regex`` / ``ebnf`` /
``json_schema`` extras become grammar constraints. With ``n > 1`` and
``stream``, each choice is its own engine request (choice k seeded with
``seed + k``, as the engine does for ``n``) and their pieces are interleaved
in one event stream.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from plait.runtime.errors import RequestError
from plait.runtime.server.app import (
    SSE_DONE,
    APIError,
    ClientDisconnected,
    JSONResponse,
    sse,
    until_disconnect,
)
from plait.runtime.server.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    _OpenAISampling,
)

router = APIRouter()

# OpenAI sampling names -> plait SamplingParams names (when not None).
_PASSTHROUGH = {
    "n": "n",
    "temperature": "temperature",
    "top_p": "top_p",
    "stop": "stop",
    "seed": "seed",
    "frequency_penalty": "frequency_penalty",
    "presence_penalty": "presence_penalty",
    "top_k": "top_k",
    "min_p": "min_p",
    "min_tokens": "min_new_tokens",
    "repetition_penalty": "repetition_penalty",
    "stop_token_ids": "stop_token_ids",
    "ignore_eos": "ignore_eos",
    "skip_special_tokens": "skip_special_tokens",
    "regex": "regex",
    "ebnf": "ebnf",
    "json_schema": "json_schema",
}


# plait SamplingParams names -> the OpenAI request fields they come from.
_OPENAI_NAME = {field: name for name, field in _PASSTHROUGH.items()}


def _openai_error(e: RequestError, body: _OpenAISampling, prompt_param: str) -> APIError:
    """The engine's error, naming the request's own field (``temperature``, not
    ``sampling_params.temperature``; ``messages``, not ``input_ids``)."""
    name = e.field.removeprefix("sampling_params.")
    if name == "max_new_tokens":
        chat_max = getattr(body, "max_completion_tokens", None)
        param = "max_completion_tokens" if chat_max is not None else "max_tokens"
    elif name.startswith(("input_ids", "prompt")):
        param = prompt_param
    elif name in ("regex", "ebnf", "json_schema") and getattr(body, name) is None:
        param = "response_format"  # the constraint came from response_format
    else:
        param = _OPENAI_NAME.get(name, name)
    message = str(e)
    if message.startswith(e.field):
        message = param + message[len(e.field) :]
    return APIError(400, message, param=param)


def _engine(request: Request) -> Any:
    return request.app.state.engine


def _check_model(request: Request, model: str) -> None:
    config = request.app.state.config
    if model != config.served_model_name:
        raise APIError(
            404,
            f"model {model!r} is not served here; this server serves {config.served_model_name!r}",
            param="model",
            code="model_not_found",
            type="not_found_error",
        )


def _sampling(body: _OpenAISampling, max_new_tokens: int) -> dict[str, Any]:
    params = {"max_new_tokens": max_new_tokens}
    for name, field in _PASSTHROUGH.items():
        value = getattr(body, name)
        if value is not None:
            params[field] = value
    fmt = body.response_format
    if fmt is not None and fmt.type != "text":
        if any(k in params for k in ("regex", "ebnf", "json_schema")):
            raise APIError(
                400,
                "response_format cannot be combined with regex, ebnf or json_schema",
                param="response_format",
            )
        if fmt.type == "json_object":
            params["json_schema"] = {"type": "object"}
        else:
            if fmt.json_schema is None or fmt.json_schema.schema_ is None:
                raise APIError(
                    400,
                    "response_format.json_schema: a response_format of type json_schema needs "
                    "json_schema.schema",
                    param="response_format.json_schema",
                )
            params["json_schema"] = fmt.json_schema.schema_
    return params


def _finish_reason(meta: dict[str, Any]) -> str | None:
    reason = meta.get("finish_reason")
    return None if reason is None else reason["type"]


def _matched(meta: dict[str, Any]) -> Any:
    reason = meta.get("finish_reason") or {}
    return reason.get("matched")


def _usage(outs: list[dict], n: int) -> dict[str, Any]:
    """Token counts of results in prompt-major order, ``n`` per prompt: each prompt
    counts once however many choices it has."""
    per_prompt = [outs[i : i + n] for i in range(0, len(outs), n)]
    prompt_tokens = sum(group[0]["meta_info"]["prompt_tokens"] for group in per_prompt)
    cached = sum(max(o["meta_info"].get("cached_tokens", 0) for o in g) for g in per_prompt)
    completion = sum(o["meta_info"]["completion_tokens"] for o in outs)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


# ---- models ------------------------------------------------------------------------------


def _model_card(request: Request) -> dict[str, Any]:
    app = request.app
    return {
        "id": app.state.config.served_model_name,
        "object": "model",
        "created": int(app.state.started),
        "owned_by": "plait",
        "root": app.state.config.served_model_name,
        "max_model_len": app.state.engine.context_len,
    }


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [_model_card(request)]}


@router.get("/v1/models/{model:path}")
async def get_model(model: str, request: Request) -> dict[str, Any]:
    _check_model(request, model)
    return _model_card(request)


# ---- chat completions ----------------------------------------------------------------------


def _message_text(i: int, m: ChatMessage) -> str:
    if m.content is None or isinstance(m.content, str):
        return m.content or ""
    texts = []
    for j, part in enumerate(m.content):
        kind = part.get("type")
        where = f"messages.{i}.content.{j}"
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise APIError(
                    400, f"{where}.text: a text part needs a string", param=f"{where}.text"
                )
            texts.append(part["text"])
        elif kind in ("image_url", "input_image"):
            raise APIError(
                400,
                f"{where}: this model is text-only: image inputs need a vision-language model",
                param=where,
            )
        else:
            raise APIError(
                400,
                f"{where}.type: unsupported content part of type {kind!r}",
                param=f"{where}.type",
            )
    return "".join(texts)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    _check_model(request, body.model)
    engine = _engine(request)
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": _message_text(i, m)}
        for i, m in enumerate(body.messages)
    ]
    prefill = _assistant_prefill(body, messages)
    # Rendering a long conversation takes a while: off the event loop.
    prompt = await run_in_threadpool(engine.apply_chat_template, messages) + prefill
    max_tokens = (
        body.max_completion_tokens if body.max_completion_tokens is not None else (body.max_tokens)
    )
    if max_tokens is None:
        max_tokens = request.app.state.config.chat_default_max_tokens
    params = _sampling(body, max_tokens)
    logprob_options = {}
    if body.top_logprobs and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    if body.logprobs:
        logprob_options = {
            "return_logprob": True,
            "top_logprobs_num": body.top_logprobs or 0,
            "return_text_in_logprobs": True,
        }
    rid = body.rid or f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    metrics = request.app.state.metrics
    try:
        if body.stream:
            streams = await _open_streams(engine, [prompt], params, logprob_options, rid)
            return StreamingResponse(
                _chat_events(streams, rid, created, body, metrics), media_type="text/event-stream"
            )
        outs = await until_disconnect(
            request, engine.async_generate(prompt, params, rid=rid, **logprob_options)
        )
    except RequestError as e:
        raise _openai_error(e, body, "messages") from e
    except ClientDisconnected:
        metrics.aborted(body.n)
        raise
    outs = outs if isinstance(outs, list) else [outs]
    metrics.record(outs)
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": o["text"]},
            "logprobs": _chat_logprobs(o["meta_info"]) if body.logprobs else None,
            "finish_reason": _finish_reason(o["meta_info"]),
            "matched_stop": _matched(o["meta_info"]),
        }
        for i, o in enumerate(outs)
    ]
    return JSONResponse(
        {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": body.model,
            "choices": choices,
            "usage": _usage(outs, len(outs)),
        }
    )


def _assistant_prefill(body: ChatCompletionRequest, messages: list[dict[str, Any]]) -> str:
    """The text the assistant's reply starts with: the last message with
    ``continue_final_message`` (taken off the list, so its turn is left open), or
    ``response_prefill``. It follows the rendered generation prompt."""
    if not body.continue_final_message:
        return body.response_prefill or ""
    if body.response_prefill is not None:
        raise APIError(
            400,
            "response_prefill: give it or continue_final_message, not both",
            param="response_prefill",
        )
    if messages[-1]["role"] != "assistant":
        raise APIError(
            400,
            f"continue_final_message: the last message is the {messages[-1]['role']}'s; it "
            "must be the assistant's reply to continue",
            param="continue_final_message",
        )
    return messages.pop()["content"]


def _token_entry(lp: float, text: str | None) -> dict[str, Any]:
    text = text or ""
    return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}


def _chat_logprobs(meta: dict[str, Any]) -> dict[str, Any]:
    content = []
    tops = meta.get("output_top_logprobs") or []
    for k, (lp, _, text) in enumerate(meta.get("output_token_logprobs", [])):
        entry = _token_entry(lp, text)
        top = tops[k] if k < len(tops) and tops[k] else []
        entry["top_logprobs"] = [_token_entry(t_lp, t_text) for t_lp, _, t_text in top]
        content.append(entry)
    return {"content": content}


def _chunk_writer(rid: str, created: int, model: str, kind: str) -> Callable[..., str]:
    """``chunk(choices, usage=None)``: one server-sent event of a streamed response."""

    def chunk(choices: list[dict], usage: dict | None = None) -> str:
        data = {"id": rid, "object": kind, "created": created, "model": model, "choices": choices}
        if usage is not None:
            data["usage"] = usage
        return sse(data)

    return chunk


async def _chat_events(
    streams: list[AsyncIterator[dict]],
    rid: str,
    created: int,
    body: ChatCompletionRequest,
    metrics: Any,
) -> AsyncIterator[str]:
    chunk = _chunk_writer(rid, created, body.model, "chat.completion.chunk")

    for i in range(len(streams)):
        yield chunk(
            [
                {
                    "index": i,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ]
        )
    finals: dict[int, dict] = {}
    firsts: set[int] = set()
    try:
        async for i, piece in _merge(streams):
            meta = piece["meta_info"]
            if i not in firsts:
                firsts.add(i)
                metrics.first_token(piece)
            choice: dict[str, Any] = {
                "index": i,
                "delta": {},
                "logprobs": None,
                "finish_reason": None,
            }
            if piece["text"]:
                choice["delta"] = {"content": piece["text"]}
            if body.logprobs:
                choice["logprobs"] = _chat_logprobs(meta)
            if meta.get("finish_reason") is not None:
                choice["finish_reason"] = _finish_reason(meta)
                choice["matched_stop"] = _matched(meta)
                finals[i] = {"meta_info": meta}
            if choice["delta"] or choice["finish_reason"] or choice["logprobs"]:
                yield chunk([choice])
    finally:  # choices cut off (the client went away, or a stream broke) were aborted
        if len(finals) < len(streams):
            metrics.aborted(len(streams) - len(finals))
    outs = [finals[i] for i in sorted(finals)]
    metrics.record(outs)
    if body.stream_options is not None and body.stream_options.include_usage:
        yield chunk([], _usage(outs, len(outs)))
    yield SSE_DONE


async def _open_streams(
    engine: Any,
    prompts: list[Any],
    params: dict[str, Any],
    options: dict[str, Any],
    rid: str,
) -> list[AsyncIterator[dict]]:
    """One engine stream per (prompt, choice), submitted now so bad input is a 400;
    choice k of a seeded request gets ``seed + k``."""
    n = params.get("n", 1)
    streams = []
    try:
        for p, prompt in enumerate(prompts):
            for k in range(n):
                one = {**params, "n": 1}
                if params.get("seed") is not None:
                    one["seed"] = params["seed"] + k
                key = "input_ids" if isinstance(prompt, list) else "prompt"
                streams.append(
                    await engine.async_generate(
                        **{key: prompt},
                        sampling_params=one,
                        stream=True,
                        rid=f"{rid}-{p}-{k}",
                        **options,
                    )
                )
    except BaseException:
        for s in streams:
            await s.aclose()
        raise
    return streams


async def _merge(streams: list[AsyncIterator[dict]]) -> AsyncIterator[tuple[int, dict]]:
    """Interleave several streams as their pieces arrive; closing this closes them
    all (which aborts their requests)."""
    if len(streams) == 1:
        try:
            async for piece in streams[0]:
                yield 0, piece
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: AsyncIterator[dict]) -> None:
        try:
            async for piece in stream:
                await queue.put((i, piece))
        finally:
            await queue.put((i, done))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            i, piece = await queue.get()
            if piece is done:
                left -= 1
                continue
            yield i, piece
        for t in tasks:
            t.result()  # re-raise a stream's error
    finally:
        for t in tasks:
            t.cancel()
        # Let each pump leave its stream first: closing a stream that another task is
        # still iterating raises "aclose(): asynchronous generator is already running".
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in streams:
            await s.aclose()


# ---- completions ----------------------------------------------------------------------------


def _prompts(prompt: Any) -> list[Any]:
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(t, int) for t in prompt):
        return [list(prompt)]
    return list(prompt)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    _check_model(request, body.model)
    engine = _engine(request)
    prompts = _prompts(body.prompt)
    if not prompts:
        raise APIError(400, "prompt is empty", param="prompt")
    params = _sampling(body, body.max_tokens if body.max_tokens is not None else 16)
    options: dict[str, Any] = {}
    if body.logprobs is not None:
        options = {
            "return_logprob": True,
            "top_logprobs_num": body.logprobs,
            "return_text_in_logprobs": True,
        }
        if body.echo:
            options["logprob_start_len"] = 0
    rid = body.rid or f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    metrics = request.app.state.metrics
    texts = [p for p in prompts if isinstance(p, str)]
    ids = [p for p in prompts if not isinstance(p, str)]
    if texts and ids:
        raise APIError(400, "prompt mixes text and token ids", param="prompt")
    key = "prompt" if texts else "input_ids"
    try:
        if body.stream:
            streams = await _open_streams(engine, prompts, params, options, rid)
            echo = _echo(engine, prompts) if body.echo else None
            return StreamingResponse(
                _completion_events(streams, rid, created, body, echo, metrics),
                media_type="text/event-stream",
            )
        outs = await until_disconnect(
            request,
            engine.async_generate(**{key: prompts}, sampling_params=params, rid=rid, **options),
        )
    except RequestError as e:
        raise _openai_error(e, body, "prompt") from e
    except ClientDisconnected:
        metrics.aborted(len(prompts) * body.n)
        raise
    echo = _echo(engine, prompts) if body.echo else None
    outs = outs if isinstance(outs, list) else [outs]
    metrics.record(outs)
    n = params.get("n", 1)
    choices = []
    for i, o in enumerate(outs):
        prefix = echo[i // n] if echo else ""
        choices.append(
            {
                "index": i,
                "text": prefix + o["text"],
                "logprobs": _completion_logprobs(o["meta_info"], body.echo)
                if body.logprobs is not None
                else None,
                "finish_reason": _finish_reason(o["meta_info"]),
                "matched_stop": _matched(o["meta_info"]),
            }
        )
    return JSONResponse(
        {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": body.model,
            "choices": choices,
            "usage": _usage(outs, params.get("n", 1)),
        }
    )


def _echo(engine: Any, prompts: list[Any]) -> list[str]:
    """The prompts as text. Called once the engine has accepted them: decoding a token
    id outside the vocabulary would raise (an OverflowError, not a 400)."""
    return [p if isinstance(p, str) else engine.tokenizer.decode(p) for p in prompts]


def _completion_logprobs(meta: dict[str, Any], echo: bool) -> dict[str, Any]:
    entries = list(meta.get("output_token_logprobs", []))
    tops = list(meta.get("output_top_logprobs") or [])
    if echo:
        entries = list(meta.get("input_token_logprobs", [])) + entries
        tops = list(meta.get("input_top_logprobs") or []) + tops
    tokens, token_lps, top_lps, offsets = [], [], [], []
    offset = 0
    for k, (lp, _, text) in enumerate(entries):
        text = text or ""
        tokens.append(text)
        token_lps.append(lp)
        top = tops[k] if k < len(tops) and tops[k] else None
        top_lps.append({t: t_lp for t_lp, _, t in top} if top else None)
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": token_lps,
        "top_logprobs": top_lps,
        "text_offset": offsets,
    }


async def _completion_events(
    streams: list[AsyncIterator[dict]],
    rid: str,
    created: int,
    body: CompletionRequest,
    echo: list[str] | None,
    metrics: Any,
) -> AsyncIterator[str]:
    n = body.n

    chunk = _chunk_writer(rid, created, body.model, "text_completion")

    started: set[int] = set()
    finals: dict[int, dict] = {}
    try:
        async for i, piece in _merge(streams):
            meta = piece["meta_info"]
            text = piece["text"]
            if i not in started:
                metrics.first_token(piece)
                if echo:
                    text = echo[i // n] + text
            started.add(i)
            choice = {
                "index": i,
                "text": text,
                "logprobs": _completion_logprobs(meta, False)
                if body.logprobs is not None
                else None,
                "finish_reason": _finish_reason(meta),
            }
            if meta.get("finish_reason") is not None:
                choice["matched_stop"] = _matched(meta)
                finals[i] = {"meta_info": meta}
            yield chunk([choice])
    finally:  # choices cut off (the client went away, or a stream broke) were aborted
        if len(finals) < len(streams):
            metrics.aborted(len(streams) - len(finals))
    outs = [finals[i] for i in sorted(finals)]
    metrics.record(outs)
    if body.stream_options is not None and body.stream_options.include_usage:
        yield chunk([], _usage(outs, n))
    yield SSE_DONE
