"""The vision-language families plait runs, by ``config.json`` architecture.

A family's module (``runtime/models/<family>.py``) holds its image side and its
processor; the language model always runs on plait's own model code, fed the
checkpoint's ``text_config`` and the tensors under ``lm_prefix``. A family module
exports two functions:

    vision_model(hf_model) -> VisionModel     # encoder + connector, with their weights
    image_inputs(model_path) -> ImageInputs   # the model's own processor behind one call

To add a family: write its module, add a ``VisionFamily`` line below, and give
``tests/tiny_models.py`` a tiny random model of it to test against transformers.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class VisionFamily:
    architecture: str  # the config's first ``architectures`` entry
    module: str  # the module exporting vision_model() and image_inputs()
    lm_prefix: str  # the language model's tensors in the checkpoint, e.g. "model.text_model."

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)


VISION_FAMILIES: dict[str, VisionFamily] = {
    f.architecture: f
    for f in (
        VisionFamily(
            "Idefics3ForConditionalGeneration",
            "plait.runtime.models.idefics3",
            "model.text_model.",
        ),
        VisionFamily(
            "LlavaForConditionalGeneration",
            "plait.runtime.models.llava",
            "model.language_model.",
        ),
        VisionFamily(
            "Qwen2VLForConditionalGeneration",
            "plait.runtime.models.qwen2_vl",
            "model.language_model.",
        ),
        VisionFamily(
            "Qwen2_5_VLForConditionalGeneration",
            "plait.runtime.models.qwen2_vl",
            "model.language_model.",
        ),
    )
}
