"""Output processing: what a step's logits turn into.

For each request of the step, in plan order: record what was computed (the
KV book caches finished prefill chunks), the prompt's logprobs when asked;
then the requests whose next token is due are sampled in one batch (grammar
masks applied, logprobs from the sampler), each sampled token is appended
(through the grammar for constrained requests), stop conditions are checked,
finished requests release their KV, and results are sent.

Stop conditions, checked on every appended token: a stop token id or EOS
(unless ``ignore_eos``), a stop string (through the detokenizer), the
``max_new_tokens`` budget, the context length. One request failing (a grammar
error, a sampling error) finishes that request with an ``abort`` reason; the
others go on.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future
from typing import Any

import torch

from plait.runtime.request import Req
from plait.runtime.sampler import (
    Sampler,
    SamplingRow,
    compute_logprobs,
    token_logprobs,
    top_logprobs,
)
from plait.runtime.scheduler.batching import Planned
from plait.runtime.scheduler.grammar import GrammarSteps
from plait.runtime.scheduler.kv import KVBook

logger = logging.getLogger(__name__)

# The logprob of a sampled token: its logprobs row [V] and the row's top logprobs.
LogprobRow = tuple[torch.Tensor, "tuple[list[float], list[int]] | None"]


class OutputProcessor:
    def __init__(
        self,
        kv: KVBook,
        grammar: GrammarSteps,
        tokenizer: Any,
        eos_token_ids: tuple[int, ...],
        context_len: int,
    ):
        self.kv = kv
        self.grammar = grammar
        self.tokenizer = tokenizer
        self.eos_token_ids = set(eos_token_ids)
        self.context_len = context_len
        self.sampler = Sampler()

    # ---- one step --------------------------------------------------------------------

    def process(self, plan: list[Planned], logits: torch.Tensor, masks: Future | None) -> None:
        sampled, sample_rows, prefilled_only = [], [], []
        for p in plan:
            req = p.req
            self.kv.computed(req, p.extend)
            if req.return_logprob:
                self._record_input_logprobs(p, logits)
            if p.samples:
                sample_rows.append(p.logit_start + p.num_logits - 1)
                sampled.append(req)
            elif req.num_computed == len(req.input_ids) and req.params.max_new_tokens == 0:
                self.finish(req, {"type": "length", "length": 0})
                prefilled_only.append(req)
        if sampled:
            self._sample(sampled, sample_rows, logits, masks)
        for req in sampled + prefilled_only:
            if req.finished or (req.stream and req.stream_due):
                req.sink(req.make_output())

    def _sample(
        self,
        sampled: list[Req],
        sample_rows: list[int],
        logits: torch.Tensor,
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
        need_lp = any(r.return_logprob for r in sampled)
        n = len(sampled)
        try:
            result = self.sampler(rows, sampling_rows, need_lp)
            next_ids, errors = result.next_ids, result.errors
            lp_rows = list(result.logprobs) if result.logprobs is not None else [None] * n
            tops = result.top
        except Exception:  # find the rows at fault: sample them one by one
            next_ids, errors, lp_rows, tops = [0] * n, {}, [None] * n, [None] * n
            for i, row in enumerate(sampling_rows):
                try:
                    one = self.sampler(rows[i : i + 1], [row], need_lp)
                    next_ids[i] = one.next_ids[0]
                    if one.errors:
                        errors[i] = one.errors[0]
                    if one.logprobs is not None:
                        lp_rows[i], tops[i] = one.logprobs[0], one.top[0]
                except Exception as e:
                    errors[i] = repr(e)
        for i, why in errors.items():
            failed.setdefault(i, ("sampling", why))
        for i, req in enumerate(sampled):
            if i in failed:
                self.fail(req, *failed[i])
                continue
            lp = (lp_rows[i], tops[i]) if req.return_logprob else None
            try:
                self._accept(req, next_ids[i], lp)
            except Exception as e:
                self.fail(req, "grammar" if req.matcher is not None else "output", e)

    def _sampling_row(self, req: Req) -> SamplingRow:
        p = req.params
        banned: list[int] = []
        if len(req.output_ids) < p.min_new_tokens:
            banned = sorted(set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_token_ids))
        return SamplingRow(
            p,
            req.generator,
            req.input_ids,
            req.output_ids,
            banned,
            top_logprobs_num=req.top_logprobs_num,
        )

    # ---- appending tokens -------------------------------------------------------------

    def start_constrained(self, req: Req) -> None:
        """Append the text a new request's grammar forces before any sampling."""
        forced = self.grammar.first_tokens(req)
        req.forced_tokens += len(forced)
        for t in forced:
            self._append(req, t, None)
            if req.finished:
                return
        if req.matcher.is_finished():
            self._finish_grammar(req)

    def _accept(self, req: Req, token: int, lp: LogprobRow | None) -> None:
        """Append a sampled token; for a constrained request, through its grammar (which
        may add forced tokens, or a closing that ends the request)."""
        if req.matcher is None:
            self._append(req, token, lp)
            return
        step = self.grammar.accept(req, token)
        if step is None:
            self.finish(req, {"type": "abort", "message": f"grammar rejected token {token}"})
            return
        for k, t in enumerate(step.tokens):
            self._append(req, t, lp if k == 0 else None)
            if req.finished:
                return
        if step.closing is not None:
            self._append_closing(req, step.closing)
        elif req.matcher.is_finished():
            self._finish_grammar(req)

    def _append(self, req: Req, token: int, lp: LogprobRow | None) -> None:
        """Append one output token and check the stop conditions."""
        req.output_ids.append(token)
        if req.return_logprob and lp is not None:
            row, top = lp
            req.output_logprobs.append(req.triple(float(row[token]), token, self._token_text))
            req.output_top_logprobs.append(self._top_triples(req, top))
        matched_str = req.detok.add(token)
        p = req.params
        if token in p.stop_token_ids or (token in self.eos_token_ids and not p.ignore_eos):
            req.detok.finish(drop_last=True)
            self.finish(req, {"type": "stop", "matched": token})
        elif matched_str is not None:
            req.detok.finish(stop_at=matched_str)
            self.finish(req, {"type": "stop", "matched": matched_str})
        elif len(req.output_ids) >= p.max_new_tokens or req.fill_len >= self.context_len:
            req.detok.finish()
            self.finish(req, {"type": "length", "length": len(req.output_ids)})

    def _append_closing(self, req: Req, tokens: list[int]) -> None:
        """Append a budget closing (the matcher accepted it already) and end the request:
        ``finish_reason`` ``{"type": "length", ..., "closed": True}``."""
        for t in tokens:
            self._append(req, t, None)
            req.closed_tokens += 1
            if req.return_logprob:  # forced: no logprob
                req.output_logprobs.append(req.triple(None, t, self._token_text))
                req.output_top_logprobs.append(None)
            if req.finished:
                break
        if not req.finished:
            req.detok.finish()
            self.finish(req, {"type": "length", "length": len(req.output_ids)})
        if req.finish_reason["type"] == "length":
            req.finish_reason["closed"] = True

    def _finish_grammar(self, req: Req) -> None:
        """The grammar admits nothing more: stop without sampling EOS."""
        req.detok.finish()
        self.finish(req, {"type": "stop", "matched": None})

    # ---- finishing -------------------------------------------------------------------

    def finish(self, req: Req, reason: dict[str, Any]) -> None:
        """Mark finished and release everything the request holds. The caller sends
        the result."""
        req.finish_reason = reason
        self.kv.release(req)

    def fail(self, req: Req, stage: str, error: Exception | str) -> None:
        """Finish one request with an error (``finish_reason`` type ``abort``); the
        batch it was in goes on."""
        if req.finished:
            return
        if isinstance(error, Exception):
            logger.warning("request %s failed in %s: %r", req.rid, stage, error)
            error = f"{type(error).__name__}: {error}"
        self.finish(req, {"type": "abort", "message": f"{stage} failed: {error}"})

    # ---- logprobs ----------------------------------------------------------------------

    def _record_input_logprobs(self, p: Planned, logits: torch.Tensor) -> None:
        req, start = p.req, p.start
        if start == 0 and req.logprob_start == 0:
            req.input_logprobs.append(req.triple(None, req.input_ids[0], self._token_text))
            req.input_top_logprobs.append(None)
        n = p.num_logits - (1 if p.samples else 0)
        if n <= 0:
            return
        first_pos = max(start, req.logprob_start - 1)
        rows = compute_logprobs(logits[p.logit_start : p.logit_start + n])
        targets = req.input_ids[first_pos + 1 : first_pos + 1 + n]
        for v, t in zip(token_logprobs(rows, targets), targets):
            req.input_logprobs.append(req.triple(v, t, self._token_text))
        for i in range(n):
            top = top_logprobs(rows[i], req.top_logprobs_num) if req.top_logprobs_num > 0 else None
            req.input_top_logprobs.append(self._top_triples(req, top))

    def _top_triples(self, req: Req, top: tuple[list[float], list[int]] | None) -> list | None:
        if top is None:
            return None
        return [req.triple(v, t, self._token_text) for v, t in zip(*top)]

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])
