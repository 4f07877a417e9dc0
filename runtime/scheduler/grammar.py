"""Grammar steps: token masks, jump-forward and budget-aware closing for
constrained requests.

A constrained request carries a grammar matcher. While the model runs, the
allowed-token bitmask of every constrained request that samples this step is
filled on the grammar thread; output processing masks its logits row with
it. Each sampled token advances the matcher (``accept``). With jump-forward,
text the grammar forces after a sampled token is appended as output tokens
at once (the boundary with the sampled token re-tokenized), and the next step
computes them in one extend pass instead of one decode step each. The sampled
token's own KV is not computed yet when that happens, so re-tokenizing it
never touches the pool. Near the end of the budget, ``BudgetCloser`` steers
the output onto the shortest completion of the grammar.

This part decides which tokens to append; output processing appends them.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from plait.runtime.constrained.bitmask import allocate_bitmask
from plait.runtime.constrained.closing import BudgetCloser
from plait.runtime.request import Req

# Jump-forward tokenizes at most this many characters of forced text per token of
# budget left (a grammar may force megabytes; no token is longer than this).
MAX_CHARS_PER_TOKEN = 32


@dataclass
class GrammarStep:
    """What a sampled token of a constrained request leads to."""

    tokens: list[int]  # to append: the sampled token (or its re-tokenization) + forced ones
    closing: list[int] | None  # a budget closing to append after them, ending the request


class GrammarSteps:
    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        eos_token_ids: tuple[int, ...],
        context_len: int,
    ):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size  # logits width
        self.eos_token_ids = set(eos_token_ids)
        self.context_len = context_len
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="plait-masks")
        self._closer = BudgetCloser(tokenizer, vocab_size, eos_token_ids)

    def close(self) -> None:
        self._thread.shutdown(wait=False)

    def start_masks(self, reqs: list[Req]) -> Future | None:
        """Fill the allowed-token bitmask of every constrained request in ``reqs`` (those
        that sample this step), on the grammar thread, while the forward pass runs (the
        grammar backends release the GIL, and so do torch's kernels). Row i is the i-th
        constrained request. The matchers are not touched again until the step samples."""
        matchers = [r.matcher for r in reqs if r.matcher is not None]
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

        return self._thread.submit(fill)

    def budget_left(self, req: Req) -> int:
        """Output tokens the request may still append (max_new_tokens, context)."""
        return min(
            req.params.max_new_tokens - len(req.output_ids),
            self.context_len - req.fill_len,
        )

    def first_tokens(self, req: Req) -> list[int]:
        """Tokens the grammar forces before anything is sampled (already accepted)."""
        return self.forced_tokens(req, None) if req.jump_forward else []

    def accept(self, req: Req, token: int) -> GrammarStep | None:
        """Advance the matcher over a sampled token, jump forward over forced text and
        check the budget. None when the grammar rejects the token."""
        m = req.matcher
        if not m.accept(token):  # the mask makes this unreachable; never emit it
            return None
        tokens = [token]
        if req.jump_forward and token not in self.eos_token_ids and not m.is_finished():
            forced = self.forced_tokens(req, token)
            if forced and forced[0] is None:  # the boundary re-tokenized: replace `token`
                tokens = forced[1:]
                req.forced_tokens += len(tokens) - 1
            else:
                tokens += forced
                req.forced_tokens += len(forced)
        # Budget-aware closing: near the end of the budget, finish the grammar instead.
        closing = self._closer.check(req, tokens, self.budget_left(req))
        if closing is None:
            return GrammarStep(tokens, None)
        req.forced_tokens -= min(len(tokens) - closing.keep, len(tokens) - 1)
        return GrammarStep(tokens[: closing.keep], closing.tokens)

    def forced_tokens(self, req: Req, last: int | None) -> list:
        """Tokens the grammar forces next, already accepted by the matcher.

        A backend that computes forced tokens itself (llguidance) is trusted with the
        token boundary. Otherwise the forced text is tokenized together with ``last``
        (the sampled token, not computed yet), so the model sees the tokens it would
        have produced; when that changes ``last``, the result starts with None and
        then the replacement tokens (``last`` is rolled back in the matcher).
        """
        m = req.matcher
        # Never more than the request may still emit: a grammar can force far more.
        limit = self.budget_left(req)
        if last is not None:
            limit -= 1  # ``last`` is appended first
        if limit <= 0:
            return []
        if m.computes_forced_tokens:
            return _accept_run(m, m.forced_tokens(limit))
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
            return _accept_run(m, ids[:limit] if last is None else ids[1 : limit + 1])
        m.rollback(1)
        new = _accept_run(m, ids[: limit + 1])
        if not new:  # keep the sampled token after all
            m.accept(last)
            return []
        return [None, *new]

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)


def _accept_run(m: Any, tokens: list[int]) -> list[int]:
    """Accept ``tokens`` in order; return the prefix the matcher took."""
    for i, t in enumerate(tokens):
        if not m.accept(t):
            return tokens[:i]
    return list(tokens)
