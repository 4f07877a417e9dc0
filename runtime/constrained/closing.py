"""Budget-aware constrained decoding: a constrained output that runs out of tokens
still ends as a complete match of its grammar.

A small model often loops inside a JSON value until ``max_new_tokens`` cuts it,
and a cut document does not parse. Here, as the request's remaining budget
(``max_new_tokens`` minus the output so far, also bounded by the context)
comes down to the length of the shortest way to finish the grammar from where
the output stands, decoding takes that way: the *closing* tokens are appended
as forced output (they need no forward pass: the request ends with them).

Closings, by constraint kind (closing_json.py and closing_regex.py build the
candidate texts):

* ``json_schema``: candidates from a tolerant parse of the partial document
  against the schema (close strings, finish numbers and literals, fill
  missing required properties with their shortest valid values, close arrays
  and objects);
* ``regex`` and ``choices``: the shortest accepting path in the regex's DFA
  (interegular) from the state the output leads to;
* ``ebnf``, and every candidate above that fails: a greedy search over the
  request's own matcher, one character token at a time, preferring closing
  characters (quotes, brackets) and penalizing a character each time it is
  used so that loops give way; grammars whose shortest finish needs a
  character the search does not try first may take longer routes or none.

Every closing is checked through the request's own matcher, token by token,
before it is used (and the matcher is rolled back): a candidate is tokenized
by the tokenizer, or else one token per character; a closing the grammar does
not accept to an accepting state is never emitted.

Policy (``BudgetCloser.check``, called once per decode step after the sampled
token and its jump-forward tokens are accepted, before they are appended):
closings are computed every ``PERIOD`` tokens, and at every step while the
budget left is between the last closing length minus ``WINDOW`` and twice the
longest closing seen so far plus ``WINDOW`` (closings swing as the output opens
and closes structures, and a step can add many tokens to one; a closing far
longer than the budget, from a grammar that cannot finish in time, is only
rechecked every ``PERIOD`` tokens). If the step's
closing fits the budget left after the step exactly, the step's tokens and the
closing are appended; if it no longer fits, the step's tokens are dropped
(rolled back in the matcher: their KV was never computed) and the closing
computed at the previous step, which fit, is appended instead. Either way the
request then ends.

Reported (runtime/request.py): ``meta_info["finish_reason"]`` becomes
``{"type": "length", "length": N, "closed": true}``: the budget ended the
request and the output was closed to a complete match (``N`` counts the
closing tokens); ``meta_info["closed_tokens"]`` is the number of closing
tokens (0 when closing did not happen). ``SamplingParams.budget_closing =
False`` turns it off for a request.

Thread discipline: the scheduler calls ``check`` on its own thread while no mask
is being filled (masks are filled on the grammar thread during the forward
pass, and the matchers are only touched after that fill is done).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from plait.runtime.constrained.base import Matcher, split_utf8
from plait.runtime.constrained.bitmask import allocate_bitmask
from plait.runtime.constrained.closing_json import JsonCompleter
from plait.runtime.constrained.closing_regex import RegexCompleter
from plait.runtime.constrained.regexes import ascii_digits, choices_to_regex
from plait.runtime.constrained.spec import GrammarSpec
from plait.runtime.constrained.vocab import TokenizerInfo

logger = logging.getLogger(__name__)

CLOSING_KINDS = ("json_schema", "regex", "ebnf", "choices")
PERIOD = 16  # tokens between closing checks while the budget is far
WINDOW = 8  # tokens of slack past twice the last closing length: check every step
MAX_SEARCH_CHARS = 256  # characters the greedy search may add
REUSE_PENALTY = 12  # ranks a character loses in the greedy search each time it is used
MAX_SPECS = 64  # completers kept (per grammar spec)
# Longer regexes are closed by the search only: interegular's DFA is built in pure
# Python on the scheduler thread and takes long on large patterns.
MAX_REGEX_CHARS = 2000

# Character preferences of the greedy search, as (closers, the rest): after JSON
# (close what is open, then the shortest values), and after anything else
# (brackets, quotes, terminators). Closers are never penalized for reuse.
_JSON_ORDER = ('"}]', "0,:abcdefghijklmnopqrstuvwxyz123456789-.eE+ ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_GENERIC_ORDER = (
    ")]}\"'",
    ";.0a,:bcdefghijklmnopqrstuvwxyz123456789 -+*/=_ABCDEFGHIJKLMNOPQRSTUVWXYZ",
)


@dataclass
class Closing:
    """What ``check`` decided: keep the first ``keep`` tokens of the step, then append
    ``tokens`` (already accepted by the matcher) and end the request."""

    keep: int
    tokens: list[int]


class _Reader:
    """Where a kind-specific completer stands in the output text (incremental)."""

    def __init__(self, completer: Any):
        self.completer = completer
        if isinstance(completer, JsonCompleter):
            self.state: Any = completer.parser()
        else:
            self.state = completer.initial

    def advanced(self, text: str) -> _Reader | None:
        """A reader that has also read ``text``; None once the text leaves the grammar."""
        out = _Reader.__new__(_Reader)
        out.completer = self.completer
        if isinstance(self.completer, JsonCompleter):
            out.state = self.state.clone()
            out.state.feed(text)
            if out.state.failed:
                return None
        else:
            out.state = self.completer.walk(text, self.state) if text else self.state
            if out.state is None:
                return None
        return out

    def completions(self) -> list[str]:
        if isinstance(self.completer, JsonCompleter):
            return self.completer.complete(self.state)
        tail = self.completer.complete_from(self.state)
        return [] if tail is None else [tail]


class _State:
    """One request's closing bookkeeping (``Req.closing``)."""

    def __init__(self, reader: _Reader | None):
        self.reader = reader  # after the text of output_ids[:fed]
        self.fed = 0
        self.pending = b""  # bytes of an unfinished character after output_ids[:fed]
        self.last_at = -PERIOD  # output length at the last computed closing
        self.last_len = 0  # its length in tokens
        self.max_len = 0  # the longest closing seen (a closing grows back to it quickly)
        self.prev: tuple[int, list[int]] | None = None  # (output length, closing) that fit
        self.off = False


