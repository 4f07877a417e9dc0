"""Peer side of ``plait bench grammar``: time outlines and guidance on the same model.

Standalone on purpose: it runs under a *separate* Python environment (the
peers pin other releases of llguidance / outlines-core than plait does), so it
imports neither plait nor anything from this repository::

    /tmp/peer-venv/bin/python bench/grammar_peer_child.py SPEC.json

``SPEC.json`` (written by grammar_peer.py) names the model directory (HF
safetensors), the thread count, the prompts of each workload (chat template
already applied; a distinct prompt per call, so no runtime can replay a cached
whole prompt), the JSON schema, the choices and ``max_new_tokens`` per
workload. Each library that imports uses the model loaded with transformers
(fp32, greedy), compiles each constraint once where its API allows (that setup
time is reported apart), warms up on the first prompt, then times one call per
remaining prompt.
The last stdout line is a JSON object: ``{"results": [...], "errors": {...}}``.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import traceback
from typing import Any


def _time_calls(fn, prompts: list[str]) -> tuple[list[float], Any]:
    """Warm up on ``prompts[0]``, then time one call per remaining prompt."""
    fn(prompts[0])
    times, out = [], None
    for prompt in prompts[1:]:
        t0 = time.perf_counter()
        out = fn(prompt)
        times.append(time.perf_counter() - t0)
    return times, out


def _summary(times: list[float], text: str, tokens: int, setup_s: float) -> dict[str, Any]:
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "all_s": times,
        "text": text,
        "tokens": tokens,
        "setup_s": setup_s,
    }


def run_outlines(hf: Any, tok: Any, spec: dict) -> dict[str, Any]:
    from typing import Literal

    import outlines

    model = outlines.from_transformers(hf, tok)
    t0 = time.perf_counter()
    json_gen = outlines.Generator(model, outlines.types.JsonSchema(json.dumps(spec["schema"])))
    json_setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    select_gen = outlines.Generator(model, Literal[tuple(spec["choices"])])
    select_setup = time.perf_counter() - t0

    def call_json(prompt: str) -> str:
        return json_gen(prompt, max_new_tokens=spec["json_max_tokens"], do_sample=False)

    def call_select(prompt: str) -> str:
        return select_gen(prompt, max_new_tokens=spec["select_max_tokens"], do_sample=False)

    jt, jout = _time_calls(call_json, spec["json_prompts"])
    st, sout = _time_calls(call_select, spec["select_prompts"])
    return {
        "library": f"outlines {_version('outlines')} (outlines-core {_version('outlines_core')})",
        "json": _summary(jt, jout, len(tok.encode(jout, add_special_tokens=False)), json_setup),
        "select": _summary(st, sout, len(tok.encode(sout, add_special_tokens=False)), select_setup),
    }


def _patch_cache_crop() -> None:
    """guidance 0.3.1 calls ``Cache.crop(n)`` with the legacy meaning "keep n tokens";
    transformers 5 only takes a negative count of tokens to remove."""
    from transformers.cache_utils import Cache

    original = Cache.crop
    if getattr(original, "_legacy_shim", False):
        return

    def crop(self, n: int) -> None:
        if n > 0:  # legacy: the length to keep
            n = min(0, n - self.get_seq_length())
        original(self, n)

    crop._legacy_shim = True
    Cache.crop = crop


def run_guidance(hf: Any, tok: Any, spec: dict) -> dict[str, Any]:
    import guidance
    from guidance import models, select

    _patch_cache_crop()
    lm = models.Transformers(hf, tok)
    # guidance compiles lazily (per call, cached by llguidance): no separate setup step.

    def call_json(prompt: str) -> str:
        return (lm + prompt + guidance.json(name="out", schema=spec["schema"]))["out"]

    def call_select(prompt: str) -> str:
        return (lm + prompt + select(spec["choices"], name="out"))["out"]

    jt, jout = _time_calls(call_json, spec["json_prompts"])
    st, sout = _time_calls(call_select, spec["select_prompts"])
    return {
        "library": f"guidance {_version('guidance')} (llguidance {_version('llguidance')})",
        "json": _summary(jt, jout, len(tok.encode(jout, add_special_tokens=False)), 0.0),
        "select": _summary(st, sout, len(tok.encode(sout, add_special_tokens=False)), 0.0),
    }


def _version(dist: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def main(argv: list[str]) -> int:
    with open(argv[1]) as f:
        spec = json.load(f)
    import torch

    torch.set_num_threads(spec["threads"])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    hf = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    load_s = time.perf_counter() - t0
    results, errors = [], {}
    for name, fn in (("outlines", run_outlines), ("guidance", run_guidance)):
        if name not in spec.get("libraries", ["outlines", "guidance"]):
            continue
        try:
            with torch.inference_mode():
                results.append(fn(hf, tok, spec))
        except ImportError as e:
            errors[name] = f"not installed: {e}"
        except Exception as e:  # reported, not fatal: the other peer may still run
            traceback.print_exc(file=sys.stderr)
            errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    info = {"torch": torch.__version__, "transformers": _version("transformers"), "load_s": load_s}
    print(json.dumps({"results": results, "errors": errors, "info": info}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
