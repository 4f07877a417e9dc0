"""Attention backends, registered by name.

A backend is built once per engine and called in two steps per model step:
``prepare(batch)`` builds the index tensors every layer shares, then
``forward(q, k, v, layer)`` writes the new K/V into the pool and attends.
"""

from __future__ import annotations

from plait.runtime.attention.base import AttentionBackend, create_backend, register_backend
from plait.runtime.attention.torch_backend import TorchAttentionBackend

__all__ = ["AttentionBackend", "TorchAttentionBackend", "create_backend", "register_backend"]
