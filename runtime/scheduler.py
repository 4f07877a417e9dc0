"""The scheduler: continuous batching over one ModelRunner.

Each step:
  1. plan: every running request that waits for its next token decodes one
     token; requests still prefilling get the next chunk of their prompt;
     waiting requests are admitted while the prefill token budget
     (``chunked_prefill_size``), the request rows and the KV pool allow;
  2. run one forward over the flattened batch (decode rows first);
  3. sample for every request whose known tokens are now all computed,
     detokenize, check stop conditions, send results, free what finished.

Admission reserves the KV a request may need (prompt + max_new_tokens), so a
running request never runs out of slots and nothing is preempted.

The prefix cache (plait.radix) sits under admission and completion: a
request starts from the longest cached prefix of its prompt (locked while it
runs), each finished prefill chunk is inserted at once so requests admitted
later reuse it, and a finished request's tokens are inserted for the next
one. When the pool runs short, unlocked cache leaves are evicted.

Constrained requests carry a grammar matcher: their rows of the sampled
logits are masked with the grammar's allowed-token bitmask, each sampled token
advances the matcher, and the request stops once the grammar is complete.
With jump-forward, text the grammar forces after a sampled token is appended
as output tokens at once (the boundary with the sampled token re-tokenized),
and the next step computes them in one extend pass instead of one decode step
each. The sampled token's own KV is not computed yet when that happens, so
re-tokenizing it never touches the pool.
"""

from __future__ import annotations

import logging
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from plait.radix import NullCache, RadixCache
from plait.runtime.batch import ForwardBatch
from plait.runtime.constrained.bitmask import allocate_bitmask
from plait.runtime.constrained.closing import BudgetCloser
from plait.runtime.model_runner import ModelRunner
from plait.runtime.request import Req
from plait.runtime.sampler import Sampler, SamplingRow

logger = logging.getLogger(__name__)

# Jump-forward tokenizes at most this many characters of forced text per token of
# budget left (a grammar may force megabytes; no token is longer than this).
MAX_CHARS_PER_TOKEN = 32


@dataclass
class _Planned:
    req: Req
    extend: int  # tokens computed this step
    logit_start: int = 0  # first row of this request's logits
    num_logits: int = 0
    samples: bool = False  # whether this step samples the request's next token


