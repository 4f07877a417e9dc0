"""The attention backend interface (backends register by name in plait.runtime.attention)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from plait.runtime.batch import ForwardBatch
    from plait.runtime.kv_pool import KVPool, ReqToTokenPool


class AttentionBackend(ABC):
    def __init__(
        self,
        kv_pool: KVPool,
        req_to_token: ReqToTokenPool,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        sliding_window: int | None = None,
    ):
        self.kv_pool = kv_pool
        self.req_to_token = req_to_token
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5
        self.sliding_window = sliding_window

    @abstractmethod
    def prepare(self, batch: ForwardBatch) -> None:
        """Build whatever index tensors the layers of this step share. The runner calls
        it once per step, after writing the batch's slots into the table."""

    @abstractmethod
    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int
    ) -> torch.Tensor:
        """q: [T, H, D]; k, v: [T, Hkv, D] for the new tokens. Returns [T, H * D]."""
