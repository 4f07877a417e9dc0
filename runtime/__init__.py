"""plait.runtime: engine, scheduler, model runner, models, sampling, server, CLI."""

from __future__ import annotations

from plait.runtime.errors import RequestError
from plait.runtime.inputs import GenerateInput
from plait.runtime.sampling_params import SamplingParams, SamplingParamsError

__all__ = ["Engine", "GenerateInput", "RequestError", "SamplingParams", "SamplingParamsError"]


def __getattr__(name: str):
    if name == "Engine":  # imported lazily: it pulls in transformers
        from plait.runtime.engine import Engine

        return Engine
    raise AttributeError(name)
