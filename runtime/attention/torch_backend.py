"""Attention in plain torch; works on CPU and CUDA and is the oracle other
backends are tested against.

A batch is split in two groups, so mixing decode and prefill wastes nothing:
  - decode rows (one new token each) attend in one batched call over their
    histories gathered by slot index and padded to the longest;
  - each extend sequence (a prompt or a chunk of one) attends on its own,
    causally over its prefix and itself.
The scheduler puts decode rows first, which makes their gather a slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from plait.runtime.attention.base import AttentionBackend
from plait.runtime.batch import ForwardBatch


@dataclass
class _Extend:
    start: int  # first row of this sequence in the flattened batch
    length: int  # new tokens
    kv_index: torch.Tensor  # [seq_len] slots of the whole sequence
    mask: torch.Tensor | None  # [length, seq_len] bool, None -> plain causal


class TorchAttentionBackend(AttentionBackend):
    def prepare(self, batch: ForwardBatch) -> None:
        dev = batch.input_ids.device
        table = self.req_to_token.table
        self.batch = batch
        starts, dec, self.extends = 0, [], []
        for b, (pre, ext) in enumerate(zip(batch.prefix_lens, batch.extend_lens)):
            if ext == 1 and pre > 0:
                dec.append((b, starts, pre + 1))
            else:
                row = table[batch.req_rows[b], : pre + ext]
                self.extends.append(_Extend(starts, ext, row, self._extend_mask(pre, ext, dev)))
            starts += ext
        self.dec_rows = None
        self.dec_contiguous = False
        if dec:
            self.dec_rows = torch.tensor([r for _, r, _ in dec], device=dev)
            self.dec_contiguous = dec[-1][1] == len(dec) - 1
            all_decode = len(dec) == len(batch.extend_lens)
            req_rows = batch.req_rows if all_decode else batch.req_rows[[b for b, _, _ in dec]]
            self._prepare_decode(req_rows, [s for _, _, s in dec])

    def _prepare_decode(self, req_rows: torch.Tensor, seq_lens: list[int]) -> None:
        """Index tensors for the decode rows: their histories gathered and padded to the longest."""
        dev = req_rows.device
        seq = torch.tensor(seq_lens, device=dev)
        S = max(seq_lens)
        self.dec_shape = (len(seq_lens), S)
        self.dec_kv = self.req_to_token.table[req_rows, :S].reshape(-1)
        key_pos = torch.arange(S, device=dev)[None, :]
        mask = key_pos < seq[:, None]
        if self.sliding_window is not None:
            mask &= key_pos >= seq[:, None] - self.sliding_window
        self.dec_mask = None if bool(mask.all()) else mask[:, None, None, :]

    def _extend_mask(self, pre: int, ext: int, dev: torch.device) -> torch.Tensor | None:
        if pre == 0 and self.sliding_window is None:
            return None
        q_pos = torch.arange(pre, pre + ext, device=dev)[:, None]
        k_pos = torch.arange(pre + ext, device=dev)[None, :]
        mask = k_pos <= q_pos
        if self.sliding_window is not None:
            mask &= k_pos > q_pos - self.sliding_window
        return mask

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int
    ) -> torch.Tensor:
        self._write(layer, k, v)
        if self.dec_rows is not None and self.dec_contiguous and not self.extends:
            return self._decode(q, layer)  # a pure decode step: its output is the whole batch's
        out = q.new_empty(q.shape[0], self.num_heads * self.head_dim)
        if self.dec_rows is not None:
            self._place_decode(out, self._decode(q, layer))
        self._extend(q, layer, out)
        return out

    def _write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.kv_pool.write(layer, self.batch.out_slots, k, v)

    def _place_decode(self, out: torch.Tensor, o: torch.Tensor) -> None:
        """Put the decode rows' outputs [B, H * D] into the batch output."""
        B = o.shape[0]
        if self.dec_contiguous:
            out[:B] = o
        else:
            out.index_copy_(0, self.dec_rows, o)

    def _decode_queries(self, q: torch.Tensor) -> torch.Tensor:
        B = self.dec_shape[0]
        return q[:B] if self.dec_contiguous else q.index_select(0, self.dec_rows)

    def _decode(self, q: torch.Tensor, layer: int) -> torch.Tensor:
        k_pool, v_pool = self.kv_pool.k[layer], self.kv_pool.v[layer]
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        B, S = self.dec_shape
        keys = k_pool.index_select(0, self.dec_kv).view(B, S, Hkv, D).transpose(1, 2)
        vals = v_pool.index_select(0, self.dec_kv).view(B, S, Hkv, D).transpose(1, 2)
        return F.scaled_dot_product_attention(
            self._decode_queries(q).reshape(B, 1, H, D).transpose(1, 2),
            keys,
            vals,
            attn_mask=self.dec_mask,
            scale=self.scale,
            enable_gqa=Hkv != H,
        ).reshape(B, H * D)

    def _extend(self, q: torch.Tensor, layer: int, out: torch.Tensor) -> None:
        k_pool, v_pool = self.kv_pool.k[layer], self.kv_pool.v[layer]
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        for e in self.extends:
            n = e.kv_index.numel()
            keys = k_pool.index_select(0, e.kv_index).view(1, n, Hkv, D).transpose(1, 2)
            vals = v_pool.index_select(0, e.kv_index).view(1, n, Hkv, D).transpose(1, 2)
            qe = q[e.start : e.start + e.length].reshape(1, e.length, H, D).transpose(1, 2)
            o = F.scaled_dot_product_attention(
                qe,
                keys,
                vals,
                attn_mask=e.mask,
                is_causal=e.mask is None,
                scale=self.scale,
                enable_gqa=Hkv != H,
            )
            out[e.start : e.start + e.length] = o.transpose(1, 2).reshape(e.length, H * D)
