"""The three interfaces every grammar backend implements.

* :class:`GrammarBackend` compiles a :class:`GrammarSpec` into a
  :class:`CompiledGrammar` (immutable, cached, shared between requests);
* ``CompiledGrammar.matcher()`` makes a :class:`Matcher`, the per-request state
  the sampler drives: ``fill_mask`` -> sample -> ``accept`` (-> ``rollback``).

A matcher is not thread-safe: one request, one thread at a time. Compiled
grammars may be shared across threads.
"""

from __future__ import annotations

import abc

import torch

from plait.runtime.constrained.spec import GrammarSpec


class Matcher(abc.ABC):
    """Where one request stands in its grammar.

    ``computes_forced_tokens``: ``forced_tokens()`` gives the forced tokens with
    the token boundary already handled, so jump-forward uses them as they are;
    otherwise it tokenizes ``forced_text()`` itself.
    """

    computes_forced_tokens = False

    @abc.abstractmethod
    def fill_mask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into ``bitmask[row]`` (see bitmask.py).

        EOS ids are allowed exactly when the grammar is in an accepting state.
        """

    @abc.abstractmethod
    def accept(self, token_id: int) -> bool:
        """Advance by one token; False (state unchanged) if it is not allowed."""

    @abc.abstractmethod
    def rollback(self, n_tokens: int) -> None:
        """Undo the last ``n_tokens`` accepted tokens (EOS included)."""

    @abc.abstractmethod
    def is_finished(self) -> bool:
        """EOS was accepted, or nothing but EOS can follow."""

    @abc.abstractmethod
    def can_stop(self) -> bool:
        """The text so far is complete: EOS is allowed."""

    @abc.abstractmethod
    def forced_text(self) -> str:
        """The text every continuation starts with ("" if none), for jump-forward."""

    def forced_tokens(self, limit: int | None = None) -> list[int]:
        """Token ids every continuation starts with (at most ``limit``), where the
        backend knows them."""
        return []

    def error(self) -> str | None:
        """Why the matcher can go no further (a grammar too large to run, say), or None."""
        return None


class CompiledGrammar(abc.ABC):
    """A compiled constraint; makes one :class:`Matcher` per request."""

    backend: str
    spec: GrammarSpec

    @abc.abstractmethod
    def matcher(self) -> Matcher: ...


class GrammarBackend(abc.ABC):
    """Compiles specs for one tokenizer.

    ``compile_is_bounded``: the backend limits its own compile work (so it runs
    inline); otherwise the compiler runs it under ``compile_timeout_s``.
    ``persistent``: compiled grammars survive ``dump``/``load`` (disk cache).
    """

    name: str
    compile_is_bounded: bool = True
    persistent: bool = False

    @abc.abstractmethod
    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        """Raise GrammarError for invalid input, UnsupportedGrammar when unable."""

    def cache_tag(self) -> str:
        """Identifies the on-disk format (library versions); part of disk cache keys."""
        return self.name

    def dump(self, grammar: CompiledGrammar) -> bytes:
        raise NotImplementedError(f"{self.name} grammars are not persistent")

    def load(self, data: bytes) -> CompiledGrammar:
        raise NotImplementedError(f"{self.name} grammars are not persistent")


def split_utf8(data: bytes) -> tuple[bytes, bytes]:
    """Split ``data`` into whole UTF-8 characters and an incomplete tail (<= 3 bytes)."""
    for back in range(1, min(3, len(data)) + 1):
        b = data[-back]
        if b & 0xC0 == 0x80:  # continuation byte: look further back
            continue
        need = 2 if b & 0xE0 == 0xC0 else 3 if b & 0xF0 == 0xE0 else 4 if b & 0xF8 == 0xF0 else 1
        if need > back:
            return data[:-back], data[-back:]
        break
    return data, b""
