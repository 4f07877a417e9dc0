"""A tolerant, incremental reader of a partial JSON document (see closing_json.py).

``PrefixParser`` reads a prefix of the document a grammar is generating, one
character at a time, and keeps the stack of open objects and arrays (``Frame``)
with, for each, the flattened schemas that can still describe it, and the scalar
in progress (``Leaf``). It can be cloned to look ahead; ``failed`` is set once the
text cannot be read.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from plait.runtime.constrained.closing_json_schema import MAX_BRANCHES, Schemas, allowed_types

_KIND_OF_CHAR = {"{": "object", "[": "array", '"': "string", "t": "boolean", "f": "boolean"}
_KIND_OF_CHAR.update({"n": "null", "-": "number", **{d: "number" for d in "0123456789"}})
LITERALS = ("true", "false", "null")
NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?")


@dataclass
class Frame:
    """An open object or array, or the top level (kind ``root``)."""

    kind: str
    cands: list[dict]
    state: str  # see PrefixParser
    keys: list[str] = field(default_factory=list)  # object: keys so far
    key: str | None = None  # object: the key whose value comes next
    count: int = 0  # array: items so far
    scalars: list[str] = field(default_factory=list)  # array: its scalar items' JSON texts

    def copy(self) -> Frame:
        return Frame(
            self.kind, self.cands, self.state, list(self.keys), self.key, self.count, self.scalars
        )


@dataclass
class Leaf:
    """A scalar in progress: a string (``key`` when it is an object key), a number or a
    literal; ``text`` is its JSON text so far, without the opening quote."""

    kind: str  # string | key | number | literal
    cands: list[dict]
    text: str = ""


class PrefixParser:
    """Reads a JSON prefix; ``frames[-1]`` is the innermost open container.

    Frame states: root ``value`` / ``done``; object ``key_or_end`` (after ``{``),
    ``key`` (after ``,``), ``colon``, ``value``, ``next`` (after a value); array
    ``value_or_end`` (after ``[``), ``value`` (after ``,``), ``next``.
    """

    def __init__(self, schemas: Schemas):
        self.s = schemas
        self.frames = [Frame("root", schemas.flat(schemas.root), "value")]
        self.leaf: Leaf | None = None
        self.failed = False

    def clone(self) -> PrefixParser:
        other = PrefixParser.__new__(PrefixParser)
        other.s, other.failed = self.s, self.failed
        other.frames = [f.copy() for f in self.frames]
        leaf = self.leaf
        other.leaf = None if leaf is None else Leaf(leaf.kind, leaf.cands, leaf.text)
        return other

    def feed(self, text: str) -> None:
        for ch in text:
            if self.failed:
                return
            self._char(ch)

    def _char(self, ch: str) -> None:
        leaf = self.leaf
        if leaf is not None:
            if leaf.kind in ("string", "key"):
                if _string_closed(leaf.text + ch):
                    self._end_leaf()
                else:
                    leaf.text += ch
                return
            if leaf.kind == "number" and ch in "0123456789+-.eE":
                leaf.text += ch
                return
            if leaf.kind == "literal" and ch.isalpha():
                leaf.text += ch
                if leaf.text in LITERALS:
                    self._end_leaf()
                return
            self._end_leaf()
            if self.failed:
                return
        if ch in " \t\r\n":
            return
        f = self.frames[-1]
        st = f.state
        if f.kind == "object":
            if st in ("key_or_end", "key") and ch == '"':
                self.leaf = Leaf("key", f.cands)
            elif st in ("key_or_end", "next") and ch == "}":
                self._close()
            elif st == "next" and ch == ",":
                f.state = "key"
            elif st == "colon" and ch == ":":
                f.state = "value"
            elif st == "value":
                self._start(ch, self.child_cands(f))
            else:
                self.failed = True
        elif f.kind == "array":
            if st in ("value_or_end", "next") and ch == "]":
                self._close()
            elif st == "next" and ch == ",":
                f.state = "value"
            elif st in ("value_or_end", "value"):
                self._start(ch, self.child_cands(f))
            else:
                self.failed = True
        elif st == "value":
            self._start(ch, f.cands)
        else:
            self.failed = True

    def child_cands(self, f: Frame) -> list[dict]:
        subs: list[Any] = []
        for c in f.cands:
            if f.kind == "object":
                subs.append(self.s.property_schema(c, f.key or ""))
            else:
                subs.append(self.s.item_schema(c, f.count))
        out: list[dict] = []
        for sub in subs:
            for flat in self.s.flat(sub):
                if not any(flat is o for o in out):
                    out.append(flat)
        return out[:MAX_BRANCHES] or [{}]

    def _start(self, ch: str, cands: list[dict]) -> None:
        kind = _KIND_OF_CHAR.get(ch)
        if kind is None:
            self.failed = True
            return
        cands = _of_kind(cands, kind)
        if ch == "{":
            self.frames.append(Frame("object", cands, "key_or_end"))
        elif ch == "[":
            self.frames.append(Frame("array", cands, "value_or_end"))
        elif ch == '"':
            self.leaf = Leaf("string", cands)
        elif kind == "number":
            self.leaf = Leaf("number", cands, ch)
        else:
            self.leaf = Leaf("literal", cands, ch)

    def _end_leaf(self) -> None:
        leaf, self.leaf = self.leaf, None
        f = self.frames[-1]
        if leaf.kind == "key":
            try:
                key = json.loads('"' + leaf.text + '"')
            except json.JSONDecodeError:
                self.failed = True
                return
            f.key, f.state = key, "colon"
            allowed = [c for c in f.cands if key_allowed(c, key)]
            f.cands = allowed or f.cands
            return
        if leaf.kind == "number" and not NUMBER.fullmatch(leaf.text):
            self.failed = True
            return
        if leaf.kind == "literal" and leaf.text not in LITERALS:
            self.failed = True
            return
        if f.kind == "array":  # kept for uniqueItems (a new list: copies share the old one)
            text = ('"' + leaf.text + '"') if leaf.kind == "string" else leaf.text
            f.scalars = [*f.scalars, text]
        self._value_done()

    def _close(self) -> None:
        self.frames.pop()
        self._value_done()

    def _value_done(self) -> None:
        after_value(self.frames[-1])


def _string_closed(text: str) -> bool:
    """Whether ``text`` (a string's JSON text after its opening quote, plus one more
    character) ends with the closing quote."""
    if not text.endswith('"'):
        return False
    n = 0
    while n + 1 < len(text) and text[-2 - n] == "\\":
        n += 1
    return n % 2 == 0


def _of_kind(cands: list[dict], kind: str) -> list[dict]:
    kept = []
    for c in cands:
        types = allowed_types(c)
        if "const" in c or isinstance(c.get("enum"), list):
            values = [c["const"]] if "const" in c else c["enum"]
            types = [_kind_of_value(v) for v in values]
        if kind in types or (kind == "number" and "integer" in types):
            kept.append(c)
    return kept or cands


def _kind_of_value(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, str):
        return "string"
    return "array" if isinstance(v, list) else "object"


def key_allowed(s: dict, key: str) -> bool:
    props = s.get("properties")
    if isinstance(props, dict) and key in props:
        return True
    return s.get("additionalProperties", True) is not False or bool(s.get("patternProperties"))


def after_value(f: Frame) -> None:
    """Move a frame past the value that its leaf completes."""
    if f.kind == "object":
        f.keys.append(f.key or "")
        f.key = None
    elif f.kind == "array":
        f.count += 1
    f.state = "done" if f.kind == "root" else "next"
