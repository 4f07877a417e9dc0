"""plait's benchmarks, one module per benchmark, run as ``plait bench WORKLOAD``.

``WORKLOADS`` maps each workload name to the module that runs it and a one-line
help. The command line reads this table to build its choices and help, and
imports a module only when its workload runs (or its ``--help`` is asked for),
so ``plait generate`` and ``plait serve`` load no benchmark code.

Every module named here exports ``WORKLOADS`` (its names and the same one-line
helps, checked by a test), ``add_arguments(parser)`` (its own flags, besides the
model, engine, ``--quick`` and ``--skip-hf`` flags that all share) and
``main(args)``. ``common`` holds what they share: threads, Engine options,
timers and the HF transformers baseline.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import NamedTuple


class Workload(NamedTuple):
    module: str  # the module that runs it
    help: str  # one line, for ``plait bench --help``


WORKLOADS: dict[str, Workload] = {
    "engine": Workload(
        "plait.bench.engine",
        "raw speed: decode, prefill and batched decode against HF transformers",
    ),
    "few-shot": Workload(
        "plait.bench.prefix",
        "prefix reuse: questions after one shared ~1k-token few-shot prefix",
    ),
    "multi-turn": Workload(
        "plait.bench.prefix", "prefix reuse: chats advancing together turn by turn"
    ),
    "fork": Workload("plait.bench.prefix", "prefix reuse: a tree of thought, each level one batch"),
    "prefix": Workload(
        "plait.bench.prefix", "prefix reuse: few-shot, multi-turn and fork in one run"
    ),
    "grammar": Workload(
        "plait.bench.grammar",
        "constrained decoding: coverage, overhead, jump-forward, closing, peers",
    ),
    "programs": Workload(
        "plait.bench.programs",
        "DSL programs (run_batch) against HF one by one and the null cache",
    ),
    "server": Workload(
        "plait.bench.server",
        "HTTP serving: concurrent chat clients against plait serve and in-process",
    ),
    "kernels": Workload(
        "plait.bench.kernels", "the fused CPU kernels against the torch ops they replace"
    ),
    "memory": Workload("plait.bench.memory", "resident memory under a steady chat load"),
    "vision": Workload(
        "plait.bench.vision", "images in: multi-turn image chat and repeated images against HF"
    ),
    "image-chat": Workload(
        "plait.bench.image_chat",
        "images out: image prompt after a long chat, diffusion overhead, batching, memory",
    ),
}


def load(name: str) -> ModuleType:
    """The module that runs workload ``name`` (imported now, if it was not yet)."""
    if name not in WORKLOADS:
        raise ValueError(f"workload={name!r}: known: {list(WORKLOADS)}")
    return importlib.import_module(WORKLOADS[name].module)
