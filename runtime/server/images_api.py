"""``POST /v1/images/generations``: text to images in OpenAI's shape, served by the
server's image generator (``plait serve --image-model DIR`` or ``--image-backend URL``).

The body takes OpenAI's ``prompt``, ``n``, ``size`` ("WxH"), ``response_format``
(``b64_json`` only: this server keeps no files to link to) and ``model`` (the
generator's name), plus the diffusion extras ``seed``, ``negative_prompt``,
``num_inference_steps`` and ``guidance_scale``. The answer is ``{"created": ...,
"data": [{"b64_json": <PNG>}, ...]}``. A field OpenAI does not define is refused
(as OpenAI does); so is one this server cannot honour (``quality``, ``style``,
``stream``, ...). Bad values are 400s naming the field; a backend that is down or
answers junk is a 502.

Generation runs in a worker thread, never on the event loop. When the client goes
away, the request's ``cancel`` event is set: a diffusers pipeline stops between
denoising steps, a remote backend's connection is closed. ``/metrics`` counts the
images made and the image requests by outcome.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import io
import logging
import pathlib
import time
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import APIRouter, Body, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, StrictInt, ValidationError

from plait.multimodal.generation import (
    GenerationCancelled,
    ImageGenerationError,
    ImageGenerator,
    ImageRequest,
    parse_size,
)
from plait.runtime.server.errors import APIError, ClientDisconnected, JSONResponse

if TYPE_CHECKING:
    from PIL import Image

    from plait.runtime.engine import Engine
    from plait.runtime.server.config import ServerConfig
    from plait.runtime.server.metrics import Metrics

logger = logging.getLogger(__name__)

router = APIRouter()

NO_GENERATOR = (
    "this server has no image generator: start it with --image-model DIR (a local "
    "diffusers pipeline) or --image-backend URL (a server with /v1/images/generations)"
)
# ImageRequest's field names -> the request's.
_PARAM = {"steps": "num_inference_steps", "guidance": "guidance_scale"}
# Fields OpenAI defines that this server cannot honour, refused when set.
_UNSUPPORTED = {
    "quality": "quality levels are not supported; use num_inference_steps",
    "style": "styles are not supported; describe the style in the prompt",
    "background": "background control is not supported",
    "moderation": "moderation levels are not supported",
    "output_compression": "only lossless PNG is returned",
    "partial_images": "partial images are not streamed",
}
WORKERS = 8  # image requests generated at once (a generator batches those it can)


class ImageGenerationBody(BaseModel):
    model_config = ConfigDict(extra="allow")

    prompt: str
    model: str | None = None
    n: StrictInt = 1
    size: str | None = None
    response_format: Literal["b64_json", "url"] | None = None
    output_format: Literal["png"] | None = None
    stream: bool = False
    user: str | None = None  # OpenAI's end-user id: accepted, not used
    seed: StrictInt | None = None
    negative_prompt: str | None = None
    num_inference_steps: StrictInt | None = None
    guidance_scale: float | None = None


class ImageService:
    """The app's generator with the threads that run it and the counters it feeds.
    ``owned``: the service built the generator, so ``close`` closes it too."""

    def __init__(self, generator: ImageGenerator, metrics: Metrics, owned: bool):
        self.generator, self.metrics, self.owned = generator, metrics, owned
        self.executor = concurrent.futures.ThreadPoolExecutor(WORKERS, "plait-images")

    async def generate(self, request: Request, image: ImageRequest) -> list[str]:
        """The images of ``image`` as base64 PNGs; waits in a worker thread, and sets
        ``image.cancel`` if the client goes away (or the server stops) first."""
        work = asyncio.wrap_future(self.executor.submit(self._run, image))
        try:
            while True:
                done, _ = await asyncio.wait({work}, timeout=0.25)
                if done:
                    return work.result()
                if await request.is_disconnected():
                    raise ClientDisconnected()
        except BaseException:
            image.cancel.set()
            work.add_done_callback(_retrieve)  # its error, if any, is not "never retrieved"
            raise

    def _run(self, image: ImageRequest) -> list[str]:
        [pictures] = self.generator.generate([image])
        return [_png_b64(p) for p in pictures]

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self.owned:
            self.generator.close()


def generator_from_config(config: ServerConfig, engine: Engine) -> ImageGenerator | None:
    """The generator ``--image-model`` / ``--image-backend`` name, or None. A local
    pipeline runs on the engine's device, in its dtype."""
    if config.image_backend is not None:
        from plait.multimodal.openai_images import OpenAIImagesGenerator

        return OpenAIImagesGenerator(
            config.image_backend,
            config.image_backend_model,
            api_key=config.image_backend_api_key,
            timeout_s=config.image_backend_timeout_s,
        )
    if config.image_model is not None:
        try:
            from plait.multimodal.diffusers_backend import DiffusersGenerator
        except ImportError as e:
            raise RuntimeError(
                f"--image-model {config.image_model}: the diffusers backend cannot be loaded "
                f"({e}); install it with: pip install 'plait[diffusion]'"
            ) from e
        return DiffusersGenerator(
            str(pathlib.Path(config.image_model).expanduser()),
            device=engine.device,
            dtype=engine.dtype,
            scheduler=config.image_scheduler,
            max_batch_images=config.image_max_batch,
            idle_offload_s=config.image_idle_offload_s,
            batch_invariant=config.image_batch_invariant,
        )
    return None


