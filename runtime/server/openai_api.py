"""OpenAI-compatible routes: ``/v1/models``, ``/v1/completions``,
``/v1/chat/completions``.

A chat request is rendered with the model's own chat template (the same one
the DSL's roles come from), so the two never disagree. ``response_format``
(``json_object``, ``json_schema``) and SGLang's ``regex`` / ``ebnf`` /
``json_schema`` extras become grammar constraints; ``tools`` are handled by tools.py
(prompt, grammar, and the output read back as ``tool_calls``). With ``n > 1`` and
``stream``, each choice is its own engine request (choice k seeded with
``seed + k``, as the engine does for ``n``) and their pieces are interleaved
in one event stream.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from plait.runtime.errors import RequestError
from plait.runtime.inputs import GenerateInput
from plait.runtime.server.errors import APIError, ClientDisconnected, JSONResponse
from plait.runtime.server.images import load_named, supports_images
from plait.runtime.server.openai_output import (
    chat_logprobs,
    chunk_writer,
    completion_logprobs,
    finish_reason,
    matched_stop,
    usage,
)
from plait.runtime.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    _OpenAISampling,
    cache_namespace,
)
from plait.runtime.server.streaming import SSE_DONE, merge_streams, open_streams, until_disconnect
from plait.runtime.server.tools import (
    ToolPlan,
    add_constraint,
    assistant_message,
    ends_in_calls,
    plan_tools,
    render,
    stream_deltas,
    with_tool_fields,
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
    "logit_bias": "logit_bias",
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
    elif name.startswith(("input_ids", "prompt", "images")):
        param = prompt_param
    elif name in ("regex", "ebnf", "json_schema") and getattr(body, name) is None:
        tools = getattr(body, "tools", None) and getattr(body, "tool_choice", None) != "none"
        if not tools:
            param = "response_format"  # the constraint came from response_format
        else:  # or from the tools (tools.add_constraint allows no other)
            reason = f"the grammar of the tool calls cannot be compiled: {e.reason}"
            return APIError(400, f"tools: {reason}", param="tools")
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


def _chat_messages(
    body: ChatCompletionRequest, engine: Any, model_name: str
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """The messages as the model's chat template takes them, and the (field, source) of
    each image part in order. Images (``image_url`` parts: data URLs, http(s) URLs;
    ``detail`` is accepted and ignored) need a vision-language model; the template gets
    an ``{"type": "image"}`` part where each goes, or, for a template that takes text
    content, the model's image placeholder in the text."""
    vlm = supports_images(engine)
    parts = engine.chat_template.content_parts
    image_token = engine.image_inputs.image_token if vlm else ""
    messages, images = [], []
    for i, m in enumerate(body.messages):
        role = "system" if m.role == "developer" else m.role
        content: list[dict[str, Any]] = []
        if m.content is None or isinstance(m.content, str):
            content.append({"type": "text", "text": m.content or ""})
        else:
            for j, part in enumerate(m.content):
                where = f"messages.{i}.content.{j}"
                source = _content_part(where, part, vlm, model_name)
                if source is None:
                    content.append({"type": "text", "text": part["text"]})
                else:
                    images.append((f"{where}.image_url", source))
                    content.append(
                        {"type": "image"} if parts else {"type": "text", "text": image_token}
                    )
        if not parts:
            content = "".join(p["text"] for p in content)
        messages.append({"role": role, "content": content})
    return messages, images


def _content_part(where: str, part: dict[str, Any], vlm: bool, model_name: str) -> str | None:
    """The image source of an image part, None for a text part; a 400 for others."""
    kind = part.get("type")
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise APIError(400, f"{where}.text: a text part needs a string", param=f"{where}.text")
        return None
    if kind not in ("image_url", "input_image"):
        raise APIError(
            400, f"{where}.type: unsupported content part of type {kind!r}", param=f"{where}.type"
        )
    if not vlm:
        raise APIError(
            400,
            f"{where}: model {model_name!r} is text-only: image inputs need a "
            "vision-language model",
            param=where,
            code="model_not_multimodal",
        )
    url = part.get("image_url")
    if isinstance(url, dict):
        url = url.get("url")
    if not isinstance(url, str) or not url:
        raise APIError(
            400,
            f"{where}.image_url: an image part needs image_url.url (a data URL or an http(s) URL)",
            param=f"{where}.image_url",
        )
    return url


