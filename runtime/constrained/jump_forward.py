"""Forced text for regex grammars, from interegular's character-level DFA.

Jump-forward: when every continuation of the text so far starts with the same
characters (``{"name":"`` after ``{`` in a fixed-key schema), the engine can
append them without a decode step. Here a DFA state is *forcing* when it is not
accepting and has exactly one outgoing edge, labelled with a single character;
the forced text is the chain of such edges. A matcher tracks its DFA state by
walking the generated characters; bytes of an unfinished UTF-8 character wait
until the character completes.

Building the DFA is pure Python (up to ~0.7 s for large schemas), so it is done
once at compile time and stored with the compiled grammar (it pickles).
"""

from __future__ import annotations

import logging

import interegular
from interegular.fsm import anything_else

logger = logging.getLogger(__name__)

MAX_FORCED_CHARS = 4096


class CharDFA:
    """A regex's deterministic automaton over characters, reduced to plain dicts."""

    def __init__(self, fsm: interegular.FSM):
        symbols = dict(fsm.alphabet)
        self._else_key = symbols.pop(anything_else, None)
        self._key_of: dict[str, int] = symbols
        self._single_char = {
            key: chars[0]
            for key, chars in fsm.alphabet.by_transition.items()
            if len(chars) == 1 and chars[0] is not anything_else
        }
        self.initial = fsm.initial
        self.finals = frozenset(fsm.finals)
        self._edges: dict[int, dict[int, int]] = {s: dict(m) for s, m in fsm.map.items()}
        self._forced: dict[int, str] = {}

    @classmethod
    def from_regex(cls, regex: str) -> CharDFA | None:
        """The DFA of ``regex``, or None when interegular cannot build it."""
        try:
            return cls(interegular.parse_pattern(regex).to_fsm())
        except Exception as e:  # interegular raises assorted types on unsupported syntax
            logger.debug("no jump-forward DFA for %.80r: %s", regex, e)
            return None

    def walk(self, state: int | None, text: str) -> int | None:
        """The state after reading ``text`` from ``state``; None once off the DFA."""
        for ch in text:
            if state is None:
                return None
            key = self._key_of.get(ch, self._else_key)
            state = None if key is None else self._edges.get(state, {}).get(key)
        return state

    def forced_from(self, state: int) -> str:
        """The characters every match continues with from ``state`` (cached)."""
        forced = self._forced.get(state)
        if forced is None:
            forced = self._follow_forced_edges(state)
            self._forced[state] = forced
        return forced

    def _follow_forced_edges(self, state: int) -> str:
        out: list[str] = []
        seen = {state}
        while state not in self.finals and len(out) < MAX_FORCED_CHARS:
            edges = self._edges.get(state, {})
            if len(edges) != 1:
                break
            [(key, target)] = edges.items()
            ch = self._single_char.get(key)
            if ch is None or target in seen:
                break
            out.append(ch)
            seen.add(target)
            state = target
        return "".join(out)
