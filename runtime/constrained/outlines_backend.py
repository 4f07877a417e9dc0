"""The outlines-core backend: JSON schema -> regex -> token-level index.

The index is exact for what the regex says, but building it can take seconds
to minutes for large schemas, so the compiler runs it under a deadline. Index
objects pickle: compiled grammars are kept in the compiler's disk cache. JSON
is compact (no whitespace pattern), matching the llguidance backend's output.
Recursive schemas are unrolled to depth 3; EBNF is not supported. A schema using
a keyword the regex would silently drop (``minimum``, ``oneOf``, ``not``, ...:
see UNENFORCED) is refused, so the compiler falls back instead of producing
outputs that may break the schema. Jump-forward
comes from interegular (jump_forward.py), since the index has no forced-text query.
"""

from __future__ import annotations

import importlib.metadata
import pickle
import threading
from typing import Any

import torch
from outlines_core import Guide, Index, Vocabulary
from outlines_core.json_schema import build_regex_from_schema

from plait.runtime.constrained.base import CompiledGrammar, GrammarBackend, Matcher, split_utf8
from plait.runtime.constrained.bitmask import row_pointer, set_bits
from plait.runtime.constrained.jump_forward import CharDFA
from plait.runtime.constrained.regexes import ascii_digits, choices_to_regex
from plait.runtime.constrained.spec import (
    GrammarError,
    GrammarSpec,
    UnsupportedGrammar,
    python_regex_error,
)
from plait.runtime.constrained.vocab import TokenizerInfo

POLICY = 2  # 2: refuses schemas with keywords it does not enforce
MAX_ROLLBACK_TOKENS = 1 << 20  # the guide keeps this many past states (grown on demand)


class OutlinesBackend(GrammarBackend):
    name = "outlines"
    compile_is_bounded = False
    persistent = True

    def __init__(self, tokenizer_info: TokenizerInfo):
        self._info = tokenizer_info
        self._vocabulary: Vocabulary | None = None
        self._lock = threading.Lock()

    def cache_tag(self) -> str:
        # The policy version changes when what this backend accepts changes, so a
        # grammar cached on disk under an older policy is not picked up.
        return f"outlines-{importlib.metadata.version('outlines-core')}-policy{POLICY}"

    def compile(self, spec: GrammarSpec) -> OutlinesGrammar:
        regex = self._regex(spec)
        try:
            index = Index(regex, self._vocab())
        except ValueError as e:
            bad_syntax = python_regex_error(regex) if spec.kind == "regex" else None
            if bad_syntax:
                raise GrammarError(spec.kind, spec.source, bad_syntax) from None
            raise UnsupportedGrammar(f"outlines: {_first_line(e)}") from None
        return OutlinesGrammar(spec, regex, index, CharDFA.from_regex(regex), self._info)

    def dump(self, grammar: CompiledGrammar) -> bytes:
        if not isinstance(grammar, OutlinesGrammar):
            raise TypeError(f"not an outlines grammar: {type(grammar).__name__}")
        g = grammar
        return pickle.dumps((g.spec.kind, g.spec.source, g.regex, g.index, g.dfa))

    def load(self, data: bytes) -> OutlinesGrammar:
        kind, source, regex, index, dfa = pickle.loads(data)
        return OutlinesGrammar(GrammarSpec(kind, source), regex, index, dfa, self._info)

    def _regex(self, spec: GrammarSpec) -> str:
        if spec.kind == "regex":
            return ascii_digits(spec.source)
        if spec.kind == "choices":
            return choices_to_regex(spec.value())
        if spec.kind == "json_schema":
            unenforced = sorted(unenforced_keywords(spec.value()))
            if unenforced:  # outlines would drop them silently: outputs could break them
                raise UnsupportedGrammar(f"outlines: does not enforce {', '.join(unenforced)}")
            try:
                return build_regex_from_schema(spec.source, whitespace_pattern="")
            except ValueError as e:
                raise UnsupportedGrammar(f"outlines: {_first_line(e)}") from None
        raise UnsupportedGrammar(f"outlines: {spec.kind} grammars are not supported")

    def _vocab(self) -> Vocabulary:
        """outlines' byte-string -> ids map (built here: from_pretrained needs the hub)."""
        with self._lock:
            if self._vocabulary is None:
                eos = set(self._info.eos_token_ids)
                ids_of: dict[bytes, list[int]] = {}
                for i, b in enumerate(self._info.token_bytes):
                    if b and i not in eos:
                        ids_of.setdefault(b, []).append(i)
                self._vocabulary = Vocabulary(self._info.eos_token_ids[0], ids_of)
            return self._vocabulary


