"""Idefics3 / SmolVLM: the image side (transformers' modules) and its processor.

``Idefics3ForConditionalGeneration`` is a SigLIP vision encoder, a pixel-shuffle
connector and a Llama language model. The language model runs on plait's own
code (models/llama.py, fed ``text_config``); this module holds the rest:

- ``Idefics3Vision``: transformers' ``Idefics3VisionTransformer`` and
  ``Idefics3Connector`` with the checkpoint's weights. An image is a list of
  tiles (``rows x cols`` crops plus a global view, or one view for a small
  image); each tile gives ``image_seq_len`` embedding rows.
- ``Idefics3Inputs``: the model's own ``Idefics3Processor`` (AutoProcessor from
  the model directory), so pixel values and the placement of ``<image>`` tokens
  equal transformers'. Each ``<image>`` in the prompt expands to

      [<fake_token_around_image> <row_i_col_j> <image> x image_seq_len] per tile, "\\n" per row,
      "\\n" <fake_token_around_image> <global-img> <image> x image_seq_len <fake_token_around_image>

  (just the last line for an unsplit image), so every image ends with the run
  after ``<global-img>``: that is how the expanded ids are cut per image.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from plait.multimodal.image import LoadedImage
from plait.multimodal.vision import ImageItem, ProcessedPrompt, token_runs
from plait.runtime.errors import RequestError


class Idefics3Vision(nn.Module):
    """SigLIP encoder + pixel-shuffle connector (transformers' modules and weights)."""

    def __init__(self, vision_model: nn.Module, connector: nn.Module, patch_size: int):
        super().__init__()
        self.vision_model = vision_model
        self.connector = connector
        self.patch_size = patch_size

    @classmethod
    def from_hf(cls, hf_model: nn.Module) -> Idefics3Vision:
        """Take the image side of a loaded ``Idefics3ForConditionalGeneration``."""
        inner = hf_model.model
        return cls(inner.vision_model, inner.connector, hf_model.config.vision_config.patch_size)

    @torch.inference_mode()
    def encode(self, pixels: list[dict[str, Any]]) -> list[torch.Tensor]:
        """All tiles of all the images in one encoder pass (as transformers'
        ``get_image_features`` does for one prompt); one ``[tiles * image_seq_len,
        lm_hidden]`` tensor per image."""
        param = next(self.parameters())
        values = torch.cat([p["pixel_values"] for p in pixels]).to(param.device, param.dtype)
        if all("pixel_attention_mask" in p for p in pixels):
            mask = torch.cat([p["pixel_attention_mask"] for p in pixels]).to(param.device)
        else:
            mask = torch.ones(values.shape[0], *values.shape[2:], device=param.device)
        # A patch takes part in attention when any of its pixels is real (not padding).
        size = self.patch_size
        patches = mask.unfold(1, size, size).unfold(2, size, size)
        patch_mask = patches.sum(dim=(-1, -2)) > 0
        hidden = self.vision_model(
            pixel_values=values, patch_attention_mask=patch_mask, return_dict=True
        )
        features = self.connector(hidden.last_hidden_state)  # [tiles, image_seq_len, lm_hidden]
        counts = [p["pixel_values"].shape[0] for p in pixels]
        return [f.reshape(-1, f.shape[-1]) for f in features.split(counts)]


class Idefics3Inputs:
    """The model's Idefics3Processor behind the ImageInputs call."""

    def __init__(self, processor: Any):
        self.processor = processor
        self.image_token: str = processor.image_token
        self.image_token_id: int = processor.image_token_id
        self.global_token_id: int = processor.global_image_token_id
        self.image_seq_len: int = processor.image_seq_len

    @classmethod
    def from_pretrained(cls, model_path: str) -> Idefics3Inputs:
        import transformers

        return cls(transformers.AutoProcessor.from_pretrained(model_path, local_files_only=True))

    def __call__(self, text: str, images: list[LoadedImage]) -> ProcessedPrompt:
        out = self.processor(text=[text], images=[[im.image for im in images]], return_tensors="pt")
        ids: list[int] = out["input_ids"][0].tolist()
        values = out["pixel_values"][0]  # [tiles of all images, 3, H, W]
        mask = out.get("pixel_attention_mask")
        groups = self._runs_per_image(ids, len(images))
        items, tile = [], 0
        for image, runs in zip(images, groups):
            pixels = {"pixel_values": values[tile : tile + len(runs)]}
            if mask is not None:
                pixels["pixel_attention_mask"] = mask[0, tile : tile + len(runs)]
            tile += len(runs)
            positions = [i for start, end in runs for i in range(start, end)]
            items.append(
                ImageItem(image.content_hash, positions, pixels, meta={"tiles": len(runs)})
            )
        if tile != values.shape[0]:
            raise RuntimeError(f"Idefics3: {tile} tile runs in the ids, {values.shape[0]} tiles")
        return ProcessedPrompt(ids, items)

    def _runs_per_image(self, ids: list[int], num_images: int) -> list[list[tuple[int, int]]]:
        """The runs of image tokens, one per tile, grouped by image: an image's last
        run is its global view, the one after ``<global-img>``."""
        runs = token_runs(ids, self.image_token_id)
        groups: list[list[tuple[int, int]]] = [[]]
        for start, end in runs:
            if end - start != self.image_seq_len:
                raise RuntimeError(
                    f"Idefics3: a run of {end - start} image tokens at {start}; "
                    f"expected image_seq_len={self.image_seq_len}"
                )
            groups[-1].append((start, end))
            if start > 0 and ids[start - 1] == self.global_token_id:
                groups.append([])
        if groups.pop():  # after the last image's global view, nothing is left
            raise RuntimeError("Idefics3: image tokens after the last <global-img> view")
        if len(groups) != num_images:
            raise RequestError(
                "images",
                f"{num_images} images",
                f"the prompt's expanded {self.image_token!r} tokens hold {len(groups)} images",
            )
        return groups


def vision_model(hf_model: nn.Module) -> Idefics3Vision:
    return Idefics3Vision.from_hf(hf_model)


def image_inputs(model_path: str) -> Idefics3Inputs:
    return Idefics3Inputs.from_pretrained(model_path)
