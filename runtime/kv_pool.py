"""Memory for attention: the KV pool (token slots), its free list, and the
request-to-token table.

    KVPool.k[layer], KVPool.v[layer]: [num_slots + 1, num_kv_heads, head_dim]
        Slot 0 is a scratch slot that is never handed out: padded positions
        of a batch point at it, so reading or writing them is harmless.
    SlotAllocator: the free slots 1..num_slots (the scheduler's bookkeeping).
    ReqToTokenPool.table: [max_running_requests, context_len] int64
        Row r lists, in sequence order, the KV slots of the request holding
        row r. Attention backends gather K/V through it. The runner owns the
        table and applies each ForwardBatch's writes to it; the scheduler
        keeps its own copy to know which slots each request holds.

A row's first ``tree_len`` slots belong to the prefix cache, which lends
them to the request while the request holds a lock on their node; the
request owns the slots after that until it finishes (see plait.radix):

    row r:  [ cache-owned, locked | request-owned | (unused) ]
            0             tree_len        num_computed
"""

from __future__ import annotations

import torch


class KVPoolFullError(RuntimeError):
    """Raised when slots are requested that the pool does not have."""


class SlotAllocator:
    """Free list of KV slot indices 1..size (0 is the scratch slot).

    Last freed, first reused: the pool is allocated untouched (``torch.empty``), so
    reusing the slots that were just freed keeps the set of touched pages (and the
    process's resident memory) as small as the load needs. A first-in-first-out list
    would walk through every slot of the pool and keep it all resident.
    """

    def __init__(self, size: int, device: torch.device):
        self.size = size
        self.device = device
        self.clear()

    def clear(self) -> None:
        self._free = torch.arange(1, self.size + 1, dtype=torch.int64, device=self.device)

    @property
    def num_free(self) -> int:
        return int(self._free.numel())

    def alloc(self, n: int) -> torch.Tensor:
        if n > self._free.numel():
            raise KVPoolFullError(f"need {n} KV slots, only {self._free.numel()} free")
        out, self._free = self._free[:n], self._free[n:]
        return out

    def free(self, slots: torch.Tensor) -> None:
        if slots.numel():
            self._free = torch.cat([slots.to(torch.int64), self._free])


class KVPool:
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        size: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.size, self.dtype, self.device = size, dtype, device
        shape = (size + 1, num_kv_heads, head_dim)
        # torch.empty: pages are only touched (and counted in RSS) when written.
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        for buf in (*self.k, *self.v):
            buf[0].zero_()

    @staticmethod
    def bytes_per_token(
        num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.size * self.bytes_per_token(
            self.num_layers, self.num_kv_heads, self.head_dim, self.dtype
        )

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[layer][slots] = k
        self.v[layer][slots] = v


class ReqToTokenPool:
    """Rows of KV slot indices, one row per running request."""

    def __init__(self, num_rows: int, context_len: int, device: torch.device):
        self.table = torch.zeros((num_rows, context_len), dtype=torch.int64, device=device)
        self.context_len = context_len

    def write(self, rows: torch.Tensor, cols: torch.Tensor, slots: torch.Tensor) -> None:
        """``table[rows[i], cols[i]] = slots[i]`` (no (row, col) pair twice)."""
        if slots.numel():
            self.table[rows, cols] = slots
