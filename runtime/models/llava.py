"""LLaVA: the image side (transformers' modules) and its processor.

``LlavaForConditionalGeneration`` is a CLIP or SigLIP vision encoder, a two-layer
MLP projector and a Llama / Mistral / Qwen2 language model. The language model
runs on plait's own code (models/llama.py, fed ``text_config``); this module
holds the rest:

- ``LlavaVision``: the checkpoint's ``vision_tower`` and ``multi_modal_projector``.
  An image's features are the encoder's hidden states at ``vision_feature_layer``
  (one layer, or several concatenated along the hidden axis), without the CLS
  row under the ``"default"`` strategy and with it under ``"full"``; the
  projector maps each row to the language model's hidden size.
- ``LlavaInputs``: the model's own ``LlavaProcessor`` (AutoProcessor from the
  model directory), so pixel values and the number of ``<image>`` tokens equal
  transformers'. Each ``<image>`` in the prompt expands to the same number of
  ``<image>`` tokens (one per feature row), so the expanded ids are cut per image
  by counting: the first ``n`` image tokens are image 0's, the next ``n`` image
  1's, even where two images stand side by side.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from plait.multimodal.image import LoadedImage
from plait.multimodal.vision import ImageItem, ProcessedPrompt
from plait.runtime.errors import RequestError


class LlavaVision(nn.Module):
    """Vision tower + multi-modal projector (transformers' modules and weights)."""

    def __init__(
        self,
        vision_tower: nn.Module,
        projector: nn.Module,
        feature_layer: int | list[int],
        select_strategy: str,
    ):
        super().__init__()
        if select_strategy not in ("default", "full"):
            raise ValueError(f"LLaVA: unknown vision_feature_select_strategy {select_strategy!r}")
        self.vision_tower = vision_tower
        self.projector = projector
        self.feature_layer = feature_layer
        self.select_strategy = select_strategy

    @classmethod
    def from_hf(cls, hf_model: nn.Module) -> LlavaVision:
        """Take the image side of a loaded ``LlavaForConditionalGeneration``."""
        inner, config = hf_model.model, hf_model.config
        return cls(
            inner.vision_tower,
            inner.multi_modal_projector,
            config.vision_feature_layer,
            config.vision_feature_select_strategy,
        )

    @torch.inference_mode()
    def encode(self, pixels: list[dict[str, Any]]) -> list[torch.Tensor]:
        """All the images in one encoder pass (as transformers' ``get_image_features``
        does for one prompt); one ``[feature rows, lm_hidden]`` tensor per image."""
        param = next(self.parameters())
        values = torch.cat([p["pixel_values"] for p in pixels]).to(param.device, param.dtype)
        layers = self.feature_layer
        chosen = [layers] if isinstance(layers, int) else list(layers)
        # Only the chosen layers' hidden states are kept (transformers' selection by index;
        # as a list, so that layer 0 is not taken for "no hidden states").
        out = self.vision_tower(values, output_hidden_states=chosen, return_dict=True)
        states = [out.hidden_states[i] for i in chosen]
        if self.select_strategy == "default":  # drop the CLS row
            states = [s[:, 1:] for s in states]
        features = self.projector(torch.cat(states, dim=-1))  # [images, rows, lm_hidden]
        counts = [p["pixel_values"].shape[0] for p in pixels]
        return [f.reshape(-1, f.shape[-1]) for f in features.split(counts)]


class LlavaInputs:
    """The model's LlavaProcessor behind the ImageInputs call."""

    def __init__(self, processor: Any):
        if getattr(processor, "patch_size", None) is None:
            # Older processor configs left the expansion to the model; transformers 5's
            # processor needs it to know how many <image> tokens an image takes.
            raise ValueError(
                "LLaVA: the processor has no patch_size (processor_config.json); set it and "
                "vision_feature_select_strategy to the model config's values"
            )
        self.processor = processor
        self.image_token: str = processor.image_token
        self.image_token_id: int = processor.image_token_id

    @classmethod
    def from_pretrained(cls, model_path: str) -> LlavaInputs:
        import transformers

        return cls(transformers.AutoProcessor.from_pretrained(model_path, local_files_only=True))

    def __call__(self, text: str, images: list[LoadedImage]) -> ProcessedPrompt:
        out = self.processor(text=[text], images=[im.image for im in images], return_tensors="pt")
        ids: list[int] = out["input_ids"][0].tolist()
        values = out["pixel_values"]  # [images, 3, H, W]
        positions = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if values.shape[0] != len(images) or len(positions) % len(images):
            raise RequestError(
                "images",
                f"{len(images)} images",
                f"the prompt's expanded {self.image_token!r} tokens ({len(positions)}) do not "
                f"divide among {len(images)} images",
            )
        per_image = len(positions) // len(images)
        items = [
            ImageItem(
                image.content_hash,
                positions[j * per_image : (j + 1) * per_image],
                {"pixel_values": values[j : j + 1]},
            )
            for j, image in enumerate(images)
        ]
        return ProcessedPrompt(ids, items)


def vision_model(hf_model: nn.Module) -> LlavaVision:
    return LlavaVision.from_hf(hf_model)


def image_inputs(model_path: str) -> LlavaInputs:
    return LlavaInputs.from_pretrained(model_path)
