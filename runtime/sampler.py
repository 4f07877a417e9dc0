"""Batched sampling with per-request parameters.

Order for each row: logprobs of the raw logits (what ``return_logprob``
reports) -> penalties and logit bias -> token masks (min_new_tokens, grammar)
-> greedy argmax, or temperature -> top-k -> top-p -> min-p -> a draw from the
request's own generator (so a seeded request is reproducible whatever else
shares its batch).

A row that cannot be sampled (no token left after its masks, non-finite
probabilities) is reported in ``SampleResult.errors`` with the reason; the
other rows of the batch are sampled as usual.

Logprobs are defined here once (``compute_logprobs``, ``top_logprobs``,
``token_logprobs``): the sampler reports them for the rows it samples, and the
scheduler's output processing uses the same functions for prompt tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from plait.runtime.constrained.bitmask import apply_bitmask
from plait.runtime.sampling_params import SamplingParams


@dataclass
class SamplingRow:
    """What the sampler needs to know of one request at one step."""

    params: SamplingParams
    generator: torch.Generator | None
    input_ids: Sequence[int]
    output_ids: Sequence[int]
    banned_ids: Sequence[int] = ()  # e.g. EOS while under min_new_tokens
    # A grammar's allowed tokens as one packed int32 bitmask row (see
    # plait.runtime.constrained.bitmask); None: every token is allowed.
    grammar_bits: torch.Tensor | None = None
    top_logprobs_num: int = 0


@dataclass
class SampleResult:
    next_ids: list[int]
    logprobs: torch.Tensor | None  # [N, V] log_softmax of the raw logits, when asked
    # Row i: (values, ids) of the top logprobs when top_logprobs_num > 0, else None.
    top: list[tuple[list[float], list[int]] | None]
    # Rows that could not be sampled -> why (their next_ids entry is meaningless).
    errors: dict[int, str] = field(default_factory=dict)


def compute_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """Logprobs as reported: the log_softmax of the raw logits [N, V]."""
    return torch.log_softmax(logits, dim=-1)


def top_logprobs(logprobs: torch.Tensor, k: int) -> tuple[list[float], list[int]]:
    """The ``k`` largest logprobs of one row [V] and their token ids."""
    vals, ids = logprobs.topk(k)
    return vals.tolist(), ids.tolist()


def token_logprobs(logprobs: torch.Tensor, targets: Sequence[int]) -> list[float]:
    """Row i's logprob of token ``targets[i]`` for logprobs [N, V]."""
    index = torch.tensor(targets, device=logprobs.device)[:, None]
    return logprobs.gather(1, index)[:, 0].tolist()


def apply_penalties(logits: torch.Tensor, row: SamplingRow) -> None:
    """In place on one row: OpenAI frequency/presence penalties over the output so
    far, and the multiplicative repetition penalty over prompt and output."""
    p = row.params
    device = logits.device
    if (p.frequency_penalty or p.presence_penalty) and row.output_ids:
        out = torch.tensor(row.output_ids, device=device)
        counts = torch.bincount(out, minlength=logits.numel()).to(logits.dtype)
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    if p.logit_bias:
        ids = torch.tensor(list(p.logit_bias), dtype=torch.long, device=device)
        bias = torch.tensor(list(p.logit_bias.values()), dtype=logits.dtype, device=device)
        logits.index_add_(0, ids, bias)
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(
            [*row.input_ids, *row.output_ids], dtype=torch.long, device=device
        ).unique()
        score = logits[seen]
        logits[seen] = torch.where(
            score < 0, score * p.repetition_penalty, score / p.repetition_penalty
        )


def filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p on one row; returns probabilities."""
    logits = logits / p.temperature
    if p.top_k > 0 and p.top_k < logits.numel():
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Drop a token when the mass before it already reaches top_p (the first always stays).
        drop = (torch.cumsum(sorted_probs, 0) - sorted_probs) >= p.top_p
        probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
    if p.min_p > 0.0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    return probs


class Sampler:
    def __call__(
        self, logits: torch.Tensor, rows: Sequence[SamplingRow], need_logprobs: bool
    ) -> SampleResult:
        logprobs = compute_logprobs(logits) if need_logprobs else None
        top: list[tuple[list[float], list[int]] | None] = [None] * len(rows)
        for i, row in enumerate(rows):
            if row.top_logprobs_num > 0 and logprobs is not None:
                top[i] = top_logprobs(logprobs[i], row.top_logprobs_num)
        constrained = [i for i, r in enumerate(rows) if r.grammar_bits is not None]
        if constrained or any(r.params.has_penalties or r.banned_ids for r in rows):
            logits = logits.clone()
            for i, row in enumerate(rows):
                if row.params.has_penalties:
                    apply_penalties(logits[i], row)
                if row.banned_ids:
                    logits[i, list(row.banned_ids)] = float("-inf")
            if constrained:
                # One masking pass over the constrained rows only.
                idx = torch.tensor(constrained, device=logits.device)
                sub = logits.index_select(0, idx)
                apply_bitmask(sub, torch.stack([rows[i].grammar_bits for i in constrained]))
                logits.index_copy_(0, idx, sub)
        next_ids = logits.argmax(dim=-1).tolist()
        errors: dict[int, str] = {}
        best = logits.max(dim=-1).values
        for i in torch.nonzero(~torch.isfinite(best) | torch.isnan(best)).flatten().tolist():
            # +inf (a logit bias or penalty overflow) or NaN, or -inf: nothing is allowed.
            errors[i] = (
                "no token is allowed (every token is masked)"
                if best[i] == float("-inf")
                else f"the logits are not finite ({float(best[i])})"
            )
        for i, row in enumerate(rows):
            if row.params.is_greedy or i in errors:
                continue
            probs = filter_logits(logits[i], row.params)
            total = float(probs.sum())
            if not math.isfinite(total) or total <= 0.0:
                errors[i] = f"no probability mass left to sample from (sum {total})"
                continue
            next_ids[i] = int(torch.multinomial(probs, 1, generator=row.generator))
        return SampleResult(next_ids, logprobs, top, errors)