class OutlinesGrammar(CompiledGrammar):
    backend = "outlines"

    def __init__(
        self,
        spec: GrammarSpec,
        regex: str,
        index: Index,
        dfa: CharDFA | None,
        info: TokenizerInfo,
    ):
        self.spec = spec
        self.regex = regex
        self.index = index
        self.dfa = dfa
        self.info = info
        self._only_eos_after: dict[int, bool] = {}

    def matcher(self) -> OutlinesMatcher:
        return OutlinesMatcher(self)

    def only_eos_after(self, state: int) -> bool:
        """Whether index state ``state`` allows nothing but EOS (cached per state)."""
        done = self._only_eos_after.get(state)
        if done is None:
            eos = set(self.info.eos_token_ids)
            done = all(t in eos for t in self.index.get_allowed_tokens(state))
            self._only_eos_after[state] = done
        return done


class OutlinesMatcher(Matcher):
    def __init__(self, grammar: OutlinesGrammar):
        self._g = grammar
        self._guide = Guide(grammar.index, max_rollback=MAX_ROLLBACK_TOKENS)
        self._eos = grammar.info.eos_token_ids
        self._n_words = grammar.info.n_words
        self._eos_accepted = False
        # Per accepted token: (DFA state after it or None, bytes of an unfinished character).
        dfa = grammar.dfa
        self._text_states: list[tuple[int | None, bytes]] = [(dfa.initial if dfa else None, b"")]

    def fill_mask(self, bitmask: torch.Tensor, row: int) -> None:
        ptr = row_pointer(bitmask, row, self._n_words)
        if self._eos_accepted:
            bitmask[row].zero_()
            set_bits(bitmask, row, self._eos, True)
            return
        self._guide.write_mask_into(ptr, self._n_words, 4)
        if len(self._eos) > 1 and self._guide.is_finished():
            set_bits(bitmask, row, self._eos[1:], True)  # outlines knows one EOS id

    def accept(self, token_id: int) -> bool:
        if self._eos_accepted:
            return False
        if token_id in self._eos:
            self._eos_accepted = self._guide.is_finished()
            return self._eos_accepted
        data = self._g.info.token_bytes[token_id] if token_id < self._g.info.vocab_size else b""
        if not data:
            return False
        try:
            self._guide.advance(token_id, return_tokens=False)
        except ValueError:
            return False
        self._text_states.append(self._walk(data))
        return True

    def rollback(self, n_tokens: int) -> None:
        if n_tokens <= 0:
            return
        accepted = len(self._text_states) - 1 + self._eos_accepted
        if n_tokens > accepted:
            raise ValueError(f"cannot roll back {n_tokens} tokens: only {accepted} accepted")
        if self._eos_accepted:
            self._eos_accepted = False
            n_tokens -= 1
        if n_tokens:
            self._guide.rollback_state(n_tokens)
            del self._text_states[-n_tokens:]

    def is_finished(self) -> bool:
        if self._eos_accepted:
            return True
        return self._guide.is_finished() and self._g.only_eos_after(self._guide.get_state())

    def can_stop(self) -> bool:
        return self._eos_accepted or self._guide.is_finished()

    def forced_text(self) -> str:
        state, pending = self._text_states[-1]
        if self._eos_accepted or state is None or pending:
            return ""
        return self._g.dfa.forced_from(state)

    def _walk(self, data: bytes) -> tuple[int | None, bytes]:
        state, pending = self._text_states[-1]
        if state is None:
            return None, b""
        whole, pending = split_utf8(pending + data)
        try:
            text = whole.decode("utf-8")
        except UnicodeDecodeError:
            return None, b""
        return self._g.dfa.walk(state, text), pending


# Keywords that restrict a value but that outlines-core's schema-to-regex ignores
# (checked against outlines-core 0.2.14: the regex is the same with and without
# them), and oneOf, which it builds as anyOf. Ignored keywords that only *allow*
# more (additionalProperties, patternProperties) are safe: outlines then emits
# no extra keys, a narrower but valid output.
UNENFORCED = frozenset(
    {
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "multipleOf",
        "uniqueItems",
        "contains",
        "maxProperties",
        "propertyNames",
        "dependencies",
        "dependentRequired",
        "dependentSchemas",
        "not",
        "if",
        "oneOf",
    }
)
# Keys whose values map names to subschemas, and keys whose values are data.
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_DATA = ("enum", "const", "default", "examples", "required", "description", "title")


def unenforced_keywords(schema: Any) -> set[str]:
    """The keywords of ``schema`` (anywhere in it) that outlines would not enforce."""
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, list):
            for item in node:
                walk(item)
            return
        if not isinstance(node, dict):
            return
        for key, value in node.items():
            if key in UNENFORCED and not (key == "oneOf" and len(value or []) <= 1):
                found.add(key)
            if key in _SCHEMA_MAPS and isinstance(value, dict):
                for sub in value.values():
                    walk(sub)
            elif key not in _DATA:
                walk(value)

    walk(schema)
    return found


def _first_line(error: Exception, limit: int = 200) -> str:
    text = str(error).strip()
    line = text.splitlines()[0].strip() if text else type(error).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."
