"""Constrained decoding: the grammar layer between a request's constraint and
the sampler.

A request's ``regex`` / ``json_schema`` / ``ebnf`` / ``choices`` becomes a
:class:`GrammarSpec`; a :class:`GrammarCompiler` compiles it off the caller's
thread into a :class:`CompiledGrammar` (llguidance by default, with outlines-core
and then lenient llguidance as fallbacks: see compiler.py for the policy), and
each request drives its own :class:`Matcher`::

    bitmask = allocate_bitmask(batch, vocab_size)   # int32 [batch, ceil(vocab/32)]
    matcher.fill_mask(bitmask, row)                 # bit i%32 of word i//32: token i allowed
    apply_bitmask(logits, bitmask)                  # disallowed logits -> -inf
    matcher.accept(token)                           # then is_finished() / forced_text()

Modules: spec (GrammarSpec, errors), regexes (typed regexes), vocab
(TokenizerInfo: bytes per token id), bitmask, base (interfaces),
llguidance_backend, outlines_backend, jump_forward (interegular DFA), compiler,
coverage (compile-rate benchmark over a folder of schemas), closing (budget-aware
closing: finish the grammar before max_new_tokens cuts it) with closing_json
(partial JSON + schema -> shortest completions) and closing_regex (shortest DFA
completions).
"""

from __future__ import annotations

from plait.runtime.constrained.base import CompiledGrammar, GrammarBackend, Matcher
from plait.runtime.constrained.bitmask import allocate_bitmask, apply_bitmask
from plait.runtime.constrained.compiler import CacheStats, CompiledResult, GrammarCompiler
from plait.runtime.constrained.llguidance_backend import LlguidanceBackend
from plait.runtime.constrained.outlines_backend import OutlinesBackend
from plait.runtime.constrained.regexes import (
    BOOL_REGEX,
    FLOAT_REGEX,
    INT_REGEX,
    STRING_REGEX,
    choices_to_regex,
)
from plait.runtime.constrained.spec import GrammarError, GrammarSpec, UnsupportedGrammar
from plait.runtime.constrained.vocab import TokenizerInfo

__all__ = [
    "BOOL_REGEX",
    "FLOAT_REGEX",
    "INT_REGEX",
    "STRING_REGEX",
    "CacheStats",
    "CompiledGrammar",
    "CompiledResult",
    "GrammarBackend",
    "GrammarCompiler",
    "GrammarError",
    "GrammarSpec",
    "LlguidanceBackend",
    "Matcher",
    "OutlinesBackend",
    "TokenizerInfo",
    "UnsupportedGrammar",
    "allocate_bitmask",
    "apply_bitmask",
    "choices_to_regex",
]