class BudgetCloser:
    """Computes and applies closings for one scheduler (one tokenizer)."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: tuple[int, ...] | list[int]):
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._eos = sorted(set(eos_token_ids))
        self._info: TokenizerInfo | None = None
        self._completers: OrderedDict[GrammarSpec, Any] = OrderedDict()
        self._bitmask = allocate_bitmask(1, vocab_size)
        self._byte_token: dict[int, int] = {}  # byte -> its single-byte token (with info)
        self._orders: dict[str, tuple[list[int], int, torch.Tensor, torch.Tensor]] = {}

    # ---- tables ------------------------------------------------------------------

    @property
    def info(self) -> TokenizerInfo:
        """Token bytes (built on first use)."""
        if self._info is None:
            info = TokenizerInfo.from_hf(self._tokenizer, self._vocab_size, self._eos)
            single: dict[int, int] = {}
            for i, b in enumerate(info.token_bytes):
                if len(b) == 1 and i not in self._eos:
                    single.setdefault(b[0], i)
            self._byte_token = single
            self._orders = {
                "json": self._order(_JSON_ORDER),
                "generic": self._order(_GENERIC_ORDER),
            }
            self._info = info
        return self._info

    def _order(
        self, preferred: tuple[str, str]
    ) -> tuple[list[int], int, torch.Tensor, torch.Tensor]:
        """Single-byte token ids in order of preference (then every other byte), how
        many of them are closers, and their bitmask word indices and bit shifts."""
        closers, rest = preferred
        seen: list[int] = []
        for b in [*(closers + rest).encode(), *range(0x20, 0x7F), 0x0A, 0x09, *range(0x80, 0x100)]:
            t = self._byte_token.get(b)
            if t is not None and t not in seen:
                seen.append(t)
        ids = torch.tensor(seen, dtype=torch.int64)
        return seen, len(closers), ids >> 5, (ids & 31).to(torch.int32)

    def text_bytes(self, ids: list[int]) -> bytes:
        tb = self.info.token_bytes
        return b"".join(tb[t] if 0 <= t < len(tb) else b"" for t in ids)

    def completer(self, spec: GrammarSpec) -> Any:
        """The kind-specific completer of ``spec`` (cached), or None (ebnf, or a regex
        interegular cannot read)."""
        if spec in self._completers:
            self._completers.move_to_end(spec)
            return self._completers[spec]
        completer: Any = None
        if spec.kind == "json_schema":
            completer = JsonCompleter(spec.value())
        elif spec.kind == "regex" and len(spec.source) <= MAX_REGEX_CHARS:
            completer = RegexCompleter.of(ascii_digits(spec.source))
        elif spec.kind == "choices":
            completer = RegexCompleter.of(choices_to_regex(spec.value()))
        self._completers[spec] = completer
        while len(self._completers) > MAX_SPECS:
            self._completers.popitem(last=False)
        return completer

    # ---- the closing of one state -----------------------------------------------------

    def closing_tokens(
        self, matcher: Matcher, spec: GrammarSpec, output_ids: list[int], max_tokens: int = 1 << 30
    ) -> list[int] | None:
        """The closing from where ``matcher`` stands after ``output_ids`` (the whole output
        of its grammar), checked through the matcher, which is left as it was; None
        if none of at most ``max_tokens`` tokens was found."""
        ahead, tail = self._read(spec, output_ids)
        return self._closing(matcher, spec.kind, ahead, tail, max_tokens)

    def _read(self, spec: GrammarSpec, output_ids: list[int]) -> tuple[_Reader | None, bytes]:
        """A reader after the whole characters of ``output_ids``, and the bytes of an
        unfinished last character."""
        whole, tail = split_utf8(self.text_bytes(output_ids))
        completer = self.completer(spec)
        if completer is None:
            return None, tail
        return _Reader(completer).advanced(whole.decode("utf-8", errors="replace")), tail

    def _closing(
        self, m: Matcher, kind: str, ahead: _Reader | None, tail: bytes, max_tokens: int
    ) -> list[int] | None:
        """The checked closing from where ``m`` stands. ``ahead`` has read the output's
        whole characters; ``tail`` is the start of an unfinished one."""
        _ = self.info  # the token tables
        prefix = _finish_utf8(tail)
        if ahead is not None and tail:
            ahead = ahead.advanced((tail + prefix).decode("utf-8", errors="replace"))
        for completion in ahead.completions() if ahead is not None else []:
            tokens = self._verified(m, prefix, completion)
            if tokens is not None:
                return tokens if len(tokens) <= max_tokens else None
        first = "json" if kind == "json_schema" else "generic"
        for order in (first, "generic" if first == "json" else "json"):
            tokens = self._search(m, order, min(MAX_SEARCH_CHARS, 8 * max_tokens + 8))
            if tokens is not None:
                text = self.text_bytes(tokens).decode("utf-8", errors="replace")
                shorter = self._verified(m, b"", text)
                if shorter is not None and len(shorter) < len(tokens):
                    tokens = shorter
                return tokens if len(tokens) <= max_tokens else None
        return None

    def _verified(self, m: Matcher, prefix: bytes, text: str) -> list[int] | None:
        """Tokens spelling ``prefix`` + ``text`` that the matcher accepts to an accepting
        state (the tokenizer's, else one per byte), or None; the matcher is unchanged."""
        data = prefix + text.encode("utf-8")
        head = [self._byte_token.get(b) for b in prefix]
        tries = []
        encoded = self._tokenizer.encode(text, add_special_tokens=False) if text else []
        if None not in head and self.text_bytes(encoded) == text.encode("utf-8"):
            tries.append(head + encoded)
        per_byte = [self._byte_token.get(b) for b in data]
        if None not in per_byte and per_byte not in tries:
            tries.append(per_byte)
        for tokens in tries:
            n = 0
            try:
                while n < len(tokens) and m.accept(tokens[n]):
                    n += 1
                if n == len(tokens) and m.can_stop():
                    return tokens
            finally:
                m.rollback(n)
        return None

    def _search(self, m: Matcher, order_name: str, max_chars: int) -> list[int] | None:
        """A greedy walk to an accepting state: forced tokens when the backend knows
        them, else the most preferred allowed character token (less preferred each
        time it is used). The matcher is left unchanged."""
        ids, n_closers, words, shifts = self._orders[order_name]
        accepted: list[int] = []
        uses: dict[int, int] = {}
        try:
            for _ in range(max_chars):
                if m.can_stop():
                    return list(accepted)
                forced = m.forced_tokens(max_chars) if m.computes_forced_tokens else []
                taken = 0
                while taken < len(forced) and m.accept(forced[taken]):
                    accepted.append(forced[taken])
                    taken += 1
                if taken:
                    continue
                self._bitmask.fill_(-1)
                m.fill_mask(self._bitmask, 0)
                row = self._bitmask[0]
                allowed = ((row[words] >> shifts) & 1).tolist()
                best, best_score = None, None
                for rank, (t, ok) in enumerate(zip(ids, allowed)):
                    if best_score is not None and rank >= best_score:
                        break
                    if ok:
                        score = rank + (REUSE_PENALTY * uses.get(t, 0) if rank >= n_closers else 0)
                        if best_score is None or score < best_score:
                            best, best_score = t, score
                if best is None or not m.accept(best):
                    return None
                accepted.append(best)
                uses[best] = uses.get(best, 0) + 1
            return list(accepted) if m.can_stop() else None
        finally:
            m.rollback(len(accepted))

    # ---- the policy ------------------------------------------------------------------

    def check(self, req: Any, step: list[int], budget: int) -> Closing | None:
        """Decide, after the matcher of ``req`` accepted ``step`` (this step's tokens, not
        yet appended), whether the request closes now. ``budget``: tokens the
        request may still append, ``step`` included. None: go on as usual."""
        spec = req.grammar_spec
        if (
            spec is None
            or spec.kind not in CLOSING_KINDS
            or not getattr(req.params, "budget_closing", True)
            or req.matcher is None
        ):
            return None
        st: _State | None = req.closing
        if st is None:
            completer = self.completer(spec)
            st = req.closing = _State(_Reader(completer) if completer is not None else None)
        if st.off or not step:
            return None
        m = req.matcher
        if m.is_finished() or step[-1] in self._eos:
            return None
        n_out = len(req.output_ids)
        left = budget - len(step)  # after this step
        # Every step while the budget left is near the closing length; every PERIOD
        # tokens while it is far, or while the closing is far longer than the budget
        # (a grammar that cannot finish in time: it may still shrink, but checking it
        # every step would only cost time).
        near = st.last_len - WINDOW <= left <= 2 * st.max_len + WINDOW
        due = near or n_out + len(step) - st.last_at >= PERIOD
        if not due:
            return None
        try:
            return self._decide(req, st, step, left)
        except Exception as e:  # never let closing break a request; the matcher is restored
            logger.warning("budget closing of %s failed; turned off for it: %r", req.rid, e)
            st.off = True
            return None

    def _decide(self, req: Any, st: _State, step: list[int], left: int) -> Closing | None:
        m, kind = req.matcher, req.grammar_spec.kind
        n_out = len(req.output_ids)
        data = st.pending + self.text_bytes(req.output_ids[st.fed :] + step)
        whole, tail = split_utf8(data)
        if st.reader is not None:  # None once the output left what the completer reads
            st.reader = st.reader.advanced(whole.decode("utf-8", errors="replace"))
        st.pending, st.fed = tail, n_out + len(step)
        new = self._closing(m, kind, st.reader, tail, 1 << 30)
        st.last_at = n_out + len(step)
        if new is not None:
            st.last_len = len(new)
            st.max_len = max(st.max_len, len(new))
            if len(new) < left or (not new and left == 0):
                st.prev = (n_out + len(step), new)
                return None
            if len(new) == left:
                return self._accept_closing(m, len(step), new)
        elif left > 2 * st.last_len + WINDOW:
            return None
        # The closing after this step does not fit: close from before it instead.
        prev = st.prev[1] if st.prev is not None and st.prev[0] == n_out else None
        if prev is None:
            m.rollback(len(step))
            try:
                ahead, tail = self._read(req.grammar_spec, req.output_ids)
                prev = self._closing(m, kind, ahead, tail, left + len(step))
            finally:
                for t in step:
                    if not m.accept(t):
                        raise RuntimeError(f"could not re-accept token {t} after a rollback")
        if prev is None or len(prev) > left + len(step):
            return None
        m.rollback(len(step))
        return self._accept_closing(m, 0, prev, undo=step)

    def _accept_closing(
        self, m: Matcher, keep: int, tokens: list[int], undo: list[int] | None = None
    ) -> Closing | None:
        for i, t in enumerate(tokens):
            if not m.accept(t):  # checked before: unreachable, but never emit a rejected token
                m.rollback(i)
                for u in undo or []:
                    m.accept(u)
                return None
        return Closing(keep, list(tokens))


def _finish_utf8(tail: bytes) -> bytes:
    """Continuation bytes that finish the unfinished UTF-8 character ``tail`` (b"" if none)."""
    if not tail:
        return b""
    lead = tail[0]
    need = 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
    out = b""
    for i in range(len(tail), need):
        if i == 1 and lead == 0xE0:
            out += b"\xa0"
        elif i == 1 and lead == 0xF0:
            out += b"\x90"
        else:
            out += b"\x80"
    return out
