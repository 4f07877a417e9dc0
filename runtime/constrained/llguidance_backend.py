"""The llguidance backend: regex, JSON schema, Lark/GBNF; compiles in milliseconds.

JSON options (policy):

* no free whitespace (``whitespace_flexible: False``): objects come out compact,
  ``{"a":1,"b":[2,3]}``, the same text outlines-core produces here. A small
  model given free whitespace tends to ramble in it, and fixed separators make
  more of the output forced (jump-forward). A schema may still choose its own
  layout with a top-level ``"x-guidance"`` key (llguidance applies it on top).
* strict by default: unsupported keywords (``not``, ``dependencies``, unknown
  ``format``, ``oneOf`` not provably disjoint) are refused, so the compiler can
  fall back to a backend that supports them. The ``llguidance-lenient`` variant
  (``lenient`` + ``coerce_one_of``) drops what it cannot express: its grammar
  may accept more than the schema, so it is the last resort.

Objects keep JSON Schema semantics: properties in schema order, and extra keys
after them unless the schema says ``"additionalProperties": false``.
"""

from __future__ import annotations

import threading

import llguidance
import torch
from llguidance import LLMatcher, LLTokenizer, TokenizerWrapper

from plait.runtime.constrained.base import CompiledGrammar, GrammarBackend, Matcher, split_utf8
from plait.runtime.constrained.bitmask import row_pointer
from plait.runtime.constrained.regexes import ascii_digits, choices_to_regex
from plait.runtime.constrained.spec import (
    GrammarError,
    GrammarSpec,
    UnsupportedGrammar,
    python_regex_error,
)
from plait.runtime.constrained.vocab import TokenizerInfo

JSON_DEFAULTS = {"whitespace_flexible": False}
# Forced text longer than this many bytes per token of budget is cut before tokenizing.
MAX_FORCED_BYTES_PER_TOKEN = 32
LENIENT_OVERRIDES = {"lenient": True, "coerce_one_of": True}

_tokenizers: dict[str, LLTokenizer] = {}
_tokenizers_lock = threading.Lock()


def llguidance_tokenizer(info: TokenizerInfo) -> LLTokenizer:
    """The LLTokenizer for ``info``, built once per fingerprint (~0.1-0.7 s)."""
    with _tokenizers_lock:
        tok = _tokenizers.get(info.fingerprint)
        if tok is None:
            tok = LLTokenizer(
                TokenizerWrapper(_TokenSource(info)),
                n_vocab=info.vocab_size,
                eos_token=info.eos_token_ids,
            )
            _tokenizers[info.fingerprint] = tok
        return tok


class _TokenSource:
    """What ``llguidance.TokenizerWrapper`` reads: token bytes, specials, encode."""

    def __init__(self, info: TokenizerInfo):
        self.eos_token_id = info.eos_token_ids[0]
        self.bos_token_id = None
        # Special tokens go by name; llguidance marks them so text never matches them.
        self.tokens = [
            info.special_tokens[i].encode("utf-8") if i in info.special_tokens else b
            for i, b in enumerate(info.token_bytes)
        ]
        self.special_token_ids = sorted(info.special_tokens)
        self._encode = info.encode

    def __call__(self, text: str) -> list[int]:
        return self._encode(text)


class LlguidanceBackend(GrammarBackend):
    compile_is_bounded = True  # llguidance's own parser limits bound the work

    def __init__(self, tokenizer_info: TokenizerInfo, lenient: bool = False):
        self.name = "llguidance-lenient" if lenient else "llguidance"
        self._info = tokenizer_info
        self._overrides = LENIENT_OVERRIDES if lenient else None

    def cache_tag(self) -> str:
        return f"{self.name}-{llguidance.__version__}"

    def compile(self, spec: GrammarSpec) -> LlguidanceGrammar:
        tokenizer = llguidance_tokenizer(self._info)
        grammar = self._grammar(spec)
        error = LLMatcher.validate_grammar(grammar, tokenizer)
        if error:
            raise self._refusal(spec, error)
        proto = LLMatcher(tokenizer, grammar, log_level=0)
        if proto.is_error():
            raise UnsupportedGrammar(f"{self.name}: {_short(proto.get_error())}")
        return LlguidanceGrammar(self.name, spec, proto, self._info)

    def _grammar(self, spec: GrammarSpec) -> str:
        try:
            if spec.kind == "json_schema":
                return LLMatcher.grammar_from_json_schema(
                    spec.source, defaults=JSON_DEFAULTS, overrides=self._overrides
                )
            if spec.kind == "ebnf":
                return llguidance.grammar_from("ebnf", spec.source)  # Lark, or GBNF converted
            if spec.kind == "choices":
                return LLMatcher.grammar_from_regex(choices_to_regex(spec.value()))
            return LLMatcher.grammar_from_regex(ascii_digits(spec.source))
        except ValueError as e:
            raise GrammarError(spec.kind, spec.source, _short(str(e))) from None

    def _refusal(self, spec: GrammarSpec, error: str) -> Exception:
        """GrammarError when the input itself is at fault, else UnsupportedGrammar."""
        reason = _short(error)
        if spec.kind == "ebnf":
            return GrammarError(spec.kind, spec.source, f"grammar error: {reason}")
        if spec.kind == "regex":
            bad_syntax = python_regex_error(spec.source)
            if bad_syntax:
                return GrammarError(spec.kind, spec.source, bad_syntax)
        if spec.kind == "json_schema" and reason.startswith("Unsatisfiable schema"):
            return GrammarError(spec.kind, spec.source, reason)
        return UnsupportedGrammar(f"{self.name}: {reason}")


