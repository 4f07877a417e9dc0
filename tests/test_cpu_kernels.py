"""The fused CPU kernels (kernels/cpu_ops.cpp) against their torch references.

The kernels must build on the machines plait supports: a build failure fails
here rather than silently falling back to the slower torch ops.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time

import pytest
import torch

from plait import kernels
from plait.kernels import cpu

ATOL = 2e-6


@pytest.fixture(scope="module")
def ops() -> kernels.KernelSet:
    assert cpu.load(), cpu.load_error()
    return cpu.compiled()


def strided_rows(t: int, width: int, extra: int, seed: int) -> torch.Tensor:
    """[t, width] rows that sit inside wider rows, like q/k/v inside a fused qkv output."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t, width + extra, generator=g)[:, :width]


@pytest.mark.parametrize("rows", [1, 5, 33])
def test_norms_equal_reference(ops, rows):
    w = torch.rand(576) + 0.5
    x = strided_rows(rows, 576, 64, 0)
    assert torch.allclose(ops.rms_norm(x, w, 1e-5), kernels.rms_norm_ref(x, w, 1e-5), atol=ATOL)

    delta = strided_rows(rows, 576, 32, 1)
    res_k = torch.randn(rows, 576)
    res_r = res_k.clone()
    y_k = ops.add_rms_norm(res_k, delta, w, 1e-6)
    y_r = kernels.add_rms_norm_ref(res_r, delta, w, 1e-6)
    assert torch.equal(res_k, res_r)  # the residual is updated in place, exactly
    assert torch.allclose(y_k, y_r, atol=ATOL)


