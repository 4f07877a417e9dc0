"""plait: a structured-generation agent runtime with a Python frontend DSL.

``import plait as pl`` gives the language; the runtime behind it is imported
only when first used.
"""

from __future__ import annotations

from plait.runtime.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["Engine", "SamplingParams", "__version__"]


def __getattr__(name: str):
    if name == "Engine":
        from plait.runtime.engine import Engine

        return Engine
    raise AttributeError(f"module 'plait' has no attribute {name!r}")
