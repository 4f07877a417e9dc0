"""The HTTP server: SGLang's native API and OpenAI's, over one Engine.

    app = create_app(engine, ServerConfig(served_model_name="smollm2"))

Every route goes through the same ``Engine.async_generate`` the in-process API
uses. Errors have OpenAI's shape, ``{"error": {"message", "type", "param",
"code"}}``: bad input is a 4xx naming the field, never a 500. A client that
disconnects (mid-stream or while waiting) aborts its request, which frees its
KV at once.

Native routes: ``/generate``, ``/get_model_info`` (``/model_info``),
``/get_server_info`` (``/server_info``), ``/health``, ``/health_generate``,
``/flush_cache``, ``/abort_request``, ``/metrics``, ``/start_profile`` and
``/stop_profile`` (with ``--profile-dir``), ``/concate_and_append_request``. OpenAI
routes live in openai_api.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pathlib
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from typing import Annotated, Any

from fastapi import Body, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse as _JSONResponse
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from plait.runtime.engine import Engine, EngineShutdownError
from plait.runtime.errors import RequestError
from plait.runtime.server.metrics import Metrics
from plait.runtime.server.protocol import (
    MEDIA_FIELDS,
    UNSUPPORTED_FIELDS,
    AbortRequest,
    ConcatAndAppendRequest,
    GenerateRequest,
    ProfileRequest,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerConfig:
    served_model_name: str = "smollm2"  # the only model name shown and accepted; never a path
    api_key: str | None = None
    max_request_bytes: int = 4 * 2**20  # request bodies past this get 413, before tokenizing
    # Origins a browser may call from (CORS); none by default, so no web page can.
    allow_origins: tuple[str, ...] = ()
    # max_tokens of a chat completion that gives none (OpenAI: "until the context ends").
    chat_default_max_tokens: int = 1024
    # /generate streams carry only what is new in each event (SGLang's
    # --incremental-streaming-output); a request's incremental_streaming_output wins.
    incremental_streaming_output: bool = False
    # Where /start_profile's traces go; None: profiling is off (a client cannot choose
    # where the server writes, nor leave a profiler growing on a server not meant for it).
    profile_dir: str | None = None

    def __post_init__(self) -> None:
        name = self.served_model_name
        if (
            not name
            or name != name.strip()
            or os.path.isabs(name)
            or name.startswith(("~", "."))
            or "\\" in name
        ):
            raise ValueError(
                f"served model name {name!r} must be a name (like 'smollm2' or "
                "'org/model'), not a path: clients see it"
            )


class APIError(Exception):
    """A request the server refuses, with its HTTP status and OpenAI error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = (
            status,
            message,
            param,
            code,
            type,
        )


class ClientDisconnected(Exception):
    pass


class JSONResponse(_JSONResponse):
    """A JSON response that can always be sent: text that UTF-8 cannot encode (a lone
    surrogate echoed from a request) is written as a JSON escape instead of failing."""

    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except UnicodeEncodeError:
            return json.dumps(content, separators=(",", ":")).encode("ascii")


def error_body(message: str, type: str, param: str | None = None, code: Any = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: Any = None,
) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, code), status_code=status)


def _native_error(e: RequestError) -> APIError:
    """The engine's error in /generate's own names: its prompt field is ``text``."""
    field = e.field
    if field == "prompt" or field.startswith("prompt."):
        field = "text" + field[len("prompt") :]
    message = str(e)
    if message.startswith(e.field):
        message = field + message[len(e.field) :]
    return APIError(400, message, param=field)


# A JSON escape of a UTF-16 surrogate (U+D800..U+DFFF): the cheap test before a walk.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


