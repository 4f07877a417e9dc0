"""Shortest ways to finish a partial JSON document under a JSON schema.

``JsonCompleter(schema).completions(text)`` reads ``text`` (a prefix of the
document the grammar is generating) with a tolerant incremental parser that
keeps the stack of open objects and arrays and, for each, the schemas that
can still describe it, and returns candidate completion texts, shortest
first. A completion:

* finishes the value in progress: closes a string (completing an escape,
  padding to ``minLength``, finishing a ``pattern`` or ``format`` through a
  regex DFA, or finishing an ``enum``/``const`` string it is a prefix of),
  finishes a number (a digit after ``-``, ``.`` or an exponent, digits until
  ``minimum``/``maximum``/``multipleOf`` hold) or a ``true``/``false``/``null``;
* finishes an object key with the shortest property name it can still be
  (properties come in schema order, as the grammars emit them), then its value;
* fills each missing ``required`` property, in schema order, with the
  shortest value its subschema allows (``$ref`` resolved, ``const``/``enum``
  first, a ``type`` list, ``minimum``, ``minLength``, ``minItems``,
  ``pattern``, ``format``, ``anyOf``/``oneOf`` take the shortest branch,
  ``allOf`` merged), and pads arrays to ``minItems`` (distinct items under
  ``uniqueItems``);
* closes every open array and object.

Where a schema leaves a choice (``anyOf`` branches, which key to add), each
choice is a candidate; the caller (closing.py) keeps the first one the
request's grammar accepts token by token, so a candidate this module gets
wrong (``not``, ``if``/``then``, ``patternProperties``, ``contains``) costs
only a rejected try. Output is compact (no whitespace), like the backends'.

The parser lives in closing_json_parser.py, what a schema admits (shortest values,
numeric checks, string formats) in closing_json_schema.py; this module turns the
parser's open frames into completion texts.
"""

from __future__ import annotations

import itertools
import json
import re
from typing import Any

from plait.runtime.constrained.closing_json_parser import (
    LITERALS,
    NUMBER,
    Frame,
    Leaf,
    PrefixParser,
    after_value,
)
from plait.runtime.constrained.closing_json_schema import (
    FORMAT_REGEXES,
    Schemas,
    allowed_types,
    as_int,
    dump,
    missing_required,
    number_ok,
)
from plait.runtime.constrained.closing_regex import RegexCompleter

MAX_CANDIDATES = 8  # completion texts returned (each costs a grammar check)


class JsonCompleter:
    """Completions of partial JSON documents under one schema (reusable, not
    thread-safe: one scheduler thread)."""

    def __init__(self, schema: Any):
        self.schemas = Schemas(schema)

    def parser(self) -> PrefixParser:
        """A parser at the start of a document: ``feed`` it text, ``clone`` it to
        look ahead, and pass it to ``complete``."""
        return PrefixParser(self.schemas)

    def completions(self, text: str) -> list[str]:
        """Candidate texts that finish ``text`` as a document valid under the schema,
        shortest first; [] when ``text`` cannot be read."""
        p = self.parser()
        p.feed(text)
        return self.complete(p)

    def complete(self, p: PrefixParser) -> list[str]:
        """``completions`` for the text a parser has read (the parser is unchanged)."""
        if p.failed:
            return []
        levels: list[list[str]] = []
        frames = [f.copy() for f in p.frames]
        if p.leaf is not None:
            leaf = p.leaf
            if leaf.kind == "key":
                levels.append(self._key_tails(frames.pop(), leaf.text))
            else:
                tails = self._leaf_tails(leaf)
                levels.append(tails)
                if tails and frames[-1].kind == "array":  # for uniqueItems
                    quote = '"' if leaf.kind == "string" else ""
                    frames[-1].scalars = [*frames[-1].scalars, quote + leaf.text + tails[0]]
            if frames:
                after_value(frames[-1])
        while frames:
            levels.append(self._close_tails(frames.pop()))
            if frames:
                after_value(frames[-1])
        return _combine(levels)

    # -- scalars --

    def _leaf_tails(self, leaf: Leaf) -> list[str]:
        out: list[str] = []
        for c in leaf.cands:
            if leaf.kind == "string":
                out += self._string_tails(c, leaf.text)
            elif leaf.kind == "number":
                out += _number_tails(c, leaf.text)
            else:
                out += [lit[len(leaf.text) :] for lit in LITERALS if lit.startswith(leaf.text)]
        return _ordered(out)

    def _string_tails(self, s: dict, raw: str) -> list[str]:
        values = [s["const"]] if "const" in s else s.get("enum")
        if isinstance(values, list):
            return [
                dump(v)[1 + len(raw) :]
                for v in values
                if isinstance(v, str) and dump(v)[1:].startswith(raw)
            ]
        out = []
        for escape_tail in _escape_tails(raw):
            try:
                content = json.loads('"' + raw + escape_tail + '"')
            except json.JSONDecodeError:
                continue
            rest = _string_rest(s, content)
            if rest is not None:
                out.append(escape_tail + dump(rest)[1:])
        return out

    # -- containers --

    def _key_tails(self, f: Frame, raw: str) -> list[str]:
        """Finish an object key, its value and the object."""
        out: list[str] = []
        for c in f.cands:
            for key in _next_keys(c, f.keys):
                text = dump(key)[1:]
                if text.startswith(raw):
                    out += self._pair_tails(c, f.keys, key, text[len(raw) :])
            listed = c.get("properties") or {}
            if c.get("additionalProperties", True) is not False and not any(
                k in listed for k in missing_required(c, f.keys)
            ):
                for esc in _escape_tails(raw):
                    try:
                        key = json.loads('"' + raw + esc + '"')
                    except json.JSONDecodeError:
                        continue
                    if key not in listed:
                        out += self._pair_tails(c, f.keys, key, esc + '"')
        return _ordered(out)

    def _pair_tails(self, c: dict, keys: list[str], key: str, key_tail: str) -> list[str]:
        value = self.schemas.shortest(self.schemas.property_schema(c, key))
        rest = self.schemas.object_fill(c, [*keys, key])
        if not value or rest is None:
            return []
        return [key_tail + ":" + value[0] + ("," + rest if rest else "") + "}"]

    def _close_tails(self, f: Frame) -> list[str]:
        if f.kind == "root":
            if f.state == "done":
                return [""]
            return _ordered(o for c in f.cands for o in self.schemas.shortest(c)[:2])
        out: list[str] = []
        for c in f.cands:
            text = self._close_one(f, c)
            if text is not None:
                out.append(text)
        return _ordered(out)

    def _close_one(self, f: Frame, c: dict) -> str | None:
        s = self.schemas
        if f.kind == "object":
            keys, head = list(f.keys), ""
            if f.state in ("colon", "value"):
                value = s.shortest(s.property_schema(c, f.key or ""))
                if not value:
                    return None
                head = (":" if f.state == "colon" else "") + value[0]
                keys.append(f.key or "")
            elif f.state == "key":  # after a comma: one more pair is due
                key = next(iter(missing_required(c, keys)), None)
                if key is None:
                    key = next(iter(_next_keys(c, keys)), None)
                if key is None and c.get("additionalProperties", True) is not False:
                    key = ""
                value = s.shortest(s.property_schema(c, key)) if key is not None else []
                if not value:
                    return None
                head = dump(key) + ":" + value[0]
                keys.append(key)
            rest = s.object_fill(c, keys)
            if rest is None:
                return None
            if rest and (head or f.state == "next"):
                rest = "," + rest
            return head + rest + "}"
        # array
        n, items = f.count, []
        need = as_int(c.get("minItems"), 0) - n
        if f.state == "value":
            need = max(need, 1)
        for i in range(max(need, 0)):
            options = s.shortest(s.item_schema(c, n + i))
            if c.get("uniqueItems"):
                options = [o for o in options if o not in f.scalars and o not in items]
            if not options:
                return None
            items.append(options[0])
        lead = "," if items and f.state == "next" else ""
        return lead + ",".join(items) + "]"