@pytest.mark.parametrize("head_dim", [64, 12])  # 12: a half narrower than one SIMD vector
def test_rope_rotates_q_and_k_in_place_and_leaves_v(ops, head_dim):
    T, H, Hkv = 7, 4, 2
    width = (H + 2 * Hkv) * head_dim
    qkv_k = strided_rows(T, width, 16, 2)
    qkv_r = qkv_k.clone()
    before = qkv_k.clone()
    freqs = torch.rand(T, head_dim // 2) * 10
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    ops.rope_(qkv_k, cos, sin, H + Hkv, head_dim)
    kernels.rope_ref_(qkv_r, cos, sin, H + Hkv, head_dim)
    assert torch.allclose(qkv_k, qkv_r, atol=ATOL)
    rotated = (H + Hkv) * head_dim
    assert not torch.allclose(qkv_k[:, :rotated], before[:, :rotated])
    assert torch.equal(qkv_k[:, rotated:], before[:, rotated:])


def test_in_place_ops_reject_overlapping_rows(ops):
    w = torch.ones(8)
    shared = torch.randn(1, 8).expand(3, 8)  # three rows on the same memory
    with pytest.raises(RuntimeError, match="rows overlap"):
        ops.add_rms_norm(shared, torch.randn(3, 8), w, 1e-6)
    with pytest.raises(RuntimeError, match="w has 4 entries"):
        ops.add_rms_norm(torch.randn(3, 8), torch.randn(3, 8), torch.ones(4), 1e-6)


def test_silu_mul(ops):
    gate_up = strided_rows(9, 2 * 1536, 8, 3) * 4
    assert torch.allclose(
        ops.silu_mul(gate_up), kernels.silu_mul_ref(gate_up), atol=ATOL, rtol=1e-5
    )


def test_store_kv_writes_only_the_given_slots(ops):
    Hkv, D = 3, 64
    k = strided_rows(4, Hkv * D, 64, 4).view(4, Hkv, D)
    v = strided_rows(4, Hkv * D, 64, 5).view(4, Hkv, D)
    slots = torch.tensor([9, 2, 17, 5])
    pools = [torch.zeros(20, Hkv, D) for _ in range(4)]
    ops.store_kv(k, v, pools[0], pools[1], slots)
    kernels.store_kv_ref(k, v, pools[2], pools[3], slots)
    assert torch.equal(pools[0], pools[2]) and torch.equal(pools[1], pools[3])
    assert torch.equal(pools[0][17], k[2]) and pools[0][[0, 1, 3]].abs().sum() == 0
    with pytest.raises(RuntimeError, match="slot 20 outside the pool"):
        ops.store_kv(k, v, pools[0], pools[1], torch.tensor([1, 2, 3, 20]))


@pytest.mark.parametrize(
    ("H", "Hkv", "D", "window"),
    [(9, 3, 64, 0), (4, 4, 64, 0), (8, 2, 64, 5), (8, 2, 64, 300), (6, 2, 20, 0), (4, 2, 80, 0)],
)
def test_decode_attention_reads_the_pool_by_slot(ops, H, Hkv, D, window):
    # Lengths cross the kernel's 256-position chunks (merged afterwards); D=20 and D=80 are
    # not multiples of the register block (32 floats with AVX2), 20 not of the SIMD width.
    slots_total, ctx = 1400, 640
    g = torch.Generator().manual_seed(6)
    k_pool = torch.randn(slots_total, Hkv, D, generator=g)
    v_pool = torch.randn(slots_total, Hkv, D, generator=g)
    table = torch.zeros(6, ctx, dtype=torch.int64)
    seq_lens = torch.tensor([1, 17, 600, 263])
    rows = torch.tensor([4, 0, 2, 5])
    for b in range(4):  # scattered, distinct slots per sequence
        table[rows[b], : seq_lens[b]] = (
            torch.randperm(slots_total - 1, generator=g)[: seq_lens[b]] + 1
        )
    q = strided_rows(4, H * D, 3 * D, 7).view(4, H, D)
    got = ops.decode_attention(q, k_pool, v_pool, table, rows, seq_lens, D**-0.5, window)
    want = kernels.decode_attention_ref(q, k_pool, v_pool, table, rows, seq_lens, D**-0.5, window)
    assert torch.allclose(got, want, atol=1e-5)


def test_decode_attention_does_not_depend_on_the_thread_count(ops):
    """Work is split by (chunk, KV head) and merged per sequence in a fixed order, so the
    result is bitwise the same on one thread or several."""
    g = torch.Generator().manual_seed(8)
    k_pool, v_pool = torch.randn(2, 1300, 3, 64, generator=g)
    table = (torch.randperm(1299, generator=g) + 1)[:1200].view(2, 600)
    q = torch.randn(2, 9, 64, generator=g)
    args = (q, k_pool, v_pool, table, torch.tensor([0, 1]), torch.tensor([600, 333]), 0.125, 0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.decode_attention(*args)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(ops.decode_attention(*args), one)


def test_decode_attention_rejects_lengths_outside_the_table(ops):
    q = torch.randn(1, 2, 8)
    pool = torch.randn(10, 1, 8)
    table = torch.ones(1, 4, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="outside the table"):
        ops.decode_attention(q, pool, pool, table, torch.tensor([0]), torch.tensor([5]), 1.0, 0)


def test_kernel_set_picks_compiled_ops_for_cpu_float32_only(ops):
    assert kernels.kernel_set(torch.device("cpu"), torch.float32).fused
    assert not kernels.kernel_set(torch.device("cpu"), torch.bfloat16).fused
    assert kernels.kernel_set(torch.device("cpu"), torch.bfloat16) is kernels.REFERENCE


def test_a_failed_build_falls_back_to_the_torch_ops(ops, monkeypatch, tmp_path):
    monkeypatch.setattr(cpu, "_loaded", None)
    monkeypatch.setattr(cpu, "_load_error", None)
    monkeypatch.setattr(cpu, "_SOURCE", tmp_path / "missing_ops.cpp")
    assert kernels.kernel_set(torch.device("cpu"), torch.float32) is kernels.REFERENCE
    assert "missing_ops.cpp" in cpu.load_error()
    with pytest.raises(RuntimeError, match="could not be built"):
        cpu.compiled()


def test_bench_kernels_prints_every_op(ops, monkeypatch, capsys):
    import argparse

    from plait.bench import kernels as bench_kernels

    monkeypatch.setattr(bench_kernels, "time_us", lambda fn: (fn(), 1.0)[1])
    assert bench_kernels.main(argparse.Namespace(threads=torch.get_num_threads())) == 0
    out = capsys.readouterr().out
    assert out.count("decode attention") == 4 and out.count("rms_norm") == 2


def test_a_build_says_what_it_does_and_how_long_it_took(ops, monkeypatch, tmp_path, caplog):
    """A build is a silent half minute of C++ compiling: a load that takes longer than a
    library load is announced (INFO) while it runs, and its time logged at the end; a
    quick load (the library is built already) logs neither."""
    from torch.utils import cpp_extension

    def slow_load(**kwargs):  # the library itself is loaded already (the ops fixture)
        time.sleep(0.3)

    monkeypatch.setenv("PLAIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu, "_BUILD_NOTICE_AFTER_S", 0.05)
    monkeypatch.setattr(cpp_extension, "load", slow_load)
    with caplog.at_level(logging.INFO, logger="plait.kernels.cpu"):
        cpu._build()
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert messages[0].startswith("building plait's CPU kernels (")
    assert str(tmp_path / "kernels") in messages[0]
    assert re.fullmatch(r"built plait's CPU kernels in 0\.\d s", messages[1])

    caplog.clear()
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: None)
    with caplog.at_level(logging.INFO, logger="plait.kernels.cpu"):
        cpu._build()
    assert caplog.records == []


# ---- the seam: which set a model gets, and why ------------------------------------------------


def test_a_fallback_logs_one_line_saying_why(ops, caplog):
    with caplog.at_level(logging.INFO, logger="plait.kernels"):
        assert kernels.kernel_set("cpu", torch.bfloat16) is kernels.REFERENCE
        assert kernels.kernel_set("meta", torch.float32) is kernels.REFERENCE
        assert kernels.kernel_set("cpu", torch.float32, enabled=False) is kernels.REFERENCE
        assert kernels.kernel_set("cpu", torch.float32, enabled=True).fused  # no line
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("INFO", "torch reference kernels on cpu, bfloat16: plait CPU kernels are float32 only"),
        ("INFO", "torch reference kernels on meta, float32: no compiled kernels for meta"),
        ("INFO", "torch reference kernels on cpu, float32: compiled kernels turned off"),
    ]


def test_a_failed_build_is_a_warning_with_the_build_error(ops, monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(cpu, "_loaded", None)
    monkeypatch.setattr(cpu, "_load_error", None)
    monkeypatch.setattr(cpu, "_SOURCE", tmp_path / "missing_ops.cpp")
    with caplog.at_level(logging.INFO, logger="plait.kernels"):
        assert kernels.kernel_set("cpu", torch.float32) is kernels.REFERENCE
    (record,) = [r for r in caplog.records if r.name == "plait.kernels"]
    assert record.levelname == "WARNING"
    assert record.getMessage().startswith(
        "torch reference kernels on cpu, float32: plait CPU kernels could not be built: "
    )
    assert "missing_ops.cpp" in record.getMessage()


def run_python(code: str, **env: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


CHOSEN = (
    "import torch; from plait import kernels; "
    "print(kernels.kernel_set(torch.device('cpu'), torch.float32).fused)"
)


def test_plait_cpu_kernels_0_keeps_the_torch_references(ops):
    assert run_python(CHOSEN, PLAIT_CPU_KERNELS="0") == "False"
    assert run_python(CHOSEN, PLAIT_CPU_KERNELS="1") == "True"


def test_the_kernels_import_no_runtime_module(ops):
    """plait.kernels reads its switches from plait.switches: importing it, and building the
    CPU kernels' set, loads no plait.runtime module that ``import plait`` did not load."""
    code = (
        "import sys, torch, plait\n"
        "def runtime(): return {m for m in sys.modules if m.startswith('plait.runtime')}\n"
        "before = runtime()\n"
        "from plait import kernels\n"
        "from plait.kernels import cpu\n"
        "assert kernels.kernel_set('cpu', torch.float32).fused\n"
        "print(sorted(runtime() - before))\n"
    )
    assert run_python(code) == "[]"
