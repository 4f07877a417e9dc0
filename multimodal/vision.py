"""What the runtime knows of a vision-language model's image side, whatever the family.

A prompt with images goes through the model's own processor (``ImageInputs``): the
text's image placeholders are expanded into the number of tokens each image takes,
and each image becomes an :class:`ImageItem`: its pixel inputs, its content hash,
and the prompt positions of its placeholder tokens. The vision model
(``VisionModel.encode``) turns the pixel inputs of a list of images into one
embedding row per placeholder token; the scheduler writes those rows into the
language model's input embeddings at the placeholder positions:

    prompt ids:   [ text ... | <img> <img> ... <img> | text | <img> ... | text ]
                               positions of image 0            image 1
    input_embeds: table rows for text, encoder rows for placeholders

An image's positions need not be contiguous (Idefics3 puts tile tags and line
breaks between the runs of its tiles): ``offset`` and ``length`` give the span
from its first placeholder to its last, the tokens in between are text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch


@dataclass(eq=False)
class ImageItem:
    """One image of one prompt, from processing to the last prefill step that needs it.

    ``pixels`` holds the processor's tensors for this image (family-specific keys);
    ``embeddings`` [len(positions), hidden] is set by the vision model and replaces
    ``pixels`` (dropped once encoded, they are the larger of the two).
    """

    content_hash: str
    positions: list[int]  # prompt positions of this image's placeholder tokens, ascending
    pixels: dict[str, Any] | None
    embeddings: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # family-specific (e.g. tile count)

    @property
    def offset(self) -> int:
        """The first placeholder's position."""
        return self.positions[0]

    @property
    def length(self) -> int:
        """The span from the first placeholder to the last, text in between included."""
        return self.positions[-1] + 1 - self.positions[0]

    @property
    def key_id(self) -> int:
        """The id that stands for each of this image's placeholders in the prefix cache's
        key: negative (never a real token id) and derived from the content hash."""
        return -1 - int(self.content_hash[:15], 16)

    @property
    def num_tokens(self) -> int:
        return len(self.positions)

    def set_embeddings(self, embeddings: torch.Tensor) -> None:
        if embeddings.shape[0] != len(self.positions):
            raise ValueError(
                f"the vision model gave {embeddings.shape[0]} rows for an image with "
                f"{len(self.positions)} placeholder tokens"
            )
        self.embeddings = embeddings
        self.pixels = None


def token_runs(ids: list[int], token: int) -> list[tuple[int, int]]:
    """The maximal runs of ``token`` in ``ids``, as ``(start, end)`` pairs in order."""
    runs, i = [], 0
    while i < len(ids):
        if ids[i] != token:
            i += 1
            continue
        j = i
        while j < len(ids) and ids[j] == token:
            j += 1
        runs.append((i, j))
        i = j
    return runs


def image_key_ids(input_ids: list[int], items: list[ImageItem]) -> list[int]:
    """A prompt's prefix-cache key: its ids with every image placeholder replaced by
    that image's ``key_id`` (the ids themselves when there are no images)."""
    if not items:
        return input_ids
    key = list(input_ids)
    for item in items:
        for p in item.positions:
            key[p] = item.key_id
    return key


@dataclass
class ProcessedPrompt:
    """A prompt after the processor: token ids with every image's placeholders
    expanded, and its images in prompt order."""

    input_ids: list[int]
    images: list[ImageItem]
    # M-RoPE models (Qwen2-VL): the prompt's [3, len(input_ids)] positions (temporal,
    # height, width) and the delta added to the index of each generated token.
    mrope_positions: torch.Tensor | None = None
    mrope_delta: int = 0


class VisionModel(Protocol):
    """The image side of a vision-language model: encoder and connector."""

    def encode(self, pixels: list[dict[str, Any]]) -> list[torch.Tensor]:
        """One ``[num_placeholders, lm_hidden]`` tensor per image, for a batch of
        images' pixel inputs (``ImageItem.pixels``)."""

    def to(self, *args: Any, **kwargs: Any) -> VisionModel:
        """Moved / cast like a torch module."""


def process_prompt(inputs: ImageInputs, text: str, images: list[Any]) -> ProcessedPrompt:
    """Load a prompt's images (any source ``load_image`` reads) and run the model's
    processor; an image that cannot be read or used raises RequestError."""
    from plait.multimodal.image import ImageError, load_image
    from plait.runtime.errors import RequestError

    loaded = []
    for j, source in enumerate(images):
        try:
            loaded.append(load_image(source))
        except ImageError as e:
            shown = repr(source[:60]) if isinstance(source, (str, bytes)) else type(source).__name__
            raise RequestError(f"images[{j}]", shown, str(e)) from None
    try:
        return inputs(text, loaded)
    except RequestError:
        raise
    except (ValueError, TypeError) as e:  # the processor refused the images
        raise RequestError("images", f"{len(images)} images", str(e)) from None


class ImageInputs(Protocol):
    """The model's processor behind one call: a text prompt and its loaded images in,
    ids and ImageItems out. ``image_token`` is what a prompt writes where an image goes."""

    image_token: str
    processor: Any  # the model's HF processor (its image_processor's settings key the cache)

    def __call__(self, text: str, images: list[Any]) -> ProcessedPrompt: ...


def processor_settings(inputs: ImageInputs) -> str:
    """What shapes an image's pixels besides its content: the model's image-processor
    settings, as one string (part of the vision-embedding cache's key)."""
    import hashlib
    import json

    image_processor = getattr(inputs.processor, "image_processor", inputs.processor)
    settings = json.dumps(image_processor.to_dict(), sort_keys=True, default=str)
    return hashlib.sha256(settings.encode()).hexdigest()[:16]
