"""Attention backends, registered by name in ``BACKENDS``, the one list that the
engine's config and the CLI read; a backend's module is imported only when one
is created.

A backend is built once per engine and called in two steps per model step:
``prepare(batch)`` builds the index tensors every layer shares, then
``forward(q, k, v, layer)`` writes the new K/V into the pool and attends
(the interface is ``plait.runtime.attention.base.AttentionBackend``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from plait.runtime.attention.base import AttentionBackend

AUTO = "auto"


@dataclass(frozen=True)
class BackendEntry:
    target: str  # "module:Class"
    doc: str


BACKENDS: dict[str, BackendEntry] = {
    "torch": BackendEntry(
        "plait.runtime.attention.torch_backend:TorchAttentionBackend",
        "plain torch on any device and dtype (the oracle)",
    ),
    "cpu": BackendEntry(
        "plait.runtime.attention.cpu_backend:CPUAttentionBackend",
        "plait's fused C++ kernels (CPU, float32)",
    ),
}
AUTO_DOC = "cpu where plait's CPU kernels serve the model, else torch"

# The names an engine accepts: "auto" (the default) and every registered backend.
ATTENTION_BACKENDS: tuple[str, ...] = (AUTO, *BACKENDS)


def describe() -> str:
    """One line naming each accepted backend and what it is (for the CLI's help)."""
    docs = {AUTO: AUTO_DOC} | {name: entry.doc for name, entry in BACKENDS.items()}
    return "; ".join(f"{name}: {doc}" for name, doc in docs.items())


def create_backend(name: str, **kwargs) -> AttentionBackend:
    """Import the named backend's module and build one (``auto`` is resolved by the caller)."""
    if name not in BACKENDS:
        raise ValueError(f"attention_backend={name!r}: supported: {sorted(BACKENDS)}")
    module, cls = BACKENDS[name].target.split(":")
    return getattr(importlib.import_module(module), cls)(**kwargs)
