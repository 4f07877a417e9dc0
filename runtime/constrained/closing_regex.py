"""Shortest completions of a regular expression, on interegular's character DFA.

Budget-aware closing (closing.py) asks: the text so far is a prefix of some
match; what is the shortest text that makes it a whole match? In the DFA
that is a breadth-first search from the state the text leads to, to the
nearest accepting state. Each DFA edge stands for a class of characters; the
one written is the most readable of the class (a lowercase letter, then a
digit, an uppercase letter, a space, other printable ASCII), never a quote, a
backslash or a control character unless nothing else is on the edge, so
the completion can sit inside a JSON string without escapes.

``RegexCompleter.of(pattern, search=True)`` reads a JSON Schema ``pattern``
(a search: the match may be anywhere in the string unless ``^``/``$``
anchor it); ``search=False`` is a full match (a request's ``regex``). Building
the DFA is pure Python and can take a moment on large patterns, so completers
are cached by pattern.
"""

from __future__ import annotations

import functools
import logging
import string
from collections import deque

import interegular
from interegular.fsm import anything_else

logger = logging.getLogger(__name__)

# Characters in order of preference when an edge allows several.
_PREFERRED = (
    string.ascii_lowercase
    + string.digits
    + string.ascii_uppercase
    + " -_.:/@,;+=*!?#$%&'()[]{}<>|~^`"
)
_AVOID = '"\\'  # need escapes inside a JSON string


def _rank(ch: str) -> tuple[int, int]:
    i = _PREFERRED.find(ch)
    if i >= 0:
        return (0, i)
    if ch in _AVOID or (ord(ch) < 0x20 or ord(ch) == 0x7F):
        return (2, ord(ch))
    return (1, ord(ch))


class RegexCompleter:
    """The DFA of one pattern, with a shortest-completion query."""

    def __init__(self, fsm: interegular.FSM):
        explicit = {ch for ch in fsm.alphabet if ch is not anything_else}
        self._key_of = {ch: key for ch, key in fsm.alphabet.items() if ch is not anything_else}
        self._else_key = fsm.alphabet.get(anything_else)
        # One representative character per transition key.
        self._char_of: dict[int, str] = {}
        for key, chars in fsm.alphabet.by_transition.items():
            concrete = [c for c in chars if c is not anything_else]
            if anything_else in chars:
                concrete.append(_outside(explicit))
            if concrete:
                self._char_of[key] = min(concrete, key=_rank)
        self.initial = fsm.initial
        self.finals = frozenset(fsm.finals)
        self._moves: dict[int, dict[int, int]] = {s: dict(m) for s, m in fsm.map.items()}
        self._edges: dict[int, list[tuple[str, int]]] = {}
        for state, moves in fsm.map.items():
            edges = [(self._char_of[k], t) for k, t in moves.items() if k in self._char_of]
            self._edges[state] = sorted(edges, key=lambda e: _rank(e[0]))
        self._shortest: dict[int, str | None] = {}

    @staticmethod
    @functools.lru_cache(maxsize=256)
    def of(pattern: str, search: bool = False) -> RegexCompleter | None:
        """The completer of ``pattern`` (cached), or None when interegular cannot read it."""
        regex = _search_regex(pattern) if search else pattern
        try:
            return RegexCompleter(interegular.parse_pattern(regex).to_fsm())
        except Exception as e:  # interegular raises assorted types on unsupported syntax
            logger.debug("no DFA for %.80r: %s", regex, e)
            return None

    def walk(self, text: str, state: int | None = None) -> int | None:
        """The state after reading ``text`` (from the initial state); None once off the DFA."""
        state = self.initial if state is None else state
        for ch in text:
            key = self._key_of.get(ch, self._else_key)
            state = None if key is None else self._moves.get(state, {}).get(key)
            if state is None:
                return None
        return state

    def complete(self, text: str) -> str | None:
        """The shortest text that makes ``text`` + it a match, or None (no match has
        ``text`` as a prefix, or ``text`` leaves the DFA)."""
        state = self.walk(text)
        return None if state is None else self.complete_from(state)

    def complete_from(self, state: int) -> str | None:
        if state in self._shortest:
            return self._shortest[state]
        result: str | None = None
        parent: dict[int, tuple[int, str] | None] = {state: None}
        queue = deque([state])
        while queue:
            s = queue.popleft()
            if s in self.finals:
                chars: list[str] = []
                while parent[s] is not None:
                    prev, ch = parent[s]
                    chars.append(ch)
                    s = prev
                result = "".join(reversed(chars))
                break
            for ch, t in self._edges.get(s, ()):
                if t not in parent:
                    parent[t] = (s, ch)
                    queue.append(t)
        self._shortest[state] = result
        return result


def _outside(explicit: set[str]) -> str:
    """A readable character that none of the pattern's explicit classes names."""
    for ch in _PREFERRED:
        if ch not in explicit:
            return ch
    for code in range(0xA1, 0x3000):
        if chr(code) not in explicit:
            return chr(code)
    return "\u3000"


def _search_regex(pattern: str) -> str:
    """A JSON Schema pattern (a search) as a full-match regex: ``.*(?:p).*``, without
    the ``.*`` on a side that ``^`` or ``$`` anchors (interegular reads no anchors)."""
    core = pattern
    head = tail = r"[\s\S]*"
    if core.startswith("^"):
        core, head = core[1:], ""
    if core.endswith("$") and not _escaped_at(core, len(core) - 1):
        core, tail = core[:-1], ""
    return f"{head}(?:{core}){tail}"


def _escaped_at(text: str, i: int) -> bool:
    """Whether ``text[i]`` is escaped by an odd run of backslashes before it."""
    n = 0
    while i - 1 - n >= 0 and text[i - 1 - n] == "\\":
        n += 1
    return n % 2 == 1
