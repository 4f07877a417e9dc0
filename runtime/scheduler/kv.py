"""KVBook: the scheduler's record of who holds which KV slot.

Three holders: the pool's free list (``SlotAllocator``), the prefix cache
(behind the ``PrefixCache`` protocol; the null cache is one implementation)
and each running request, which holds a row of the request-to-token table.
The scheduler keeps its own copy of that table: it reads it to hand a
request's slots to the cache, and every change it makes is queued for the
runner, which applies it with the next ForwardBatch (the runner owns the real
table). Admission reserves every slot a request may need, so a running
request never runs short and nothing is preempted.
"""

from __future__ import annotations

import torch

from plait.radix import PrefixCache
from plait.runtime.kv_pool import ReqToTokenPool, SlotAllocator
from plait.runtime.request import Req


class KVBook:
    def __init__(
        self,
        cache: PrefixCache,
        allocator: SlotAllocator,
        num_rows: int,
        context_len: int,
        device: torch.device,
    ):
        self.cache = cache
        self.allocator = allocator
        self.device = device
        self.table = ReqToTokenPool(num_rows, context_len, device)  # the scheduler's copy
        self._free_rows = list(range(num_rows - 1, -1, -1))
        self._lent: dict[int, torch.Tensor] = {}  # row -> prefix slots the runner has not seen
        self.reserved = 0  # KV slots promised to running requests, not yet allocated

    @property
    def available_slots(self) -> int:
        return self.allocator.num_free - self.reserved

    @property
    def free_rows(self) -> int:
        return len(self._free_rows)

    # ---- admission and release -------------------------------------------------

    def admit(self, req: Req, prefix_cap: int) -> bool:
        """Match the prompt's first ``prefix_cap`` tokens in the cache, lock the match,
        reserve the KV the request may need (evicting cache leaves if needed) and take
        a table row lent the matched slots. False if the KV does not fit yet."""
        # Counted in the hit rate only once admitted: a request that waits for KV is
        # matched again next step and must not count twice.
        match = self.cache.match_prefix(
            req.cache_key(prefix_cap), req.cache_namespace, record=False
        )
        self.cache.lock(match.node)
        req.cached_tokens = req.tree_len = req.num_computed = match.length
        short = req.kv_needed - self.available_slots
        if short > 0 and self.cache.evict(short) < short:
            self.cache.unlock(match.node)
            req.cached_tokens = req.tree_len = req.num_computed = 0
            return False
        self.cache.record_query(match.node, prefix_cap, match.length)
        req.last_node = match.node
        req.row = self._free_rows.pop()
        self._lend(req.row, match.slots)
        req.reserved_left = req.kv_needed
        self.reserved += req.reserved_left
        return True

    def release(self, req: Req) -> None:
        """Hand a finished request's computed KV to the cache (which frees what it does
        not keep), unlock its prefix and free its row and reservation."""
        if req.row is not None:
            n = req.num_computed
            slots = self.table.table[req.row, :n].clone()
            self.cache.insert(req.cache_key(n), slots, req.cache_namespace)
            self.cache.unlock(req.last_node)
            req.last_node = None
            self._lent.pop(req.row, None)  # nobody reads the row any more
            self._free_rows.append(req.row)
            req.row = None
        self.reserved -= req.reserved_left
        req.reserved_left = 0

    def flush(self) -> None:
        """Drop every cached prefix (only while no request runs)."""
        self.cache.flush()
        self.cache.reset()

    # ---- one step ----------------------------------------------------------------

    def allocate(self, reqs: list[Req], extends: list[int]) -> torch.Tensor:
        """Slots for this step's new tokens, taken from the requests' reservations."""
        total = sum(extends)
        slots = self.allocator.alloc(total)
        for req, n in zip(reqs, extends):
            req.reserved_left -= n
        self.reserved -= total
        return slots

    def table_writes(
        self, rows: torch.Tensor, cols: torch.Tensor, slots: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Record the new tokens' slots (``table[rows, cols] = slots``) and return every
        write the runner has not seen yet: the prefix slots lent since the last step,
        then these."""
        self.table.write(rows, cols, slots)
        if not self._lent:
            return rows, cols, slots
        lent_rows, lent_cols, lent_slots = [], [], []
        for row, lent in self._lent.items():
            n = lent.numel()
            lent_rows.append(torch.full((n,), row, dtype=torch.int64, device=self.device))
            lent_cols.append(torch.arange(n, dtype=torch.int64, device=self.device))
            lent_slots.append(lent)
        self._lent.clear()
        return (
            torch.cat([*lent_rows, rows]),
            torch.cat([*lent_cols, cols]),
            torch.cat([*lent_slots, slots]),
        )

    def computed(self, req: Req, n: int) -> None:
        """``n`` more tokens of the request have their KV in the pool. After a prefill
        chunk, cache what it computed so far, so requests admitted later reuse it."""
        req.num_computed += n
        if n > 1:
            tokens = req.cache_key(req.num_computed)
            slots = self.table.table[req.row, : req.num_computed].clone()
            match = self.cache.insert_running(tokens, slots, req.last_node, req.cache_namespace)
            req.last_node, req.tree_len = match.node, match.length
            self._lend(req.row, match.slots)

    def _lend(self, row: int, slots: torch.Tensor) -> None:
        """Point the row's first columns at slots the cache owns."""
        n = slots.numel()
        if n:
            self.table.table[row, :n] = slots
            self._lent[row] = slots