def _text_of(content: Any, image_token: str) -> str:
    """A message's content as text (an image as the model's placeholder)."""
    if isinstance(content, str):
        return content
    return "".join(p["text"] if p["type"] == "text" else image_token for p in content)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    _check_model(request, body.model)
    engine = _engine(request)
    config = request.app.state.config
    plan = plan_tools(body.tools, body.tool_choice, body.parallel_tool_calls, engine)
    messages, sources = _chat_messages(body, engine, config.served_model_name)
    messages = with_tool_fields(body.messages, messages)
    image_token = engine.chat_template.image_token
    prefill = _assistant_prefill(body, messages, image_token)
    images = await load_named(sources, config.media_policy) if sources else None
    # Rendering a long conversation takes a while: off the event loop.
    prompt = await run_in_threadpool(render, engine, messages, plan) + prefill
    max_tokens = (
        body.max_completion_tokens if body.max_completion_tokens is not None else (body.max_tokens)
    )
    if max_tokens is None:
        max_tokens = request.app.state.config.chat_default_max_tokens
    params = _sampling(body, max_tokens)
    add_constraint(plan, params)
    logprob_options = {}
    if body.top_logprobs and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    if body.logprobs:
        logprob_options = {
            "return_logprob": True,
            "top_logprobs_num": body.top_logprobs or 0,
            "return_text_in_logprobs": True,
        }
    options = {**logprob_options, "images": [images]} if images else logprob_options
    rid = body.rid or f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    metrics = request.app.state.metrics
    try:
        if body.stream:
            streams = await open_streams(engine, [prompt], params, options, rid)
            return StreamingResponse(
                _chat_events(streams, rid, created, body, metrics, plan),
                media_type="text/event-stream",
            )
        outs = await until_disconnect(
            request,
            engine.async_generate(
                GenerateInput(
                    prompt=prompt,
                    sampling_params=params,
                    rid=rid,
                    extra_key=cache_namespace(body),
                    **options,
                )
            ),
        )
    except RequestError as e:
        raise _openai_error(e, body, "messages") from e
    except ClientDisconnected:
        metrics.aborted(body.n)
        raise
    outs = outs if isinstance(outs, list) else [outs]
    metrics.record(outs)
    choices = []
    for i, o in enumerate(outs):
        message, called = assistant_message(plan, o["text"])
        choices.append(
            {
                "index": i,
                "message": message,
                "logprobs": chat_logprobs(o["meta_info"]) if body.logprobs else None,
                "finish_reason": "tool_calls" if called else finish_reason(o["meta_info"]),
                "matched_stop": matched_stop(o["meta_info"]),
            }
        )
    return JSONResponse(
        {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": body.model,
            "choices": choices,
            "usage": usage(outs, len(outs)),
        }
    )


def _assistant_prefill(
    body: ChatCompletionRequest, messages: list[dict[str, Any]], image_token: str
) -> str:
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
    return _text_of(messages.pop()["content"], image_token)


async def _chat_events(
    streams: list[AsyncIterator[dict]],
    rid: str,
    created: int,
    body: ChatCompletionRequest,
    metrics: Any,
    plan: ToolPlan | None,
) -> AsyncIterator[str]:
    chunk = chunk_writer(rid, created, body.model, "chat.completion.chunk")
    parsers = [plan.parser() if plan is not None else None for _ in streams]

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
        async for i, piece in merge_streams(streams):
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
            finished = meta.get("finish_reason") is not None
            deltas = stream_deltas(parsers[i], piece["text"], finished)
            for delta in deltas[:-1]:  # a piece that closes content and opens a call
                yield chunk([{**choice, "delta": delta}])
            if deltas:
                choice["delta"] = deltas[-1]
            if body.logprobs:
                choice["logprobs"] = chat_logprobs(meta)
            if finished:
                called = ends_in_calls(parsers[i])
                choice["finish_reason"] = "tool_calls" if called else finish_reason(meta)
                choice["matched_stop"] = matched_stop(meta)
                finals[i] = {"meta_info": meta}
            if choice["delta"] or choice["finish_reason"] or choice["logprobs"]:
                yield chunk([choice])
    finally:  # choices cut off (the client went away, or a stream broke) were aborted
        if len(finals) < len(streams):
            metrics.aborted(len(streams) - len(finals))
    outs = [finals[i] for i in sorted(finals)]
    metrics.record(outs)
    if body.stream_options is not None and body.stream_options.include_usage:
        yield chunk([], usage(outs, len(outs)))
    yield SSE_DONE


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
            streams = await open_streams(engine, prompts, params, options, rid)
            echo = _echo(engine, prompts) if body.echo else None
            return StreamingResponse(
                _completion_events(streams, rid, created, body, echo, metrics),
                media_type="text/event-stream",
            )
        outs = await until_disconnect(
            request,
            engine.async_generate(
                GenerateInput(
                    **{key: prompts},
                    sampling_params=params,
                    rid=rid,
                    extra_key=cache_namespace(body),
                    **options,
                )
            ),
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
                "logprobs": completion_logprobs(o["meta_info"], body.echo)
                if body.logprobs is not None
                else None,
                "finish_reason": finish_reason(o["meta_info"]),
                "matched_stop": matched_stop(o["meta_info"]),
            }
        )
    return JSONResponse(
        {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": body.model,
            "choices": choices,
            "usage": usage(outs, params.get("n", 1)),
        }
    )


def _echo(engine: Any, prompts: list[Any]) -> list[str]:
    """The prompts as text. Called once the engine has accepted them: decoding a token
    id outside the vocabulary would raise (an OverflowError, not a 400)."""
    return [p if isinstance(p, str) else engine.tokenizer.decode(p) for p in prompts]


async def _completion_events(
    streams: list[AsyncIterator[dict]],
    rid: str,
    created: int,
    body: CompletionRequest,
    echo: list[str] | None,
    metrics: Any,
) -> AsyncIterator[str]:
    n = body.n

    chunk = chunk_writer(rid, created, body.model, "text_completion")

    started: set[int] = set()
    finals: dict[int, dict] = {}
    try:
        async for i, piece in merge_streams(streams):
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
                "logprobs": completion_logprobs(meta, False) if body.logprobs is not None else None,
                "finish_reason": finish_reason(meta),
            }
            if meta.get("finish_reason") is not None:
                choice["matched_stop"] = matched_stop(meta)
                finals[i] = {"meta_info": meta}
            yield chunk([choice])
    finally:  # choices cut off (the client went away, or a stream broke) were aborted
        if len(finals) < len(streams):
            metrics.aborted(len(streams) - len(finals))
    outs = [finals[i] for i in sorted(finals)]
    metrics.record(outs)
    if body.stream_options is not None and body.stream_options.include_usage:
        yield chunk([], usage(outs, n))
    yield SSE_DONE
