"""Image generators: what turns a text prompt into pictures, whatever runs it.

An agent program draws with ``gen_image``, a server answers
``/v1/images/generations``; both talk to an :class:`ImageGenerator`. The backends:

- ``plait.multimodal.diffusers_backend``: a local diffusers text-to-image pipeline
  (the ``plait[diffusion]`` extra), batching concurrent compatible requests into
  one pipeline call and offloading its weights when idle;
- ``plait.multimodal.openai_images``: any server with ``POST
  /v1/images/generations`` (plait's own, SGLang Diffusion, vLLM-Omni, OpenAI).

A request is an :class:`ImageRequest`; ``ImageRequest.check`` refuses bad values
with an ``ImageGenerationError`` naming the field, before anything runs. A
generator is thread-safe: several threads may call ``generate`` at once, and
``cancel`` (from any thread) stops a request between denoising steps.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from PIL import Image

# The schedulers a local pipeline can be given by name ("default": the pipeline's own);
# plait.multimodal.diffusers_backend.SCHEDULERS says what each one is.
SCHEDULER_NAMES = ("default", "euler", "euler_a", "dpm++_2m", "ddim", "lcm", "flow_match")
MAX_IMAGES_PER_REQUEST = 8
MAX_STEPS = 200
MAX_SIDE = 4096


class ImageGenerationError(ValueError):
    """A request a generator cannot run: ``field`` names what was wrong (``size``,
    ``steps``, ``scheduler``, ...), ``value`` what was given."""

    def __init__(self, field: str, value: object, reason: str):
        self.field, self.value, self.reason = field, value, reason
        super().__init__(f"{field}={value!r}: {reason}")


class GenerationCancelled(RuntimeError):
    """The request was cancelled (its client went away) before its images were done."""


@dataclass
class ImageRequest:
    """One text-to-image request. ``None`` leaves a setting to the generator's
    default (the pipeline's own size, steps and guidance)."""

    prompt: str
    negative_prompt: str | None = None
    size: tuple[int, int] | None = None  # (width, height)
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None
    n: int = 1
    cancel: threading.Event = field(default_factory=threading.Event, repr=False)

    def check(self) -> ImageRequest:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ImageGenerationError("prompt", self.prompt, "a non-empty text is needed")
        if not isinstance(self.n, int) or not 1 <= self.n <= MAX_IMAGES_PER_REQUEST:
            raise ImageGenerationError("n", self.n, f"must be 1 to {MAX_IMAGES_PER_REQUEST}")
        if self.steps is not None and (
            not isinstance(self.steps, int) or not 1 <= self.steps <= MAX_STEPS
        ):
            raise ImageGenerationError("steps", self.steps, f"must be 1 to {MAX_STEPS}")
        if self.size is not None:
            w, h = self.size
            if not all(isinstance(x, int) and 1 <= x <= MAX_SIDE for x in (w, h)):
                raise ImageGenerationError(
                    "size", self.size, f"width and height must be 1 to {MAX_SIDE} pixels"
                )
        if self.guidance is not None and not 0 <= self.guidance <= 100:
            raise ImageGenerationError("guidance", self.guidance, "must be 0 to 100")
        return self


def parse_size(text: str) -> tuple[int, int]:
    """``"512x768"`` -> (512, 768), OpenAI's ``size`` field."""
    try:
        w, h = (int(x) for x in text.lower().split("x"))
    except (AttributeError, ValueError):
        raise ImageGenerationError("size", text, "must be WIDTHxHEIGHT, e.g. 512x512") from None
    return w, h


class ImageGenerator(Protocol):
    """Text to images. ``generate`` returns ``request.n`` images per request, in
    order; it raises ImageGenerationError for a request it cannot run and
    GenerationCancelled when ``request.cancel`` is set before it finishes."""

    name: str  # the model's name, as a server shows it

    def generate(self, requests: list[ImageRequest]) -> list[list[Image.Image]]: ...

    def close(self) -> None: ...
