"""Images a request sends, loaded for the routes: every source through
``plait.multimodal.media.load_for_request`` under the server's media policy, each
in a worker thread (fetches and decoding never run on the event loop), all of a
request at once. A source that is refused or cannot be read is a 400 naming its
field (``image_data[1]``, ``messages.0.content.2.image_url``) and the source."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.concurrency import run_in_threadpool

from plait.multimodal.image import ImageError, LoadedImage
from plait.multimodal.media import MediaPolicy, load_for_request
from plait.runtime.server.errors import APIError


def supports_images(engine: Any) -> bool:
    """Whether the engine's model takes images (a vision-language model)."""
    return bool(engine.input_limits.supports_images)


async def load_named(sources: list[tuple[str, Any]], policy: MediaPolicy) -> list[LoadedImage]:
    """The images of ``(field, source)`` pairs, in order; the first (in order) that
    fails is the 400."""
    results = await asyncio.gather(
        *(run_in_threadpool(load_for_request, source, policy) for _, source in sources),
        return_exceptions=True,
    )
    for (field, _), result in zip(sources, results):
        if isinstance(result, ImageError):
            raise APIError(400, f"{field}: {result}", param=field, code="invalid_image")
        if isinstance(result, BaseException):
            raise result
    return list(results)
