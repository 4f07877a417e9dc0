"""``plait bench engine``: plait against HF transformers on the same model, in
the same process, with the same thread count.

Figures: single-stream decode tok/s, prefill tok/s on a ~1k-token prompt,
batch 8 and batch 32 aggregate decode tok/s, the ratios, and the peak RSS of
the plait runs (measured before HF is loaded) against the KV budget.
"""

from __future__ import annotations

import argparse
from typing import Any

from plait.bench.common import (
    engine_options,
    hf_generate,
    load_hf_model,
    load_hf_tokenizer,
    peak_rss_mb,
    set_threads,
    timed,
)

WORKLOADS = {"engine": "raw speed: decode, prefill and batched decode against HF transformers"}

STORY = (
    "The old lighthouse keeper climbed the spiral stairs every evening, counting the steps "
    "as his father had taught him, and at the top he wiped the salt from the great lens. "
)
TOPICS = [
    "the history of bread",
    "how bees communicate",
    "the rules of chess",
    "volcanoes",
    "the water cycle",
    "why the sky is blue",
    "the first computers",
    "how to plant a tree",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The engine bench has no flags beyond the shared ones."""


def matmul_params(model: Any) -> int:
    """Weights multiplied per token: every linear layer (weight and bias) of ``model``;
    the embedding is only a lookup."""
    return sum(
        m.in_features * m.out_features + (m.bias.numel() if m.bias is not None else 0)
        for m in model.modules()
        if hasattr(m, "in_features") and hasattr(m, "out_features")
    )


def _prompts(n: int) -> list[str]:
    return [f"Write a short essay about {TOPICS[i % len(TOPICS)]} (part {i}):" for i in range(n)]


def bench_plait(
    engine: Any, long_prompt: str, new_tokens: int, batch_tokens: int
) -> dict[str, float]:
    greedy = {"temperature": 0, "ignore_eos": True}
    engine.generate("warm up", {**greedy, "max_new_tokens": 4})
    r: dict[str, float] = {}
    t = timed(lambda: engine.generate("Once upon a time", {**greedy, "max_new_tokens": new_tokens}))
    r["single"] = new_tokens / t
    n_long = len(engine.tokenizer.encode(long_prompt))
    t = timed(lambda: engine.generate(long_prompt, {**greedy, "max_new_tokens": 1}))
    r["prefill"] = n_long / t
    for bs in (8, 32):
        t = timed(
            lambda bs=bs: engine.generate(_prompts(bs), {**greedy, "max_new_tokens": batch_tokens})
        )
        r[f"batch{bs}"] = bs * batch_tokens / t
    return r


def bench_hf(
    model: Any, tok: Any, long_prompt: str, new_tokens: int, batch_tokens: int
) -> dict[str, float]:
    import torch

    def gen(prompts: list[str], n: int) -> None:
        enc = tok(prompts, return_tensors="pt", padding=True)
        hf_generate(model, enc.input_ids, n, tok.pad_token_id, attention_mask=enc.attention_mask)

    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    gen(["warm up"], 4)
    r: dict[str, float] = {}
    r["single"] = new_tokens / timed(lambda: gen(["Once upon a time"], new_tokens))
    ids = tok(long_prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        r["prefill"] = ids.shape[1] / timed(lambda: model(ids))
    for bs in (8, 32):
        r[f"batch{bs}"] = bs * batch_tokens / timed(lambda bs=bs: gen(_prompts(bs), batch_tokens))
    return r


def main(args: argparse.Namespace) -> int:
    from plait.runtime.engine import Engine

    threads = set_threads(args.threads)
    new_tokens, batch_tokens = (16, 8) if args.quick else (128, 64)
    kwargs = engine_options(args, threads)
    engine = Engine(model=args.model, **kwargs)
    params = matmul_params(engine.runner.model)
    long_prompt = STORY * max(1, 1024 // len(engine.tokenizer.encode(STORY)))
    kv_mb = engine.runner.kv_pool.nbytes / 2**20
    plait_r = bench_plait(engine, long_prompt, new_tokens, batch_tokens)
    rss = peak_rss_mb()
    model_path = engine.source.model_path
    engine.shutdown()
    del engine

    print(f"model: {args.model} ({model_path})")
    print(
        f"torch threads: {threads}; device: {args.device or 'auto'}; dtype: {args.dtype or 'auto'}"
    )
    print(
        f"new tokens: single {new_tokens}, batched {batch_tokens} per request; prefill prompt "
        f"~{len(long_prompt) // 4} chars"
    )
    hf_r: dict[str, float] | None = None
    if not args.skip_hf:
        hf = load_hf_model(model_path)
        tok = load_hf_tokenizer(model_path)
        hf_r = bench_hf(hf, tok, long_prompt, new_tokens, batch_tokens)
    labels = {
        "single": "single-stream decode tok/s",
        "prefill": "prefill tok/s (~1k prompt)",
        "batch8": "batch 8 aggregate tok/s",
        "batch32": "batch 32 aggregate tok/s",
    }
    print(f"{'':30s} {'plait':>10s} {'HF':>10s} {'ratio':>8s}")
    for key, label in labels.items():
        if hf_r:
            print(
                f"{label:30s} {plait_r[key]:10.1f} {hf_r[key]:10.1f} {plait_r[key] / hf_r[key]:7.2f}x"
            )
        else:
            print(f"{label:30s} {plait_r[key]:10.1f}")
    print(
        f"plait peak RSS: {rss:.0f} MiB (KV budget {kv_mb:.0f} MiB; goal < 1536 MiB + budget"
        f" = {1536 + kv_mb:.0f} MiB)"
    )
    _bandwidth_ceiling(params, plait_r["single"])
    _compute_ceiling(params, plait_r["batch32"])
    return 0


def gemm_gflops(size: int = 2048, reps: int = 5) -> float:
    """Best-of-``reps`` throughput of a square fp32 matmul: what this CPU's cores can do."""
    import torch

    a = torch.randn(size, size)
    b = torch.randn(size, size)
    a @ b
    best = min(timed(lambda: a @ b) for _ in range(reps))
    return 2 * size**3 / best / 1e9


def read_gbps(mib: int = 512, reps: int = 3) -> float:
    """Best-of-``reps`` rate of summing a tensor far larger than the caches: the
    memory bandwidth one decode step can use to read the weights."""
    import torch

    x = torch.ones(mib * 2**20 // 4)
    x.sum()
    best = min(timed(x.sum) for _ in range(reps))
    return x.numel() * 4 / best / 1e9


def _bandwidth_ceiling(params: int, single: float) -> None:
    """Single-stream decode is bandwidth-bound: every token reads every weight once."""
    gbps = read_gbps()
    ceiling = gbps * 1e9 / (params * 4)
    print(
        f"memory read here: {gbps:.1f} GB/s; one token reads {params * 4 / 2**20:.0f} MiB of "
        f"fp32 weights -> at most {ceiling:.1f} tok/s single-stream in fp32; plait reaches "
        f"{single / ceiling:.0%} of that"
    )


def _compute_ceiling(params: int, batch32: float) -> None:
    """Batched decode is compute-bound: each token needs 2 FLOPs per weight of the
    matmuls, so the matmul peak caps the aggregate tokens/s of any fp32 runtime."""
    peak = gemm_gflops()
    step_gflop = 2 * params * 32 / 1e9
    ceiling = peak / step_gflop * 32
    print(
        f"fp32 matmul peak here: {peak:.0f} GFLOPS (2048^3); a batch-32 decode step is "
        f"{step_gflop:.1f} GFLOP of matmuls -> at most {ceiling:.0f} tok/s in fp32; "
        f"plait reaches {batch32 / ceiling:.0%} of that"
    )
