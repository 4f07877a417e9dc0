"""Attention on CPU in float32 through plait's fused kernels (plait.kernels.cpu).

Decode rows attend with ``decode_attention``, which reads each sequence's K/V
straight from the pool through its row of the request-to-token table: no
gather into a padded copy, no mask. New K/V rows go into the pool with one
``store_kv`` call per layer. Extend sequences (prompts, chunks) are matmul-
heavy and keep the torch path, whose SDPA is already efficient there.
"""

from __future__ import annotations

import torch

from plait.kernels.cpu import compiled
from plait.runtime.attention.torch_backend import TorchAttentionBackend


class CPUAttentionBackend(TorchAttentionBackend):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if self.kv_pool.device.type != "cpu" or self.kv_pool.dtype != torch.float32:
            raise ValueError(
                f"attention_backend='cpu' needs a float32 CPU KV pool, got "
                f"{self.kv_pool.dtype} on {self.kv_pool.device}"
            )
        self.ops = compiled()
        self.window = self.sliding_window or 0

    def prepare(self, batch) -> None:
        super().prepare(batch)
        self.out_slots = batch.out_slots.contiguous()

    def _prepare_decode(self, req_rows: torch.Tensor, seq_lens: list[int]) -> None:
        self.dec_shape = (len(seq_lens), max(seq_lens))
        self.dec_req_rows = req_rows.contiguous()
        self.dec_seq_lens = torch.tensor(seq_lens, dtype=torch.int64)

    def _write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.ops.store_kv(k, v, self.kv_pool.k[layer], self.kv_pool.v[layer], self.out_slots)

    def _decode(self, q: torch.Tensor, layer: int) -> torch.Tensor:
        return self.ops.decode_attention(
            self._decode_queries(q),
            self.kv_pool.k[layer],
            self.kv_pool.v[layer],
            self.req_to_token.table,
            self.dec_req_rows,
            self.dec_seq_lens,
            self.scale,
            self.window,
        )
