"""Admission and batch building: which requests run this step, and the
ForwardBatch that runs them.

Each step every running request that waits for its next token decodes one
token; requests still prefilling get the next chunk of their prompt; waiting
requests are admitted while the prefill token budget (``chunked_prefill_size``),
the request rows and the KV pool allow. Decode rows come first in the batch.

Policies: ``fcfs`` admits in arrival order; ``lpm`` (longest prefix match)
admits first the requests with the most of their prompt cached. A request
that shares a long uncached prefix with one admitted in the same step waits a
step, to reuse that prefix instead of computing it twice.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from plait.runtime.batch import ForwardBatch
from plait.runtime.request import Req
from plait.runtime.scheduler.images import ImageSplicer
from plait.runtime.scheduler.kv import KVBook

# Past this queue length, lpm's prefix matching costs more than it saves.
LPM_MAX_QUEUE = 128
# A same-step request sharing at least this many uncached tokens waits a step.
MIN_SHARED_PREFIX = 32


@dataclass
class Planned:
    """One request's part of a step."""

    req: Req
    extend: int  # tokens computed this step
    start: int = 0  # tokens computed before this step
    logit_start: int = 0  # first row of this request's logits
    num_logits: int = 0
    samples: bool = False  # whether this step samples the request's next token


def prefix_cap(req: Req) -> int:
    """How much of the prompt may come from the cache: at least one token is computed
    (its logits start the output), and input logprobs need the logits from position
    logprob_start - 1 on."""
    cap = len(req.input_ids) - 1
    if req.return_logprob:
        cap = min(cap, req.logprob_start - 1)
    return max(cap, 0)


class Batcher:
    def __init__(
        self,
        kv: KVBook,
        *,
        chunked_prefill_size: int,
        max_running_requests: int,
        schedule_policy: str,
        images: ImageSplicer | None = None,
    ):
        self.kv = kv
        self.images = images  # vision-language models: splices image embeddings in
        self.chunked_prefill_size = chunked_prefill_size
        self.max_running_requests = max_running_requests
        self.schedule_policy = schedule_policy
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []

    def remove(self, rid: str) -> Req | None:
        """Take a waiting or running request out of the queues."""
        for queue in (self.waiting, self.running):
            for req in queue:
                if req.rid == rid:
                    queue.remove(req)
                    return req
        return None

    def drop_finished(self) -> None:
        if any(r.finished for r in self.running):
            self.running = [r for r in self.running if not r.finished]

    # ---- planning ------------------------------------------------------------------

    def plan(self) -> list[Planned]:
        decode, extend = [], []
        budget = self.chunked_prefill_size
        for req in self.running:
            todo = req.fill_len - req.num_computed
            if todo == 1 and req.num_computed >= len(req.input_ids):
                decode.append(Planned(req, 1))
            elif budget > 0:
                n = min(todo, budget)
                extend.append(Planned(req, n))
                budget -= n
        self._order_waiting()
        admitted: list[Req] = []
        deferred: list[Req] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_running_requests:
            req = self.waiting.popleft()
            if self._shares_uncached_prefix(req, admitted):
                deferred.append(req)  # admitted next step, when that prefix is cached
                continue
            if not self.kv.admit(req, prefix_cap(req)):
                self.waiting.appendleft(req)
                break  # wait for running requests to finish and free their KV
            self.running.append(req)
            admitted.append(req)
            n = min(req.fill_len - req.num_computed, budget)
            extend.append(Planned(req, n))
            budget -= n
        self.waiting.extendleft(reversed(deferred))
        return decode + extend

    def _order_waiting(self) -> None:
        if (
            self.schedule_policy != "lpm"
            or not self.kv.cache.enabled
            or not 1 < len(self.waiting) <= LPM_MAX_QUEUE
        ):
            return
        cache = self.kv.cache
        match = {
            id(r): cache.match_prefix(
                r.cache_key(prefix_cap(r)), r.cache_namespace, record=False
            ).length
            for r in self.waiting
        }
        self.waiting = deque(sorted(self.waiting, key=lambda r: -match[id(r)]))

    def _shares_uncached_prefix(self, req: Req, admitted: list[Req]) -> bool:
        """Whether ``req`` would recompute a long prefix that a request admitted in this
        same step is computing now (it is cheaper to wait one step and reuse it)."""
        if not admitted or not self.kv.cache.enabled:
            return False
        cached = self.kv.cache.match_prefix(req.key_ids, req.cache_namespace, record=False).length
        return any(
            _common_prefix_len(req.key_ids, other.key_ids) - cached >= MIN_SHARED_PREFIX
            for other in admitted
            if other.cache_namespace == req.cache_namespace
        )

    # ---- the batch -----------------------------------------------------------------

    def build(self, plan: list[Planned]) -> ForwardBatch:
        """The ForwardBatch of a plan: each request's next tokens, their new KV slots
        and the logits rows the step needs (and, when a row is an image placeholder,
        the input embeddings with the image's rows spliced in)."""
        slots = self.kv.allocate([p.req for p in plan], [p.extend for p in plan])
        ids: list[int] = []
        positions: list[int] = []
        token_rows: list[int] = []
        logit_rows: list[int] = []
        offset = 0
        one_each = True  # every request computes one token (then token_rows == req_rows)
        for p in plan:
            req = p.req
            p.start = start = req.num_computed
            end = start + p.extend
            ids += req.fill_ids(start, end)
            positions += range(start, end)
            token_rows += [req.row] * p.extend
            one_each = one_each and p.extend == 1
            p.samples = end == req.fill_len and req.params.max_new_tokens > 0
            # Rows whose logits we need: input-logprob positions (a row at position i
            # scores token i + 1) and the last row when this step samples.
            first = max(start, req.logprob_start - 1)
            last = min(end, len(req.input_ids) - 1)
            rows = list(range(first, last)) if first < last else []
            if p.samples:
                rows.append(end - 1)
            p.logit_start, p.num_logits = len(logit_rows), len(rows)
            logit_rows += [offset + r - start for r in rows]
            offset += p.extend
        dev = self.kv.device
        req_rows = torch.tensor([p.req.row for p in plan], dtype=torch.int64, device=dev)
        positions_t = torch.tensor(positions, dtype=torch.int64, device=dev)
        # A token's column in its row is its position in the sequence.
        rows_t = req_rows if one_each else torch.tensor(token_rows, dtype=torch.int64, device=dev)
        write_rows, write_cols, write_slots = self.kv.table_writes(rows_t, positions_t, slots)
        ids_t = torch.tensor(ids, dtype=torch.int64, device=dev)
        return ForwardBatch(
            input_ids=ids_t,
            positions=positions_t,
            out_slots=slots,
            req_rows=req_rows,
            prefix_lens=[p.start for p in plan],
            extend_lens=[p.extend for p in plan],
            logits_indices=torch.tensor(logit_rows, dtype=torch.int64, device=dev),
            write_rows=write_rows,
            write_cols=write_cols,
            write_slots=write_slots,
            input_embeds=self.images.input_embeds(plan, ids_t) if self.images else None,
        )


def _common_prefix_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