def _next_keys(s: dict, keys: list[str]) -> list[str]:
    """The listed properties that may still come after ``keys``, in schema order:
    before the next missing required one (which cannot be skipped)."""
    props = list(s.get("properties") or {})
    after = max((props.index(k) for k in keys if k in props), default=-1)
    required = set(s.get("required") or [])
    out = []
    for k in props[after + 1 :]:
        out.append(k)
        if k in required:
            break
    return out


def _escape_tails(raw: str) -> list[str]:
    """Ways to finish an escape that ``raw`` (string content so far) ends inside."""
    n = 0
    while n < len(raw) and raw[-1 - n] == "\\":
        n += 1
    if n % 2 == 1:
        return ["n", "/", "\\"]
    m = re.search(r"\\u([0-9a-fA-F]{0,3})$", raw)
    if m and not _escaped_at(raw, m.start()):
        digits = m.group(1)
        return ["0041"[len(digits) :] if "0041".startswith(digits) else "0" * (4 - len(digits))]
    return [""]


def _escaped_at(text: str, i: int) -> bool:
    n = 0
    while i - 1 - n >= 0 and text[i - 1 - n] == "\\":
        n += 1
    return n % 2 == 1


def _string_rest(s: dict, content: str) -> str | None:
    """Characters to add to a string holding ``content`` so that it is valid under ``s``."""
    rest = ""
    pattern, fmt = s.get("pattern"), s.get("format")
    if isinstance(pattern, str):
        c = RegexCompleter.of(pattern, search=True)
        if c is not None:
            rest = c.complete(content)
            if rest is None:
                return None
    elif isinstance(fmt, str) and fmt in FORMAT_REGEXES:
        found = None
        for regex in FORMAT_REGEXES[fmt]:
            c = RegexCompleter.of(regex)
            found = c.complete(content) if c is not None else None
            if found is not None:
                break
        if found is None:
            return None
        rest = found
    short = as_int(s.get("minLength"), 0) - len(content) - len(rest)
    return rest + "a" * max(short, 0)


def _number_tails(s: dict, text: str) -> list[str]:
    """Digits (and the like) that finish the number ``text`` valid under ``s``."""
    integer = "integer" in allowed_types(s) and "number" not in allowed_types(s)
    for width in range(4):
        for digits in itertools.product("0123456789", repeat=width):
            tail = "".join(digits)
            full = text + tail
            if not NUMBER.fullmatch(full):
                continue
            value = float(full)
            if integer and not value.is_integer():
                continue
            if number_ok(s, value, integer):
                return [tail]
    return []


def _ordered(options: Any) -> list[str]:
    return sorted(dict.fromkeys(options), key=len)


def _combine(levels: list[list[str]]) -> list[str]:
    """Candidate completions: the shortest option at every level, then variants that
    change one level's choice; shortest first, at most MAX_CANDIDATES."""
    if any(not options for options in levels):
        return []
    best = [options[0] for options in levels]
    out = {"".join(best)}
    for i, options in enumerate(levels):
        for alt in options[1:MAX_CANDIDATES]:
            out.add("".join(best[:i] + [alt] + best[i + 1 :]))
    return sorted(out, key=len)[:MAX_CANDIDATES]
