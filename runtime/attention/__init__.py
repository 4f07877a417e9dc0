"""Attention backends, registered by name.

A backend is built once per engine and called in two steps per model step:
``prepare(batch)`` builds the index tensors every layer shares, then
``forward(q, k, v, layer)`` writes the new K/V into the pool and attends.

    torch  plain torch (CPU and CUDA, any dtype): the oracle
    cpu    CPU float32 through plait's fused C++ kernels (plait.kernels.cpu)
    auto   (the engine's default) cpu where it applies and builds, else torch
"""

from __future__ import annotations

from plait.runtime.attention.base import AttentionBackend, create_backend, register_backend
from plait.runtime.attention.cpu_backend import CPUAttentionBackend
from plait.runtime.attention.torch_backend import TorchAttentionBackend

__all__ = [
    "AttentionBackend",
    "CPUAttentionBackend",
    "TorchAttentionBackend",
    "create_backend",
    "register_backend",
]
