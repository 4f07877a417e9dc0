"""Qwen2-VL and Qwen2.5-VL: the image side (transformers' vision transformer) and the
processor, with the prompt's M-RoPE positions.

``Qwen2VLForConditionalGeneration`` / ``Qwen2_5_VLForConditionalGeneration`` are a
vision transformer whose patch merger maps each 2x2 block of patches to one language
model token, and a Qwen2 language model with multimodal rotary embeddings (M-RoPE).
The language model runs on plait's own code (models/llama.py with ``MRotaryEmbedding``);
this module holds the rest:

- ``Qwen2VLVision``: transformers' ``model.visual`` with the checkpoint's weights. The
  images of a step go through it in one call (their patches laid end to end, one
  ``image_grid_thw`` row each), as transformers runs the images of one prompt.
- ``Qwen2VLInputs``: the model's own processor. A prompt writes
  ``<|vision_start|><|image_pad|><|vision_end|>`` where each image goes; the processor
  expands the ``<|image_pad|>`` to one token per merged 2x2 block of the image's
  ``t x h x w`` patch grid.
- ``mrope_positions``: the prompt's 3-D positions (temporal, height, width). Text tokens
  count up on all three axes; an image's tokens sit on its merged grid, each axis
  starting where the text before it stopped, and the text after the image resumes at
  that start plus the grid's longer side:

      text  t0 t1 | image 2x3 grid (start 2)               | text
      t:    0  1  | 2 2 2 2 2 2                            | 5 6 ...
      h:    0  1  | 2 2 2 3 3 3                            | 5 6 ...
      w:    0  1  | 2 3 4 2 3 4                            | 5 6 ...

  So the last position is below the token count; ``delta`` (last position + 1 - tokens,
  zero or negative) is added to the index of every generated token, on all three axes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from plait.multimodal.image import LoadedImage
from plait.multimodal.vision import ImageItem, ProcessedPrompt, token_runs
from plait.runtime.errors import RequestError

# The processor class of each architecture (built by hand when AutoProcessor cannot be).
_PROCESSOR_CLASSES = {
    "Qwen2VLForConditionalGeneration": "Qwen2VLProcessor",
    "Qwen2_5_VLForConditionalGeneration": "Qwen2_5_VLProcessor",
}


class Qwen2VLVision(nn.Module):
    """The vision transformer and patch merger (transformers' module and weights)."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual
        self.merge = visual.spatial_merge_size

    @classmethod
    def from_hf(cls, hf_model: nn.Module) -> Qwen2VLVision:
        """Take the image side of a loaded Qwen2-VL / Qwen2.5-VL model."""
        return cls(hf_model.model.visual)

    @torch.inference_mode()
    def encode(self, pixels: list[dict[str, Any]]) -> list[torch.Tensor]:
        """All the images' patches in one pass; one ``[t*h*w / merge^2, lm_hidden]``
        tensor per image."""
        param = next(self.parameters())
        values = torch.cat([p["pixel_values"] for p in pixels]).to(param.device, param.dtype)
        grid = torch.stack([p["image_grid_thw"] for p in pixels]).to(param.device)
        merged = self.visual(values, grid_thw=grid).pooler_output
        return list(merged.split((grid.prod(-1) // self.merge**2).tolist()))


def mrope_positions(
    num_tokens: int, images: list[tuple[int, tuple[int, int, int]]]
) -> tuple[torch.Tensor, int]:
    """The ``[3, num_tokens]`` M-RoPE positions of a prompt and its delta. ``images``
    holds each image's first placeholder position and its merged ``(t, h, w)`` grid, in
    prompt order; an image's ``t * h * w`` placeholders are contiguous."""
    out = torch.empty(3, num_tokens, dtype=torch.int64)
    at = 0  # the next prompt index
    pos = 0  # the next text position
    for offset, (t, h, w) in images:
        out[:, at:offset] = torch.arange(pos, pos + offset - at)
        pos += offset - at
        n = t * h * w
        grid = torch.stack(
            torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
        )
        out[:, offset : offset + n] = grid.reshape(3, n) + pos
        pos += max(h, w)
        at = offset + n
    out[:, at:] = torch.arange(pos, pos + num_tokens - at)
    last = int(out.max()) if num_tokens else -1
    return out, last + 1 - num_tokens


class Qwen2VLInputs:
    """The model's Qwen2-VL / Qwen2.5-VL processor behind the ImageInputs call."""

    def __init__(self, processor: Any):
        self.processor = processor
        # What a prompt writes per image: the pad token inside the vision markers, as the
        # model's chat template writes it (the processor expands the pad token).
        self.image_token: str = f"<|vision_start|>{processor.image_token}<|vision_end|>"
        self.image_token_id: int = processor.image_token_id
        self.merge: int = processor.image_processor.merge_size

    @classmethod
    def from_pretrained(cls, model_path: str) -> Qwen2VLInputs:
        return cls(load_processor(model_path))

    def __call__(self, text: str, images: list[LoadedImage]) -> ProcessedPrompt:
        out = self.processor(text=[text], images=[im.image for im in images], return_tensors="pt")
        ids: list[int] = out["input_ids"][0].tolist()
        grids = out["image_grid_thw"]  # [images, 3]: the patch grid of each image
        runs = self._runs(ids)
        if len(runs) != len(images):
            raise RequestError(
                "images",
                f"{len(images)} images",
                f"the prompt's expanded image tokens hold {len(runs)} images",
            )
        items, patch, placed = [], 0, []
        for image, (start, end), grid in zip(images, runs, grids):
            t, h, w = grid.tolist()
            merged = (t, h // self.merge, w // self.merge)
            if end - start != t * h * w // self.merge**2:
                raise RuntimeError(
                    f"Qwen2-VL: {end - start} image tokens at {start} for a {t}x{h}x{w} patch grid"
                )
            pixels = {
                "pixel_values": out["pixel_values"][patch : patch + t * h * w],
                "image_grid_thw": grid,
            }
            patch += t * h * w
            items.append(
                ImageItem(
                    image.content_hash, list(range(start, end)), pixels, meta={"grid": merged}
                )
            )
            placed.append((start, merged))
        positions, delta = mrope_positions(len(ids), placed)
        return ProcessedPrompt(ids, items, mrope_positions=positions, mrope_delta=delta)

    def _runs(self, ids: list[int]) -> list[tuple[int, int]]:
        """The runs of image tokens (one per image: the processor wraps each in
        ``<|vision_start|>`` / ``<|vision_end|>``)."""
        return token_runs(ids, self.image_token_id)


def load_processor(model_path: str) -> Any:
    """The model's processor. Its video processor needs torchvision; without it, the
    processor is built from the tokenizer and image processor alone (images need no more)."""
    import transformers

    try:
        return transformers.AutoProcessor.from_pretrained(model_path, local_files_only=True)
    except ImportError:
        pass
    config = transformers.AutoConfig.from_pretrained(model_path, local_files_only=True)
    base = getattr(transformers, _PROCESSOR_CLASSES[config.architectures[0]])

    class ImageProcessorOnly(base):
        def __init__(self, image_processor: Any, tokenizer: Any, chat_template: Any = None):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template)

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    image_processor = transformers.AutoImageProcessor.from_pretrained(
        model_path, local_files_only=True
    )
    return ImageProcessorOnly(image_processor, tokenizer, chat_template=tokenizer.chat_template)


def vision_model(hf_model: nn.Module) -> Qwen2VLVision:
    return Qwen2VLVision.from_hf(hf_model)


def image_inputs(model_path: str) -> Qwen2VLInputs:
    return Qwen2VLInputs.from_pretrained(model_path)