async def refuse_lone_surrogates(request: Request) -> None:
    """A 400 naming the field for any string of the request (a value or a key, in the
    body or the path) holding a lone surrogate, JSON's ``"\\ud800"``: it is not
    Unicode, so it can be neither tokenized nor sent back (echoed in a result or an
    error, it would break the response, and the connection with it)."""
    for name, value in request.path_params.items():
        where = _lone_surrogate(value)
        if where is not None:
            raise _surrogate_error((name, *where[0]), value, where[1])
    if request.method not in ("POST", "PUT"):
        return
    body = await request.body()  # read once: the route gets the same bytes
    if not _SURROGATE_ESCAPE.search(body):
        return
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return  # the route's own parsing reports it
    where = _lone_surrogate(data)
    if where is not None:
        path, (text, index) = where
        raise _surrogate_error(path, text, index)


def _lone_surrogate(data: Any) -> tuple[tuple, tuple[str, int]] | None:
    """(path, (text, index)) of the first string (key or value) in ``data`` UTF-8
    cannot encode; iterative, as a body may nest deeply."""
    stack: list[tuple[tuple, Any]] = [((), data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                return path, (value, e.start)
        elif isinstance(value, dict):
            for key, item in reversed(value.items()):
                stack.append(((*path, key), item))
                stack.append(((*path, key), key))  # the key itself, checked first
        elif isinstance(value, list):
            stack.extend(((*path, i), item) for i, item in reversed(list(enumerate(value))))
    return None


def _surrogate_error(path: tuple, text: str, index: int) -> APIError:
    param = ".".join(_printable(str(p)) for p in path) or None
    return APIError(
        400,
        f"{param or 'the request body'}: contains a lone surrogate {text[index]!a} at "
        f"character {index}, which is not valid Unicode",
        param=param,
        code="invalid_unicode",
    )


def _printable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


# ---- app -------------------------------------------------------------------------------


def create_app(engine: Engine, config: ServerConfig | None = None) -> FastAPI:
    config = config or ServerConfig()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        engine.shutdown()

    app = FastAPI(
        title="plait",
        version="0.1.0",
        lifespan=lifespan,
        dependencies=[Depends(refuse_lone_surrogates)],
    )
    app.state.engine = engine
    app.state.config = config
    app.state.metrics = metrics = Metrics(engine)
    app.state.started = time.time()
    _install_middleware(app, config, metrics)
    _install_error_handlers(app)

    from plait.runtime.server.openai_api import router as openai_router

    app.include_router(openai_router)

    @app.post("/generate")
    @app.put("/generate")
    async def generate(body: GenerateRequest, request: Request) -> Response:
        check_generate_fields(body, config.served_model_name)
        kwargs = _generate_kwargs(body)
        incremental = body.incremental_streaming_output
        if incremental is None:
            incremental = config.incremental_streaming_output
        try:
            if body.stream:
                # Validated and submitted here, so bad input is still a plain 400.
                pieces = await engine.async_generate(**kwargs, stream=True)
                return StreamingResponse(
                    _native_stream(pieces, metrics, incremental),
                    media_type="text/event-stream",
                )
            out = await until_disconnect(request, engine.async_generate(**kwargs))
        except RequestError as e:
            raise _native_error(e) from e
        except ClientDisconnected:
            metrics.aborted(_num_outputs(body))
            raise
        metrics.record(out)
        return JSONResponse(out)

    @app.get("/get_model_info")
    @app.get("/model_info")
    async def model_info() -> dict:
        mc = engine.model_config
        return {  # names only: a client never learns where the weights live
            "model_path": config.served_model_name,
            "tokenizer_path": config.served_model_name,
            "served_model_name": config.served_model_name,
            "is_generation": True,
            "is_multimodal": False,
            "has_image_understanding": False,
            "architectures": [mc.architecture],
            "context_length": engine.context_len,
            "vocab_size": mc.vocab_size,
            "chat_template": {
                **engine.chat_template.to_dict(),
                "name": config.served_model_name,
            },
        }

    @app.get("/get_server_info")
    @app.get("/server_info")
    async def server_info() -> dict:
        stats = await run_in_threadpool(engine.get_stats)
        options = {k: v for k, v in asdict(engine.config).items() if k not in _PRIVATE_OPTIONS}
        return {
            **options,
            "model": config.served_model_name,
            "served_model_name": config.served_model_name,
            "device": str(engine.device),
            "dtype": str(engine.dtype).removeprefix("torch."),
            "context_length": engine.context_len,
            "max_total_num_tokens": engine.max_total_tokens,
            "internal_states": [stats],
            "version": "0.1.0",
            "uptime_s": time.time() - app.state.started,
        }

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/health_generate")
    async def health_generate() -> Response:
        # asyncio.TimeoutError: on Python 3.10 it is not the builtin TimeoutError.
        try:
            out = await asyncio.wait_for(
                engine.async_generate(input_ids=[0], sampling_params={"max_new_tokens": 1}), 30
            )
        except (asyncio.TimeoutError, EngineShutdownError) as e:
            return error_response(503, f"engine not healthy: {e!r}", type="server_error")
        if out["meta_info"]["finish_reason"]["type"] == "abort":
            return error_response(503, "engine not healthy: request aborted", type="server_error")
        return Response(status_code=200)

    @app.get("/flush_cache")
    @app.post("/flush_cache")  # two routes, so the OpenAPI spec has one operation id each
    async def flush_cache() -> Response:
        if not await run_in_threadpool(engine.flush_cache):
            return error_response(
                400, "cannot flush the cache while requests are running", code="busy"
            )
        return PlainTextResponse("Cache flushed.\n")

    @app.post("/abort_request")
    async def abort_request(body: AbortRequest) -> Response:
        if not engine.abort(body.rid):
            return error_response(
                404, f"no request with rid {body.rid!r} is in flight", param="rid", code="not_found"
            )
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        data, content_type = await run_in_threadpool(metrics.render)
        return Response(data, media_type=content_type)

    app.state.profile_trace = None  # the file name of the profile being recorded

    @app.get("/start_profile")
    @app.post("/start_profile")  # two routes, so the OpenAPI spec has one operation id each
    async def start_profile(
        body: Annotated[ProfileRequest | None, Body()] = None,
    ) -> Response:
        body = body or ProfileRequest()
        activities, trace = _check_profile_request(body, config, str(engine.device))
        if app.state.profile_trace is not None:
            return error_response(
                400, "a profile is already being recorded; /stop_profile first", code="busy"
            )
        app.state.profile_trace = trace
        try:
            await run_in_threadpool(
                engine.start_profile,
                tuple(a for a in activities if a != "MEM"),
                bool(body.record_shapes),
                bool(body.with_stack),
                "MEM" in activities,
            )
        except BaseException:
            app.state.profile_trace = None
            raise
        return PlainTextResponse("Start profiling.\n")

    @app.get("/stop_profile")
    @app.post("/stop_profile")  # two routes, so the OpenAPI spec has one operation id each
    async def stop_profile() -> Response:
        trace, app.state.profile_trace = app.state.profile_trace, None
        if trace is None:
            return error_response(400, "no profile is being recorded; /start_profile first")
        directory = pathlib.Path(config.profile_dir)  # set: a profile was started
        await run_in_threadpool(directory.mkdir, parents=True, exist_ok=True)
        await run_in_threadpool(engine.stop_profile, str(directory / trace))
        return PlainTextResponse(f"Stop profiling. Trace {trace} is in the profile directory.\n")

    @app.post("/concate_and_append_request")
    async def concat_and_append(body: ConcatAndAppendRequest) -> dict:
        # SGLang's frontend sends this when forks join with mode="concate_and_append",
        # asking the server to splice the forks' KV after the parent's. Nothing needs
        # doing here: the parent's next request carries the joined text; the radix cache
        # holds its prefix up to the first fork, and the rest is prefilled at its real
        # positions (exact, where splicing reuses KV computed at other positions).
        return {"success": True, "message": "the joined text is cached on its next request"}

    return app


_PROFILE_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$")
# ProfileRequest fields plait cannot honour (it records from start to stop).
_PROFILE_UNSUPPORTED = {
    "start_step": "profiles run from /start_profile to /stop_profile",
    "num_steps": "profiles run from /start_profile to /stop_profile",
    "profile_by_stage": "profiles are not split by stage",
    "profile_stages": "profiles are not split by stage",
    "merge_profiles": "there is one profile (one rank records)",
    "detailed_annotations": "iteration annotations are not recorded",
}


def _check_profile_request(
    body: ProfileRequest, config: ServerConfig, device: str
) -> tuple[list[str], str]:
    """The activities to record and the trace's file name, or a 400 naming the field."""
    if config.profile_dir is None:
        raise APIError(
            400,
            "profiling is off on this server: start it with --profile-dir DIR",
            code="profiling_disabled",
        )
    if body.output_dir is not None:
        raise APIError(
            400,
            "output_dir: traces are written to the server's --profile-dir; a client does "
            "not choose where the server writes",
            param="output_dir",
        )
    for name, why in _PROFILE_UNSUPPORTED.items():
        if _is_set(getattr(body, name)):
            raise APIError(400, f"{name}: {why}", param=name, code="unsupported_field")
    on_gpu = device.startswith("cuda")
    activities = body.activities or (["CPU", "GPU"] if on_gpu else ["CPU"])
    for a in activities:
        if a not in ("CPU", "GPU", "MEM"):
            raise APIError(
                400, f"activities: {a!r} is not one of CPU, GPU, MEM", param="activities"
            )
        if a == "GPU" and not on_gpu:
            raise APIError(400, "activities: this server runs on no GPU", param="activities")
    parts = []
    for name in ("profile_prefix", "profile_id"):
        value = getattr(body, name)
        if value is not None:
            if not _PROFILE_NAME.match(value):
                raise APIError(
                    400,
                    f"{name}: must be 1-64 letters, digits, '.', '_' or '-' (it names a file)",
                    param=name,
                )
            parts.append(value)
    if not body.profile_id:
        parts.append(time.strftime("%Y%m%d-%H%M%S") + f"-{secrets.token_hex(3)}")
    return activities, "-".join(parts) + ".trace.json"


# Engine options a client is not shown: where files live on the server.
_PRIVATE_OPTIONS = frozenset({"model", "cache_dir"})


def check_generate_fields(body: GenerateRequest, model_name: str) -> None:
    """Refuse fields of SGLang's native API that cannot apply here (never ignore them
    silently), and fields SGLang does not define."""
    extra = sorted(body.model_extra or {})
    if extra:
        raise APIError(
            400,
            f"{extra[0]}: unknown field of /generate (SGLang's native API has no such field)",
            param=extra[0],
        )
    for name in MEDIA_FIELDS:
        if _is_set(getattr(body, name)):
            raise APIError(
                400,
                f"{name}: model {model_name!r} is text-only: it takes no image, video or "
                "audio input (serve a vision-language model for images)",
                param=name,
                code="model_not_multimodal",
            )
    for name, why in UNSUPPORTED_FIELDS.items():
        if _is_set(getattr(body, name)):
            raise APIError(400, f"{name}: {why}", param=name, code="unsupported_field")


def _is_set(value: Any) -> bool:
    """A field given a value that asks for something: not None, False or empty (0 is a
    value: ``0 in (False,)`` would be true)."""
    return value is not None and value is not False and value not in ([], {}, "")


def _num_outputs(body: GenerateRequest) -> int:
    prompts = body.text if isinstance(body.text, list) else [None]
    if body.input_ids and isinstance(body.input_ids[0], list):
        prompts = body.input_ids
    params = body.sampling_params if isinstance(body.sampling_params, dict) else {}
    n = params.get("n", 1) if isinstance(params.get("n", 1), int) else 1
    return len(prompts) * max(n, 1)


def _generate_kwargs(body: GenerateRequest) -> dict[str, Any]:
    """The engine's arguments; the engine validates them (rid, top_logprobs_num, n...)."""
    if (body.text is None) == (body.input_ids is None):
        raise APIError(400, "give exactly one of text or input_ids", param="text")
    batch = isinstance(body.text, list) or bool(
        body.input_ids and isinstance(body.input_ids[0], list)
    )
    if body.stream and batch:
        raise APIError(400, "streaming takes a single prompt", param="stream")
    return {
        "prompt": body.text,
        "input_ids": body.input_ids,
        "sampling_params": body.sampling_params,
        "return_logprob": _one_value(body, "return_logprob"),
        "logprob_start_len": _one_value(body, "logprob_start_len"),
        "top_logprobs_num": _one_value(body, "top_logprobs_num"),
        "return_text_in_logprobs": body.return_text_in_logprobs,
        "rid": body.rid,
    }


def _one_value(body: GenerateRequest, name: str) -> Any:
    """SGLang lets a batch give logprob options per prompt; plait takes one value for
    the batch, so a list must hold one value (repeated)."""
    value = getattr(body, name)
    if not isinstance(value, list):
        return value
    if not value or any(v != value[0] for v in value):
        raise APIError(400, f"{name}: per-prompt values must all be equal here", param=name)
    return value[0]


_LOGPROB_KEYS = (
    "input_token_logprobs",
    "output_token_logprobs",
    "input_top_logprobs",
    "output_top_logprobs",
)


async def _native_stream(
    pieces: AsyncIterator[dict], metrics: Metrics, incremental: bool = False
) -> AsyncIterator[str]:
    """SSE events each carrying the whole result so far (cumulative text, ids and
    logprobs), or with ``incremental`` only what is new since the last event; then
    ``[DONE]``. ``meta_info.output_token_logprobs_length`` counts the output logprobs
    so far. A client that goes away closes ``pieces``: the request aborts."""
    total: dict[str, Any] = {"text": "", "output_ids": [], "meta_info": {}}
    first, finished = True, False
    try:
        async for piece in pieces:
            if first:
                metrics.first_token(piece)
                first = False
            total["text"] += piece["text"]
            total["output_ids"] += piece["output_ids"]
            meta = dict(piece["meta_info"])
            for key in _LOGPROB_KEYS:
                if key in meta:
                    meta[key] = total["meta_info"].get(key, []) + meta[key]
            if "output_token_logprobs" in meta:
                meta["output_token_logprobs_length"] = len(meta["output_token_logprobs"])
            total["meta_info"] = meta
            finished = meta.get("finish_reason") is not None
            if incremental:
                piece_meta = dict(piece["meta_info"])
                if "output_token_logprobs" in meta:
                    piece_meta["output_token_logprobs_length"] = len(meta["output_token_logprobs"])
                yield sse({**piece, "meta_info": piece_meta})
            else:
                yield sse(total)
    finally:
        if not finished:  # the client went away (or the stream broke): count the abort
            metrics.aborted(1)
    metrics.record(total)
    yield SSE_DONE


async def until_disconnect(request: Request, work: Awaitable[Any]) -> Any:
    """Await ``work``; if the client goes away first, cancel it (which aborts the
    engine requests and frees their KV)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise ClientDisconnected()
    except BaseException:
        task.cancel()
        raise


# ---- middleware and errors ----------------------------------------------------------------


def _install_middleware(app: FastAPI, config: ServerConfig, metrics: Metrics) -> None:
    app.add_middleware(_Gate, config=config, metrics=metrics)
    if config.allow_origins:  # outermost, so preflight requests get their answer
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.allow_origins),
            allow_methods=["GET", "POST", "PUT", "OPTIONS"],
            allow_headers=["authorization", "content-type"],
        )


class _BodyTooLarge(StarletteHTTPException):
    """Raised while reading a body that grows past the limit (one sent without a
    Content-Length, or longer than the one it declared)."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body is over the limit of {limit} bytes")


class _Gate:
    """The API key, the body size limit, a JSON content type and the HTTP metrics, as a
    plain ASGI middleware: ``@app.middleware("http")`` (BaseHTTPMiddleware) would hide a
    client's disconnect from ``request.is_disconnected()``, so a request whose client
    went away would run to its end."""

    open_paths = frozenset({"/health"})

    def __init__(self, app: Any, config: ServerConfig, metrics: Metrics):
        self.app, self.config, self.metrics = app, config, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()

        async def send_counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                # The route's template, not the raw path: /v1/models/{anything} must not
                # make a new label value per request.
                route = getattr(scope.get("route"), "path", None) or "other"
                self.metrics.http(route, message["status"], time.perf_counter() - start)
            await send(message)

        refusal = self._refusal(scope)
        if refusal is not None:
            await refusal(scope, receive, send_counted)
            return
        limit, received = self.config.max_request_bytes, 0

        async def receive_limited() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge(limit)
            return message

        await self.app(scope, receive_limited, send_counted)

    def _refusal(self, scope: dict) -> Response | None:
        config, headers = self.config, Headers(scope=scope)
        if config.api_key and scope["path"] not in self.open_paths:
            # The scheme is case-insensitive (RFC 9110): "bearer KEY" is as good.
            scheme, _, given = headers.get("authorization", "").strip().partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(
                given.strip().encode(), config.api_key.encode()
            ):
                return error_response(
                    401,
                    "missing or wrong API key (Authorization: Bearer ...)",
                    type="authentication_error",
                    code="invalid_api_key",
                )
        has_body = headers.get("content-length", "0") != "0" or "transfer-encoding" in headers
        if has_body and not _is_json(headers.get("content-type", "")):
            # A web page can POST text/plain or a form to localhost without a CORS check;
            # requiring JSON keeps it from driving the server.
            return error_response(
                415,
                "the request body must be JSON, sent with 'Content-Type: application/json' "
                f"(got {headers.get('content-type') or 'none'!r})",
                code="unsupported_media_type",
            )
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return error_response(400, f"bad Content-Length {length!r}")
            if int(length) > config.max_request_bytes:
                return error_response(
                    413,
                    f"request body of {length} bytes is over the limit of "
                    f"{config.max_request_bytes} bytes",
                    code="request_too_large",
                )
        return None


_TYPE_NAME = re.compile(r"^(str|int|float|bool|dict|list|none|[\w.]+\[.*\]|function-.*)$")


def _is_json(content_type: str) -> bool:
    kind = content_type.split(";")[0].strip().lower()
    return kind == "application/json" or (
        kind.startswith("application/") and kind.endswith("+json")
    )


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(_BodyTooLarge)
    async def too_large(request: Request, e: _BodyTooLarge) -> JSONResponse:
        return error_response(413, str(e.detail), code="request_too_large")

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return error_response(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(RequestError)
    async def bad_request(request: Request, e: RequestError) -> JSONResponse:
        return error_response(400, str(e), param=e.field)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":  # its loc is a character offset, not a field
            reason = (first.get("ctx") or {}).get("error", first.get("msg"))
            return error_response(400, f"the request body is not valid JSON: {reason}")
        if first.get("type") == "missing" and tuple(first.get("loc", ())) == ("body",):
            return error_response(400, "the request body is missing (expected a JSON object)")
        # Drop "body" and the union-member names pydantic puts in the path ("str", "list[int]").
        loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _TYPE_NAME.match(str(p))]
        param = ".".join(loc) or None
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more errors)"
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(e.status_code, str(e.detail), type=kind)

    @app.exception_handler(EngineShutdownError)
    async def shut_down(request: Request, e: EngineShutdownError) -> JSONResponse:
        return error_response(503, str(e), type="server_error")

    @app.exception_handler(ClientDisconnected)
    async def gone(request: Request, e: ClientDisconnected) -> Response:
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception) -> JSONResponse:
        logger.exception("internal error on %s", request.url.path)
        return error_response(500, f"internal error: {e!r}", type="server_error")
