"""Model code. One implementation serves the whole Llama family."""

from __future__ import annotations

from plait.runtime.models.llama import SUPPORTED_ARCHITECTURES, LlamaFamilyModel

__all__ = ["SUPPORTED_ARCHITECTURES", "LlamaFamilyModel"]
