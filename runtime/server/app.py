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
routes live in openai_api.py, ``/v1/images/generations`` in images_api.py; the
pieces both use in errors.py (error bodies), streaming.py (events, disconnects),
middleware.py and config.py; the native route's own checks in native.py.
"""

from __future__ import annotations

import asyncio
import pathlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Annotated

from fastapi import Body, Depends, FastAPI, Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from plait.multimodal.generation import ImageGenerator
from plait.runtime.engine import Engine, EngineShutdownError
from plait.runtime.errors import RequestError
from plait.runtime.inputs import GenerateInput
from plait.runtime.server.config import ServerConfig
from plait.runtime.server.errors import (
    APIError,
    ClientDisconnected,
    JSONResponse,
    error_response,
    install_error_handlers,
    refuse_lone_surrogates,
)
from plait.runtime.server.images import supports_images
from plait.runtime.server.images_api import ImageService, generator_from_config
from plait.runtime.server.images_api import router as images_router
from plait.runtime.server.metrics import Metrics
from plait.runtime.server.middleware import install_middleware
from plait.runtime.server.native import (
    PRIVATE_OPTIONS,
    check_generate_fields,
    check_profile_request,
    generate_input,
    load_images,
    native_error,
    native_stream,
    num_outputs,
)
from plait.runtime.server.openai_api import router as openai_router
from plait.runtime.server.protocol import (
    AbortRequest,
    ConcatAndAppendRequest,
    GenerateRequest,
    ProfileRequest,
)
from plait.runtime.server.streaming import until_disconnect

__all__ = ["APIError", "ServerConfig", "create_app"]


def create_app(
    engine: Engine,
    config: ServerConfig | None = None,
    image_generator: ImageGenerator | None = None,
) -> FastAPI:
    """The app over ``engine``. ``image_generator`` serves /v1/images/generations (the
    caller keeps and closes it); None: the one ``config`` names, if any."""
    config = config or ServerConfig()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if app.state.images is not None:
            app.state.images.close()
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
    install_middleware(app, config, metrics)
    install_error_handlers(app)

    app.include_router(openai_router)
    owned = image_generator is None
    generator = generator_from_config(config, engine) if owned else image_generator
    app.state.images = None if generator is None else ImageService(generator, metrics, owned)
    app.include_router(images_router)

    @app.post("/generate")
    @app.put("/generate")
    async def generate(body: GenerateRequest, request: Request) -> Response:
        check_generate_fields(body, config.served_model_name, supports_images(engine))
        inp = generate_input(body, await load_images(body, config.media_policy))
        incremental = body.incremental_streaming_output
        if incremental is None:
            incremental = config.incremental_streaming_output
        try:
            if body.stream:
                # Validated and submitted here, so bad input is still a plain 400.
                pieces = await engine.async_generate(inp)
                return StreamingResponse(
                    native_stream(pieces, metrics, incremental),
                    media_type="text/event-stream",
                )
            out = await until_disconnect(request, engine.async_generate(inp))
        except RequestError as e:
            raise native_error(e) from e
        except ClientDisconnected:
            metrics.aborted(num_outputs(body))
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
            "is_multimodal": supports_images(engine),
            "has_image_understanding": supports_images(engine),
            "has_audio_understanding": False,
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
        options = {k: v for k, v in asdict(engine.config).items() if k not in PRIVATE_OPTIONS}
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
                engine.async_generate(
                    GenerateInput(input_ids=[0], sampling_params={"max_new_tokens": 1})
                ),
                30,
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
        activities, trace = check_profile_request(body, config, str(engine.device))
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
