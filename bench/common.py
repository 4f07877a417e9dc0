"""What every benchmark shares: the thread count, the Engine options taken from the
command line, timers, memory readings and the HF transformers baseline model.

Nothing here imports torch or the engine at import time, so the registry and
the command line stay light; each helper imports what it needs when called.
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from collections.abc import Callable
from dataclasses import fields
from typing import Any


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op thread count to ``threads`` (``--threads``; torch's own
    count when None) and return it; every benchmark prints it in its header."""
    import torch

    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    return threads


# The command line's name for an EngineConfig field, where the two differ.
_FLAG_NAMES = {"num_threads": "threads"}


def engine_options(args: argparse.Namespace, threads: int, **overrides: Any) -> dict[str, Any]:
    """Engine options from the model-and-engine flags the bench shares with ``plait
    generate`` and ``plait serve``: every EngineConfig field that has a flag, read
    from ``args`` (``model`` and ``log_level`` are left out: the model is passed
    on its own and the log level is the command's), then ``overrides``."""
    from plait.runtime.config import EngineConfig

    options: dict[str, Any] = {}
    for f in fields(EngineConfig):
        flag = _FLAG_NAMES.get(f.name, f.name)
        if f.name not in ("model", "log_level") and hasattr(args, flag):
            options[f.name] = getattr(args, flag)
    options["num_threads"] = threads
    options.update(overrides)
    return options


def timed(fn: Callable[[], object]) -> float:
    """Wall seconds of one call of ``fn``."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_us(fn: Callable[[], object], min_seconds: float = 0.3) -> float:
    """Microseconds per call of ``fn``: three warm-up calls, then as many calls as
    fit in ``min_seconds``."""
    for _ in range(3):
        fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_seconds:
        fn()
        n += 1
    return (time.perf_counter() - t0) / n * 1e6


def cpu_seconds() -> float:
    """This process's CPU time so far (user + system, all threads)."""
    t = os.times()
    return t.user + t.system


def peak_rss_mb() -> float:
    """The peak resident memory of this process so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mib() -> float:
    """The resident memory of this process now, in MiB (Linux; NaN elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


# ---- the HF transformers baseline -----------------------------------------------------------


def load_hf_model(model_path: str) -> Any:
    """The model at ``model_path`` loaded by HF transformers in fp32, in eval mode:
    the baseline the benchmarks compare plait against."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()


def load_hf_tokenizer(model_path: str) -> Any:
    """HF transformers' tokenizer for the model at ``model_path``."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


def hf_generate(model: Any, ids: Any, n: int, pad_token_id: int, **inputs: Any) -> Any:
    """Greedy HF ``generate`` of exactly ``n`` new tokens (no early stop at EOS), as
    plait's runs decode with ``ignore_eos``; ``inputs`` go along (an attention mask)."""
    return model.generate(
        input_ids=ids,
        **inputs,
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        pad_token_id=pad_token_id,
    )
