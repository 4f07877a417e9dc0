"""The ops a model uses between its matmuls, behind one device-neutral seam.

``KernelSet`` names the ops; the torch references below implement them on any
device and dtype and are the oracle every faster provider is tested against.
``kernel_set(device, dtype)`` picks, once per model, a provider's set where
one serves that device and dtype, else the references (logging why):

    cpu     plait.kernels.cpu: C++ built on first use (CPU, float32)
    triton  (to come) CUDA

    rms_norm(x, w, eps) -> y
    add_rms_norm(residual, delta, w, eps) -> y   residual += delta, y = norm(residual)
    rope_(qkv, cos, sin, n_heads, head_dim)      rotate the first n_heads heads in place
    silu_mul(gate_up) -> silu(gate) * up
    store_kv(k, v, k_pool, v_pool, slots)        write new K/V rows into the pool
    decode_attention(q, k_pool, v_pool, table, rows, seq_lens, scale, window) -> o

``cos``/``sin`` are per-token rows [T, head_dim] (see RotaryEmbedding).
This package never imports ``plait.runtime``.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from plait import switches

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class KernelSet:
    """The glue ops one model uses; ``fused`` says whether they are a provider's compiled ones."""

    fused: bool
    rms_norm: Callable[..., torch.Tensor]
    add_rms_norm: Callable[..., torch.Tensor]
    rope_: Callable[..., None]
    silu_mul: Callable[..., torch.Tensor]
    store_kv: Callable[..., None]
    decode_attention: Callable[..., torch.Tensor]


class Unavailable(Exception):
    """A provider cannot serve a device and dtype here; the message says why. ``failed``:
    it should have (its build failed), which is logged as a warning, not as information."""

    def __init__(self, reason: str, *, failed: bool = False):
        super().__init__(reason)
        self.failed = failed


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


REFERENCE = KernelSet(
    fused=False,
    rms_norm=rms_norm_ref,
    add_rms_norm=add_rms_norm_ref,
    rope_=rope_ref_,
    silu_mul=silu_mul_ref,
    store_kv=store_kv_ref,
    decode_attention=decode_attention_ref,
)


# ---- choosing a set ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Provider:
    module: str  # imported on first use; has provide(dtype) -> KernelSet, raising Unavailable
    switch: switches.Switch[bool]  # off: the references, even where the provider would serve


PROVIDERS: dict[str, _Provider] = {
    "cpu": _Provider("plait.kernels.cpu", switches.CPU_KERNELS),
}


def kernel_set(
    device: torch.device | str, dtype: torch.dtype, *, enabled: bool | None = None
) -> KernelSet:
    """The provider's ops for this device type and dtype, else the torch references.

    ``enabled`` overrides the provider's switch (``PLAIT_CPU_KERNELS`` for the CPU).
    """
    kind = torch.device(device).type
    provider = PROVIDERS.get(kind)
    level = logging.INFO
    if provider is None:
        reason = f"no compiled kernels for {kind}"
    elif not (provider.switch.value() if enabled is None else enabled):
        reason = f"{provider.switch.name}=0" if enabled is None else "compiled kernels turned off"
    else:
        try:
            return importlib.import_module(provider.module).provide(dtype)
        except Unavailable as e:
            reason, level = str(e), logging.WARNING if e.failed else logging.INFO
    dtype_name = str(dtype).removeprefix("torch.")
    logger.log(level, "torch reference kernels on %s, %s: %s", kind, dtype_name, reason)
    return REFERENCE