@router.post(
    "/v1/images/generations",
    # The body is parsed in the route, so a refused one is counted too; the spec still has it.
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": ImageGenerationBody.model_json_schema()}},
        }
    },
)
async def create_images(
    raw: Annotated[dict[str, Any], Body(include_in_schema=False)], request: Request
) -> JSONResponse:
    service: ImageService | None = request.app.state.images
    if service is None:
        raise APIError(404, NO_GENERATOR, code="no_image_generator", type="not_found_error")
    metrics = service.metrics
    try:
        body = ImageGenerationBody.model_validate(raw)
    except ValidationError as e:
        metrics.image_request("invalid")
        errors = [{**error, "loc": ("body", *error["loc"])} for error in e.errors()]
        raise RequestValidationError(errors) from None
    try:
        image = _image_request(body, service.generator.name)
    except APIError:
        metrics.image_request("invalid")
        raise
    try:
        pictures = await service.generate(request, image)
    except ImageGenerationError as e:  # the generator's own limits (a size it cannot make)
        metrics.image_request("invalid")
        raise _field_error(e) from None
    except ClientDisconnected:
        metrics.image_request("cancelled")
        raise
    except GenerationCancelled as e:
        metrics.image_request("cancelled")
        raise APIError(503, f"image generation was cancelled: {e}", type="server_error") from None
    except ConnectionError as e:  # the remote backend is down or answered junk
        metrics.image_request("backend_error")
        logger.warning("image backend failed: %s", e)
        reason = getattr(e, "reason", None) or str(e)
        raise APIError(
            502, f"the image backend failed: {reason}", type="server_error", code="backend_error"
        ) from None
    except Exception:
        metrics.image_request("error")
        raise
    metrics.image_request("ok", images=len(pictures))
    return JSONResponse({"created": int(time.time()), "data": [{"b64_json": b} for b in pictures]})


def _image_request(body: ImageGenerationBody, model_name: str) -> ImageRequest:
    """The ImageRequest of a body; an APIError naming the field for anything refused."""
    for name in body.model_extra or {}:
        if name in _UNSUPPORTED:
            if body.model_extra[name] is not None:
                raise APIError(400, f"{name}: {_UNSUPPORTED[name]}", param=name)
            continue
        raise APIError(
            400,
            f"{name}: unknown field of an image generation request",
            param=name,
            code="unknown_parameter",
        )
    if body.model is not None and body.model != model_name:
        raise APIError(
            404,
            f"model {body.model!r} is not served here; this server's image model is {model_name!r}",
            param="model",
            code="model_not_found",
            type="not_found_error",
        )
    if body.response_format == "url":
        raise APIError(
            400,
            "response_format: 'url' is not supported (this server keeps no image files); "
            "use 'b64_json'",
            param="response_format",
        )
    if body.stream:
        raise APIError(400, "stream: images are not streamed; send stream=false", param="stream")
    if body.seed is not None and not 0 <= body.seed < 2**63:
        raise APIError(400, f"seed={body.seed}: must be 0 to 2**63-1", param="seed")
    try:
        size = None if body.size in (None, "auto") else parse_size(body.size)
        return ImageRequest(
            prompt=body.prompt,
            negative_prompt=body.negative_prompt,
            size=size,
            steps=body.num_inference_steps,
            guidance=body.guidance_scale,
            seed=body.seed,
            n=body.n,
        ).check()
    except ImageGenerationError as e:
        raise _field_error(e) from None


def _field_error(e: ImageGenerationError) -> APIError:
    param = _PARAM.get(e.field, e.field)
    return APIError(400, f"{param}={e.value!r}: {e.reason}", param=param)


def _png_b64(picture: Image.Image) -> str:
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