class Scheduler:
    def __init__(
        self,
        runner: ModelRunner,
        tokenizer: Any,
        *,
        eos_token_ids: tuple[int, ...],
        chunked_prefill_size: int,
        max_running_requests: int,
        schedule_policy: str = "lpm",
        disable_radix_cache: bool = False,
        vocab_size: int | None = None,
    ):
        self.runner = runner
        self.tokenizer = tokenizer
        self.eos_token_ids = set(eos_token_ids)
        self.chunked_prefill_size = chunked_prefill_size
        self.max_running_requests = max_running_requests
        self.allocator = runner.kv_pool.allocator
        self.req_to_token = runner.req_to_token
        self.device = runner.device
        self.sampler = Sampler()
        self.schedule_policy = schedule_policy
        cache_cls = NullCache if disable_radix_cache else RadixCache
        self.cache: RadixCache | NullCache = cache_cls(self.allocator.free, self.device)
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []
        self.reserved = 0  # KV slots promised to running requests, not yet allocated
        self.num_forward_passes = 0
        self.vocab_size = vocab_size or runner.cfg.vocab_size  # logits width
        self._grammar_thread = ThreadPoolExecutor(1, thread_name_prefix="plait-masks")
        self._closer = BudgetCloser(tokenizer, self.vocab_size, eos_token_ids)

    # ---- queue ---------------------------------------------------------------

    def add(self, req: Req) -> None:
        """Queue a request. Text its grammar forces before any sampling is appended
        at once, so the prompt's prefill computes it too."""
        if req.matcher is not None and req.params.max_new_tokens > 0:
            try:
                self._start_constrained(req)
            except Exception as e:  # this request's grammar failed; nobody else is hurt
                self._fail(req, "grammar", e)
            if req.finished:
                req.sink(req.make_output())
                return
        self.waiting.append(req)

    def _start_constrained(self, req: Req) -> None:
        if req.jump_forward:
            forced = self._forced_tokens(req, None)
            req.forced_tokens += len(forced)
            for t in forced:
                self._append_token(req, t, None)
                if req.finished:
                    return
        if req.matcher.is_finished():
            self._finish_grammar(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, rid: str, message: str = "aborted") -> bool:
        for queue in (self.waiting, self.running):
            for req in queue:
                if req.rid == rid:
                    queue.remove(req)
                    self._finish(req, {"type": "abort", "message": message})
                    req.sink(req.make_output())
                    return True
        return False

    def abort_all(self, message: str) -> None:
        for req in list(self.waiting) + list(self.running):
            self.abort(req.rid, message)

    @property
    def available_slots(self) -> int:
        return self.allocator.num_free - self.reserved

    def close(self) -> None:
        self._grammar_thread.shutdown(wait=False)

    def flush_cache(self) -> bool:
        """Drop every cached prefix; refused (False) while requests are running."""
        if self.running:
            return False
        self.cache.flush()
        self.cache.reset()
        return True

    def _prefix_cap(self, req: Req) -> int:
        """How much of the prompt may come from the cache: at least one token is
        computed (its logits start the output), and input logprobs need the logits
        from position logprob_start - 1 on."""
        cap = len(req.input_ids) - 1
        if req.return_logprob:
            cap = min(cap, req.logprob_start - 1)
        return max(cap, 0)

    # Past this queue length, lpm's prefix matching costs more than it saves.
    LPM_MAX_QUEUE = 128
    # A same-step request sharing at least this many uncached tokens waits a step.
    MIN_SHARED_PREFIX = 32

    def _order_waiting(self) -> None:
        if (
            self.schedule_policy != "lpm"
            or isinstance(self.cache, NullCache)
            or not 1 < len(self.waiting) <= self.LPM_MAX_QUEUE
        ):
            return
        match = {
            id(r): self.cache.match_prefix(r.input_ids[: self._prefix_cap(r)], record=False).length
            for r in self.waiting
        }
        self.waiting = deque(sorted(self.waiting, key=lambda r: -match[id(r)]))

    # ---- one step ------------------------------------------------------------

    def step(self) -> bool:
        """Run one batch; False when there was nothing to run."""
        plan = self._plan()
        if not plan:
            return False
        batch = self._build_batch(plan)
        masks = self._start_grammar_masks(plan)  # filled while the model runs
        logits = self.runner.forward(batch)
        self.num_forward_passes += 1
        self._process(plan, logits, masks)
        return True

    def _plan(self) -> list[_Planned]:
        decode, extend = [], []
        budget = self.chunked_prefill_size
        for req in self.running:
            todo = req.fill_len - req.num_computed
            if todo == 1 and req.num_computed >= len(req.input_ids):
                decode.append(_Planned(req, 1))
            elif budget > 0:
                n = min(todo, budget)
                extend.append(_Planned(req, n))
                budget -= n
        self._order_waiting()
        admitted: list[Req] = []
        deferred: list[Req] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_running_requests:
            req = self.waiting.popleft()
            if self._shares_uncached_prefix(req, admitted):
                deferred.append(req)  # admitted next step, when that prefix is cached
                continue
            if not self._admit(req):
                self.waiting.appendleft(req)
                break  # wait for running requests to finish and free their KV
            admitted.append(req)
            n = min(req.fill_len - req.num_computed, budget)
            extend.append(_Planned(req, n))
            budget -= n
        self.waiting.extendleft(reversed(deferred))
        return decode + extend

    def _shares_uncached_prefix(self, req: Req, admitted: list[Req]) -> bool:
        """Whether ``req`` would recompute a long prefix that a request admitted in this
        same step is computing now (it is cheaper to wait one step and reuse it)."""
        if isinstance(self.cache, NullCache) or not admitted:
            return False
        cached = self.cache.match_prefix(req.input_ids, record=False).length
        return any(
            _common_prefix_len(req.input_ids, other.input_ids) - cached >= self.MIN_SHARED_PREFIX
            for other in admitted
        )

    def _admit(self, req: Req) -> bool:
        """Match the prompt in the cache, lock the match, reserve KV (evicting cache
        leaves if needed) and take a request row. False if the KV does not fit yet."""
        # Counted in the hit rate only once admitted: a request that waits for KV is
        # matched again next step and must not count twice.
        match = self.cache.match_prefix(req.input_ids[: self._prefix_cap(req)], record=False)
        self.cache.lock(match.node)
        req.cached_tokens = req.tree_len = req.num_computed = match.length
        short = req.kv_needed - self.available_slots
        if short > 0 and self.cache.evict(short) < short:
            self.cache.unlock(match.node)
            req.cached_tokens = req.tree_len = req.num_computed = 0
            return False
        self.cache.record_query(match.node, self._prefix_cap(req), match.length)
        req.last_node = match.node
        req.row = self.req_to_token.alloc()
        self.req_to_token.table[req.row, : match.length] = match.slots
        req.reserved_left = req.kv_needed
        self.reserved += req.reserved_left
        self.running.append(req)
        return True

    def _build_batch(self, plan: list[_Planned]) -> ForwardBatch:
        total = sum(p.extend for p in plan)
        slots = self.allocator.alloc(total)
        table = self.req_to_token.table
        ids: list[int] = []
        positions: list[int] = []
        logit_rows: list[int] = []
        offset = 0
        for p in plan:
            req, start, end = p.req, p.req.num_computed, p.req.num_computed + p.extend
            table[req.row, start:end] = slots[offset : offset + p.extend]
            ids += req.fill_ids(start, end)
            positions += range(start, end)
            p.samples = end == req.fill_len and req.params.max_new_tokens > 0
            # Rows whose logits we need: input-logprob positions (a row at position i
            # scores token i + 1) and the last row when this step samples.
            first = max(start, req.logprob_start - 1)
            last = min(end, len(req.input_ids) - 1)
            lp_rows = range(first, last) if first < last else range(0)
            rows = list(lp_rows)
            if p.samples:
                rows.append(end - 1)
            p.logit_start, p.num_logits = len(logit_rows), len(rows)
            logit_rows += [offset + r - start for r in rows]
            offset += p.extend
            req.reserved_left -= p.extend
            self.reserved -= p.extend
        dev = self.device
        return ForwardBatch(
            input_ids=torch.tensor(ids, dtype=torch.int64, device=dev),
            positions=torch.tensor(positions, dtype=torch.int64, device=dev),
            out_slots=slots,
            req_rows=torch.tensor([p.req.row for p in plan], dtype=torch.int64, device=dev),
            prefix_lens=[p.req.num_computed for p in plan],
            extend_lens=[p.extend for p in plan],
            logits_indices=torch.tensor(logit_rows, dtype=torch.int64, device=dev),
        )

    def _process(
        self, plan: list[_Planned], logits: torch.Tensor, masks: Future | None = None
    ) -> None:
        want_lp = any(p.req.return_logprob for p in plan)
        logprobs = torch.log_softmax(logits, dim=-1) if want_lp else None
        sample_rows, sampled, prefilled_only = [], [], []
        for p in plan:
            req = p.req
            start = req.num_computed
            req.num_computed += p.extend
            if p.extend > 1 and not isinstance(self.cache, NullCache):
                self._cache_computed(req)
            if req.return_logprob:
                self._record_input_logprobs(p, start, logprobs)
            if p.samples:
                sample_rows.append(p.logit_start + p.num_logits - 1)
                sampled.append(req)
            elif req.num_computed == len(req.input_ids) and req.params.max_new_tokens == 0:
                self._finish(req, {"type": "length", "length": 0})
                prefilled_only.append(req)
        if sampled:
            self._sample(sampled, sample_rows, logits, logprobs, masks)
        for req in sampled + prefilled_only:
            if req.finished or (req.stream and req.stream_due):
                req.sink(req.make_output())
        done = [r for r in self.running if r.finished]
        if done:
            self.running = [r for r in self.running if not r.finished]

    def _sample(
        self,
        sampled: list[Req],
        sample_rows: list[int],
        logits: torch.Tensor,
        logprobs: torch.Tensor | None,
        masks: Future | None,
    ) -> None:
        """Sample the next token of each request in ``sampled`` and append it. A request
        whose grammar, parameters or logits make this fail finishes with an error; the
        others go on."""
        sampling_rows = [self._sampling_row(r) for r in sampled]
        failed: dict[int, tuple[str, Exception | str]] = {}
        if masks is not None:  # one bitmask row per constrained request, in order
            bitmask, mask_errors = masks.result()
            k = 0
            for i, (req, row) in enumerate(zip(sampled, sampling_rows)):
                if req.matcher is not None:
                    row.grammar_bits = bitmask[k]
                    if k in mask_errors:
                        failed[i] = ("grammar", mask_errors[k])
                    k += 1
        rows = logits.index_select(0, torch.tensor(sample_rows, device=logits.device))
        try:
            result = self.sampler(rows, sampling_rows, False)
            next_ids, errors = result.next_ids, result.errors
        except Exception:  # find the rows at fault: sample them one by one
            next_ids, errors = [0] * len(sampled), {}
            for i, row in enumerate(sampling_rows):
                try:
                    one = self.sampler(rows[i : i + 1], [row], False)
                    next_ids[i] = one.next_ids[0]
                    if one.errors:
                        errors[i] = one.errors[0]
                except Exception as e:
                    errors[i] = repr(e)
        for i, why in errors.items():
            failed.setdefault(i, ("sampling", why))
        for i, req in enumerate(sampled):
            if i in failed:
                self._fail(req, *failed[i])
                continue
            lp_row = logprobs[sample_rows[i]] if logprobs is not None else None
            try:
                self._accept_sampled(req, next_ids[i], lp_row)
            except Exception as e:
                self._fail(req, "grammar" if req.matcher is not None else "output", e)

    def _fail(self, req: Req, stage: str, error: Exception | str) -> None:
        """Finish one request with an error (``finish_reason`` type ``abort``); the
        batch it was in goes on."""
        if req.finished:
            return
        if isinstance(error, Exception):
            logger.warning("request %s failed in %s: %r", req.rid, stage, error)
            error = f"{type(error).__name__}: {error}"
        self._finish(req, {"type": "abort", "message": f"{stage} failed: {error}"})

    def _cache_computed(self, req: Req) -> None:
        """Insert what the request has computed so far and move its lock to the new
        node; its row then points at the cache's slots (duplicates were freed)."""
        tokens = req.fill_ids(0, req.num_computed)
        table = self.req_to_token.table
        self.cache.insert(tokens, table[req.row, : req.num_computed].clone())
        match = self.cache.match_prefix(tokens, record=False)
        self.cache.lock(match.node)
        self.cache.unlock(req.last_node)
        req.last_node, req.tree_len = match.node, match.length
        table[req.row, : match.length] = match.slots

    def _sampling_row(self, req: Req) -> SamplingRow:
        p = req.params
        banned: list[int] = []
        if len(req.output_ids) < p.min_new_tokens:
            banned = sorted(set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_token_ids))
        return SamplingRow(p, req.generator, req.input_ids, req.output_ids, banned)

    def _record_input_logprobs(
        self, p: _Planned, start: int, logprobs: torch.Tensor | None
    ) -> None:
        req = p.req
        decode = self._token_text
        if start == 0 and req.logprob_start == 0:
            req.input_logprobs.append(req.triple(None, req.input_ids[0], decode))
            req.input_top_logprobs.append(None)
        n = p.num_logits - (1 if p.samples else 0)
        if n <= 0 or logprobs is None:
            return
        first_pos = max(start, req.logprob_start - 1)
        rows = logprobs[p.logit_start : p.logit_start + n]
        targets = req.input_ids[first_pos + 1 : first_pos + 1 + n]
        values = rows.gather(1, torch.tensor(targets, device=rows.device)[:, None])[:, 0].tolist()
        for v, t in zip(values, targets):
            req.input_logprobs.append(req.triple(v, t, decode))
        for i in range(n):
            req.input_top_logprobs.append(self._top(req, rows[i]))

    def _top(self, req: Req, row: torch.Tensor) -> list | None:
        if req.top_logprobs_num <= 0:
            return None
        vals, ids = row.topk(req.top_logprobs_num)
        return [req.triple(v, t, self._token_text) for v, t in zip(vals.tolist(), ids.tolist())]

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    # ---- constrained decoding --------------------------------------------------

    def _start_grammar_masks(self, plan: list[_Planned]) -> Future | None:
        """Fill the allowed-token bitmask of every constrained request that samples this
        step, on the grammar thread, while the forward pass runs (the grammar backends
        release the GIL, and so do torch's kernels). Row i is the i-th such request in
        plan order. The matchers are not touched again until the step samples."""
        matchers = [p.req.matcher for p in plan if p.samples and p.req.matcher is not None]
        if not matchers:
            return None

        def fill() -> tuple[torch.Tensor, dict[int, Exception]]:
            bitmask = allocate_bitmask(len(matchers), self.vocab_size)
            errors: dict[int, Exception] = {}
            for i, m in enumerate(matchers):
                try:
                    m.fill_mask(bitmask, i)
                    error = m.error()
                    if error:
                        raise RuntimeError(error)
                except Exception as e:  # only this request fails
                    errors[i] = e
            return bitmask, errors

        return self._grammar_thread.submit(fill)

    def _accept_sampled(self, req: Req, token: int, logprob_row: torch.Tensor | None) -> None:
        """Append a sampled token; for a constrained request advance its grammar,
        jump forward over forced text and stop when the grammar is complete."""
        m = req.matcher
        if m is None:
            self._append_token(req, token, logprob_row)
            return
        if not m.accept(token):  # the mask makes this unreachable; never emit it
            self._finish(req, {"type": "abort", "message": f"grammar rejected token {token}"})
            return
        tokens = [token]
        if req.jump_forward and token not in self.eos_token_ids and not m.is_finished():
            forced = self._forced_tokens(req, token)
            if forced and forced[0] is None:  # the boundary re-tokenized: replace `token`
                tokens = forced[1:]
                req.forced_tokens += len(tokens) - 1
            else:
                tokens += forced
                req.forced_tokens += len(forced)
        # Budget-aware closing: near the end of the budget, finish the grammar instead.
        closing = self._closer.check(req, tokens, self._budget_left(req))
        if closing is not None:
            req.forced_tokens -= min(len(tokens) - closing.keep, len(tokens) - 1)
            tokens = tokens[: closing.keep]
        for k, t in enumerate(tokens):
            self._append_token(req, t, logprob_row if k == 0 else None)
            if req.finished:
                return
        if closing is not None:
            self._append_closing(req, closing.tokens)
        elif m.is_finished():
            self._finish_grammar(req)

    def _budget_left(self, req: Req) -> int:
        """Output tokens the request may still append (max_new_tokens, context)."""
        return min(
            req.params.max_new_tokens - len(req.output_ids),
            self.req_to_token.context_len - req.fill_len,
        )

    def _append_closing(self, req: Req, tokens: list[int]) -> None:
        """Append a budget closing (the matcher accepted it already) and end the request:
        ``finish_reason`` ``{"type": "length", ..., "closed": True}``."""
        for t in tokens:
            self._append_token(req, t, None)
            req.closed_tokens += 1
            if req.return_logprob:  # forced: no logprob
                req.output_logprobs.append(req.triple(None, t, self._token_text))
                req.output_top_logprobs.append(None)
            if req.finished:
                break
        if not req.finished:
            req.detok.finish()
            self._finish(req, {"type": "length", "length": len(req.output_ids)})
        if req.finish_reason["type"] == "length":
            req.finish_reason["closed"] = True

    def _forced_tokens(self, req: Req, last: int | None) -> list:
        """Tokens the grammar forces next, already accepted by the matcher.

        A backend that computes forced tokens itself (llguidance) is trusted with the
        token boundary. Otherwise the forced text is tokenized together with ``last``
        (the sampled token, not computed yet), so the model sees the tokens it would
        have produced; when that changes ``last``, the result starts with None and
        then the replacement tokens (``last`` is rolled back in the matcher).
        """
        m = req.matcher
        # Never more than the request may still emit: a grammar can force far more.
        limit = min(
            req.params.max_new_tokens - len(req.output_ids),
            self.req_to_token.context_len - req.fill_len,
        )
        if last is not None:
            limit -= 1  # ``last`` is appended first
        if limit <= 0:
            return []
        if m.computes_forced_tokens:
            return self._accept_run(m, m.forced_tokens(limit))
        text = m.forced_text()
        if not text:
            return []
        prev = "" if last is None else self.tokenizer.decode([last])
        if len(text) > MAX_CHARS_PER_TOKEN * (limit + 1):
            # Tokenize only what the budget can take; the cut may split a token, so
            # its last one is dropped.
            text = text[: MAX_CHARS_PER_TOKEN * (limit + 1)]
            ids = self._encode(prev + text)[:-1]
            text = self.tokenizer.decode(ids)[len(prev) :]
            if not ids or not text:
                return []
        else:
            ids = self._encode(prev + text)
        # Jump only where the tokenizer round-trips the text (a partial character or
        # a SentencePiece prefix space would change it).
        if "\ufffd" in prev or self.tokenizer.decode(ids) != prev + text:
            return []
        if last is None or ids[0] == last:
            return self._accept_run(m, ids[:limit] if last is None else ids[1 : limit + 1])
        m.rollback(1)
        new = self._accept_run(m, ids[: limit + 1])
        if not new:  # keep the sampled token after all
            m.accept(last)
            return []
        return [None, *new]

    @staticmethod
    def _accept_run(m: Any, tokens: list[int]) -> list[int]:
        """Accept ``tokens`` in order; return the prefix the matcher took."""
        for i, t in enumerate(tokens):
            if not m.accept(t):
                return tokens[:i]
        return list(tokens)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _finish_grammar(self, req: Req) -> None:
        """The grammar admits nothing more: stop without sampling EOS."""
        req.detok.finish()
        self._finish(req, {"type": "stop", "matched": None})

    def _append_token(self, req: Req, token: int, logprob_row: torch.Tensor | None) -> None:
        req.output_ids.append(token)
        if req.return_logprob and logprob_row is not None:
            req.output_logprobs.append(
                req.triple(float(logprob_row[token]), token, self._token_text)
            )
            req.output_top_logprobs.append(self._top(req, logprob_row))
        matched_str = req.detok.add(token)
        p = req.params
        if token in p.stop_token_ids or (token in self.eos_token_ids and not p.ignore_eos):
            req.detok.finish(drop_last=True)
            self._finish(req, {"type": "stop", "matched": token})
        elif matched_str is not None:
            req.detok.finish(stop_at=matched_str)
            self._finish(req, {"type": "stop", "matched": matched_str})
        elif (
            len(req.output_ids) >= p.max_new_tokens or req.fill_len >= self.req_to_token.context_len
        ):
            req.detok.finish()
            self._finish(req, {"type": "length", "length": len(req.output_ids)})

    def _finish(self, req: Req, reason: dict[str, Any]) -> None:
        """Mark finished and free everything the request holds. The result is sent by
        the caller."""
        req.finish_reason = reason
        if req.row is not None:
            # Hand the computed KV to the cache (which frees what it does not keep).
            n = req.num_computed
            slots = self.req_to_token.table[req.row, :n].clone()
            self.cache.insert(req.fill_ids(0, n), slots)
            self.cache.unlock(req.last_node)
            req.last_node = None
            self.req_to_token.free(req.row)
            req.row = None
        self.reserved -= req.reserved_left
        req.reserved_left = 0


def _common_prefix_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