class LlguidanceGrammar(CompiledGrammar):
    def __init__(self, backend: str, spec: GrammarSpec, proto: LLMatcher, info: TokenizerInfo):
        self.backend = backend
        self.spec = spec
        self._proto = proto  # never advanced; each request gets a deep copy (~10 us)
        self._info = info

    def matcher(self) -> LlguidanceMatcher:
        return LlguidanceMatcher(self._proto.deep_copy(), self._info)


class LlguidanceMatcher(Matcher):
    computes_forced_tokens = True

    def __init__(self, matcher: LLMatcher, info: TokenizerInfo):
        self._m = matcher
        self._encode = info.encode
        self._eos = frozenset(info.eos_token_ids)
        self._n_words = info.n_words
        self._n_tokens = 0  # accepted, EOS excluded
        self._eos_accepted = False
        self._eos_in_history = False  # llguidance records EOS only if it was not stopped

    def fill_mask(self, bitmask: torch.Tensor, row: int) -> None:
        ptr = row_pointer(bitmask, row, self._n_words)
        self._m.unsafe_compute_mask_ptr(ptr, self._n_words * 4)

    def accept(self, token_id: int) -> bool:
        if self._eos_accepted:
            return False
        if token_id in self._eos:
            if not self._m.is_accepting():
                return False
            self._eos_in_history = not self._m.is_stopped()
            self._eos_accepted = self._m.consume_token(token_id)
            return self._eos_accepted
        # Checked first: consuming a bad token would leave the matcher in an error state.
        if self._m.validate_tokens([token_id]) != 1 or not self._m.consume_token(token_id):
            return False
        self._n_tokens += 1
        return True

    def rollback(self, n_tokens: int) -> None:
        if n_tokens <= 0:
            return
        if n_tokens > self._n_tokens + self._eos_accepted:
            raise ValueError(
                f"cannot roll back {n_tokens} tokens: only "
                f"{self._n_tokens + self._eos_accepted} accepted"
            )
        undo = n_tokens
        if self._eos_accepted:
            self._eos_accepted = False
            n_tokens -= 1
            undo -= 0 if self._eos_in_history else 1
        self._n_tokens -= n_tokens
        if undo and not self._m.rollback(undo):
            raise RuntimeError(f"llguidance rollback failed: {_short(self._m.get_error())}")

    def is_finished(self) -> bool:
        return self._eos_accepted or self._m.is_stopped()

    def can_stop(self) -> bool:
        return self._eos_accepted or self._m.is_accepting()

    def forced_text(self) -> str:
        if self._eos_accepted:
            return ""
        whole, _ = split_utf8(self._m.compute_ff_bytes())
        return whole.decode("utf-8", errors="replace")

    def forced_tokens(self, limit: int | None = None) -> list[int]:
        if self._eos_accepted or (limit is not None and limit <= 0):
            return []
        if limit is None:
            return self._m.compute_ff_tokens()
        forced = self._m.compute_ff_bytes()
        if len(forced) <= MAX_FORCED_BYTES_PER_TOKEN * limit:
            return self._m.compute_ff_tokens()[:limit]
        # Far more is forced than the budget takes: tokenize just a prefix of it (the
        # cut may split a token, so its last token is dropped).
        whole, _ = split_utf8(forced[: MAX_FORCED_BYTES_PER_TOKEN * (limit + 1)])
        return self._encode(whole.decode("utf-8", errors="replace"))[:-1][:limit]

    def error(self) -> str | None:
        return _short(self._m.get_error()) if self._m.is_error() else None


def _short(message: str) -> str:
    """The informative line of a (multi-line) llguidance error."""
    lines = [ln.strip() for ln in message.strip().splitlines() if ln.strip()]
    detail = next((ln[len("error: ") :] for ln in lines if ln.startswith("error: ")), None)
    text = detail or (lines[0] if lines else message)
    return text if len(text) <= 300 else text[:297] + "..."
