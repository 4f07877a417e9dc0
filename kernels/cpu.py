"""Fused CPU kernels for the decoder-layer glue, each beside its torch reference.

``cpu_ops.cpp`` (beside this file) is built once per machine with torch's C++
extension tooling into ``<plait cache dir>/kernels/`` and registers its ops
as ``torch.ops.plait_cpu.*``. ``kernel_set(device, dtype)`` picks, once per
model, either those ops (CPU, float32) or the torch references below, which
run anywhere and are what the tests hold the kernels to. ``PLAIT_CPU_KERNELS=0``
keeps the references.

    rms_norm(x, w, eps) -> y
    add_rms_norm(residual, delta, w, eps) -> y   residual += delta, y = norm(residual)
    rope_(qkv, cos, sin, n_heads, head_dim)      rotate the first n_heads heads in place
    silu_mul(gate_up) -> silu(gate) * up
    store_kv(k, v, k_pool, v_pool, slots)        write new K/V rows into the pool
    decode_attention(q, k_pool, v_pool, table, rows, seq_lens, scale, window) -> o

``cos``/``sin`` are per-token rows [T, head_dim] (see RotaryEmbedding).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import pathlib
import sys
import sysconfig
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

_SOURCE = pathlib.Path(__file__).with_name("cpu_ops.cpp")
_lock = threading.Lock()
_BUILD_NOTICE_AFTER_S = 1.0  # a load slower than this is a build, and is announced
_loaded: bool | None = None
_load_error: str | None = None


# ---- torch references -------------------------------------------------------------------------


def rms_norm_ref(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return w * y.to(x.dtype)


def add_rms_norm_ref(
    residual: torch.Tensor, delta: torch.Tensor, w: torch.Tensor, eps: float
) -> torch.Tensor:
    residual.add_(delta)
    return rms_norm_ref(residual, w, eps)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in the "rotate half" layout; x [..., D], cos/sin broadcast to it."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rope_ref_(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int, head_dim: int
) -> None:
    x = qkv[:, : n_heads * head_dim].view(qkv.shape[0], n_heads, head_dim)
    x.copy_(rotate(x, cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)))


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def store_kv_ref(
    k: torch.Tensor,
    v: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    k_pool[slots] = k
    v_pool[slots] = v


def decode_attention_ref(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    table: torch.Tensor,
    rows: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    window: int,
) -> torch.Tensor:
    """One query token per sequence over its slots in the table: the plain loop."""
    B, H, D = q.shape
    out = q.new_empty(B, H * D)
    for b in range(B):
        n = int(seq_lens[b])
        slots = table[rows[b], max(0, n - window) if window > 0 else 0 : n]
        keys, vals = k_pool[slots].transpose(0, 1), v_pool[slots].transpose(0, 1)  # [Hkv, n, D]
        o = F.scaled_dot_product_attention(
            q[b][:, None, :], keys, vals, scale=scale, enable_gqa=keys.shape[0] != H
        )
        out[b] = o.reshape(H * D)
    return out


# ---- the compiled ops --------------------------------------------------------------------------


def _capability_flags() -> tuple[str, list[str]]:
    """The widest SIMD level this CPU has that ATen's Vectorized knows, and its compiler flags."""
    try:
        flags = set(pathlib.Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "avx512", [
            "-mavx512f",
            "-mavx512bw",
            "-mavx512vl",
            "-mavx512dq",
            "-mfma",
            "-DCPU_CAPABILITY=AVX512",
            "-DCPU_CAPABILITY_AVX512",
        ]
    if {"avx2", "fma"} <= flags:
        return "avx2", ["-mavx2", "-mfma", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return "default", []


def _build() -> tuple[pathlib.Path, str]:
    """Compile (or find compiled) and load the library; returns its build dir and SIMD level."""
    from torch.utils import cpp_extension

    from plait.runtime.loader import default_cache_dir

    cap, cap_flags = _capability_flags()
    cflags = ["-O3", "-fopenmp", *cap_flags]
    # One build per (source, flags, torch, python): an edited source never meets a stale .so.
    digest = hashlib.sha256(_SOURCE.read_bytes() + " ".join(cflags).encode()).hexdigest()[:12]
    py = f"py{sys.version_info[0]}{sys.version_info[1]}"
    build_dir = (
        default_cache_dir()
        / "kernels"
        / f"torch{torch.__version__.split('+')[0]}-{py}-{cap}-{digest}"
    )
    build_dir.mkdir(parents=True, exist_ok=True)
    # A venv's ninja (the `ninja` dependency) sits beside its python, maybe not on PATH.
    scripts = sysconfig.get_path("scripts")
    if scripts and scripts not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = scripts + os.pathsep + os.environ.get("PATH", "")
    # torch's own build lock is a plain file that a killed build leaves behind, after which
    # every later build waits on it forever. Builders take this flock first (the kernel drops
    # it when a process dies), so a torch lock file seen while holding it is stale.
    with open(build_dir / "plait-build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        (build_dir / "lock").unlink(missing_ok=True)
        # Loading a built library takes well under a second; past that, torch is compiling
        # (the first time on this machine, or after the source file changed), a silent half
        # minute that looks like a hang: say what is happening.
        started = time.perf_counter()
        announced = threading.Event()

        def announce() -> None:
            announced.set()
            logger.info(
                "building plait's CPU kernels (%s; once per machine, ~20-60 s) in %s ...",
                cap,
                build_dir,
            )

        notice = threading.Timer(_BUILD_NOTICE_AFTER_S, announce)
        notice.daemon = True
        notice.start()
        try:
            cpp_extension.load(
                name="plait_cpu_ops",
                sources=[str(_SOURCE)],
                extra_cflags=cflags,
                extra_ldflags=["-fopenmp"],
                build_directory=str(build_dir),
                is_python_module=False,
                verbose=False,
            )
        finally:
            notice.cancel()
            notice.join()
        if announced.is_set():
            logger.info("built plait's CPU kernels in %.1f s", time.perf_counter() - started)
    torch.ops.plait_cpu.silu_mul  # noqa: B018 - fails if the library did not register
    return build_dir, cap


def load() -> bool:
    """Build (first time on this machine) and load ``torch.ops.plait_cpu``; False, with the reason
    in ``load_error()``, where that is impossible (no C++ compiler, no ninja)."""
    global _loaded, _load_error
    with _lock:
        if _loaded is not None:
            return _loaded
        t0 = time.perf_counter()
        try:
            build_dir, cap = _build()
        except Exception as e:  # a missing compiler or source surfaces as several exception types
            _load_error = f"{type(e).__name__}: {e}".strip()[:2000]
            logger.warning("plait CPU kernels unavailable, using torch ops: %s", _load_error)
            _loaded = False
            return False
        logger.info(
            "plait CPU kernels (%s) ready in %.1f s: %s", cap, time.perf_counter() - t0, build_dir
        )
        _loaded = True
        return True


def load_error() -> str | None:
    return _load_error


@dataclass(frozen=True)
class KernelSet:
    """The glue ops one model uses; ``fused`` says whether they are the compiled ones."""

    fused: bool
    rms_norm: Callable[..., torch.Tensor]
    add_rms_norm: Callable[..., torch.Tensor]
    rope_: Callable[..., None]
    silu_mul: Callable[..., torch.Tensor]
    store_kv: Callable[..., None]
    decode_attention: Callable[..., torch.Tensor]


REFERENCE = KernelSet(
    fused=False,
    rms_norm=rms_norm_ref,
    add_rms_norm=add_rms_norm_ref,
    rope_=rope_ref_,
    silu_mul=silu_mul_ref,
    store_kv=store_kv_ref,
    decode_attention=decode_attention_ref,
)


def compiled() -> KernelSet:
    """The compiled ops (raises RuntimeError with the build error where they cannot load)."""
    if not load():
        raise RuntimeError(f"plait CPU kernels could not be built: {_load_error}")
    ops = torch.ops.plait_cpu
    return KernelSet(
        fused=True,
        rms_norm=ops.rms_norm,
        add_rms_norm=ops.add_rms_norm,
        rope_=ops.rope_,
        silu_mul=ops.silu_mul,
        store_kv=ops.store_kv,
        decode_attention=ops.decode_attention,
    )


def kernel_set(device: torch.device, dtype: torch.dtype) -> KernelSet:
    """The compiled ops for float32 on CPU when they build, else the torch references."""
    if (
        torch.device(device).type == "cpu"
        and dtype == torch.float32
        and os.environ.get("PLAIT_CPU_KERNELS", "1") != "0"
        and load()
    ):
        return compiled()
    return REFERENCE
