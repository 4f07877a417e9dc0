"""``plait bench kernels``: each fused CPU kernel (plait.kernels.cpu) against the
torch ops it replaces, at SmolLM2-135M's shapes (hidden 576, 9 query heads and
3 KV heads of 64, intermediate 1536), in the same process and thread count.

Decode attention is timed against what the ``torch`` backend does: gather
each sequence's K/V from the pool into a padded batch, then SDPA. K/V slots
are laid out as a serving pool lays them out: each sequence's run is
contiguous, sequences interleave.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from plait.bench.common import set_threads, time_us

WORKLOADS = {"kernels": "the fused CPU kernels against the torch ops they replace"}

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER = 576, 9, 3, 64, 1536


def _attention_case(batch: int, seq: int) -> tuple[Callable[[], object], Callable[[], object]]:
    import torch
    import torch.nn.functional as F

    from plait.kernels import cpu

    slots = batch * seq + 1
    k_pool = torch.randn(slots, KV_HEADS, HEAD_DIM)
    v_pool = torch.randn(slots, KV_HEADS, HEAD_DIM)
    table = (torch.arange(batch * seq) + 1).view(batch, seq).contiguous()
    rows = torch.arange(batch)
    lens = torch.full((batch,), seq)
    q = torch.randn(batch, HEADS, HEAD_DIM)
    scale = HEAD_DIM**-0.5
    ops = cpu.compiled()

    def fused():
        return ops.decode_attention(q, k_pool, v_pool, table, rows, lens, scale, 0)

    def gathered():
        idx = table.reshape(-1)
        k = k_pool.index_select(0, idx).view(batch, seq, KV_HEADS, HEAD_DIM).transpose(1, 2)
        v = v_pool.index_select(0, idx).view(batch, seq, KV_HEADS, HEAD_DIM).transpose(1, 2)
        qd = q.view(batch, 1, HEADS, HEAD_DIM).transpose(1, 2)
        return F.scaled_dot_product_attention(qd, k, v, scale=scale, enable_gqa=True)

    return fused, gathered


def _glue_cases(rows: int) -> dict[str, tuple[Callable[[], object], Callable[[], object]]]:
    import torch

    from plait import kernels
    from plait.kernels import cpu

    ops = cpu.compiled()
    x, delta, w = torch.randn(rows, HIDDEN), torch.randn(rows, HIDDEN), torch.rand(HIDDEN)
    qkv = torch.randn(rows, (HEADS + 2 * KV_HEADS) * HEAD_DIM)
    cos, sin = torch.rand(rows, HEAD_DIM), torch.rand(rows, HEAD_DIM)
    gate_up = torch.randn(rows, 2 * INTER)
    return {
        "add + rms_norm": (
            lambda: ops.add_rms_norm(x, delta, w, 1e-5),
            lambda: kernels.add_rms_norm_ref(x, delta, w, 1e-5),
        ),
        "rope (q and k heads)": (
            lambda: ops.rope_(qkv, cos, sin, HEADS + KV_HEADS, HEAD_DIM),
            lambda: kernels.rope_ref_(qkv, cos, sin, HEADS + KV_HEADS, HEAD_DIM),
        ),
        "silu(gate) * up": (lambda: ops.silu_mul(gate_up), lambda: kernels.silu_mul_ref(gate_up)),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The kernels bench has no flags beyond the shared ones."""


def main(args: argparse.Namespace) -> int:
    from plait.kernels import cpu

    threads = set_threads(args.threads)
    if not cpu.load():
        print(f"plait CPU kernels unavailable: {cpu.load_error()}")
        return 1
    print(f"torch threads: {threads}; float32; times are per call (one layer)")
    print(f"{'op':<34}{'fused us':>10}{'torch us':>10}{'speed-up':>10}")

    def row(name: str, fused: Callable[[], object], ref: Callable[[], object]) -> None:
        a, b = time_us(fused), time_us(ref)
        print(f"{name:<34}{a:>10.1f}{b:>10.1f}{b / a:>9.2f}x")

    for rows in (1, 32):
        for name, (fused, ref) in _glue_cases(rows).items():
            row(f"{name}, {rows} rows", fused, ref)
    for batch, seq in ((1, 1024), (8, 1024), (32, 64), (32, 512)):
        fused, gathered = _attention_case(batch, seq)
        row(f"decode attention, {batch} x {seq} tokens", fused, gathered)
    return 0
