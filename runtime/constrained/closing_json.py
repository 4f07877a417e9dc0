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
"""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from plait.runtime.constrained.closing_regex import RegexCompleter

MAX_CANDIDATES = 8  # completion texts returned (each costs a grammar check)
MAX_BRANCHES = 8  # alternatives kept per value (anyOf/oneOf)
MAX_DEPTH = 24  # schema nesting followed when building a shortest value
_TYPES = ("null", "boolean", "integer", "number", "string", "array", "object")
_KIND_OF_CHAR = {"{": "object", "[": "array", '"': "string", "t": "boolean", "f": "boolean"}
_KIND_OF_CHAR.update({"n": "null", "-": "number", **{d: "number" for d in "0123456789"}})
_LITERALS = ("true", "false", "null")
_ANY: dict = {}  # the schema that admits anything
_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?")
# Regexes for string formats (full match), used to finish or fill such strings;
# where two are given, the first makes values Python's format checks accept too.
_DATE = r"-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
_TIME = r"([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})"
FORMAT_REGEXES: dict[str, tuple[str, ...]] = {
    "date": ("[1-9][0-9]{3}" + _DATE, "[0-9]{4}" + _DATE),
    "time": (_TIME,),
    "date-time": ("[1-9][0-9]{3}" + _DATE + "[Tt]" + _TIME, "[0-9]{4}" + _DATE + "[Tt ]" + _TIME),
    "email": (r"[a-zA-Z0-9._%+-]+@[a-zA-Z0-9-]+(\.[a-zA-Z0-9-]+)*\.[a-zA-Z]{2,}",),
    "ipv4": (
        r"((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}"
        r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])",
    ),
    "uuid": (r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",),
    "hostname": (
        r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?(\.[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)*",
    ),
    "uri": (r"[a-zA-Z][a-zA-Z0-9+.-]*:[^ \"\\]*",),
    "duration": (r"P([0-9]+D|T[0-9]+S)",),
}


# ---- schemas ---------------------------------------------------------------------------


class Schemas:
    """A root schema with ``$ref`` resolution, branch flattening and shortest values."""

    def __init__(self, root: Any):
        self.root = root if isinstance(root, dict) else {}
        # Caches by id(schema), each entry holding its schema so that the id stays unique.
        self._flat: dict[int, tuple[Any, list[dict]]] = {}
        self._shortest: dict[int, tuple[Any, list[str]]] = {}
        self._busy: set[int] = set()

    # -- resolution --

    def resolve(self, ref: str) -> Any:
        if not ref.startswith("#"):
            return None
        node: Any = self.root
        for part in ref[1:].split("/"):
            if not part:
                continue
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return None
        return node

    def flat(self, schema: Any, depth: int = 0) -> list[dict]:
        """``schema`` as alternatives without ``$ref``/``allOf``/``anyOf``/``oneOf`` at
        the top (the rest of the schema merged into each branch); [] if unsatisfiable."""
        if schema is True or schema is None:
            return [_ANY]
        if schema is False or not isinstance(schema, dict):
            return []
        cached = self._flat.get(id(schema))
        if cached is not None:
            return cached[1]
        if depth > MAX_DEPTH:
            return [_ANY]
        out: list[dict] = []
        base = dict(schema)
        ref = base.pop("$ref", None)
        all_of = base.pop("allOf", None)
        branches = (base.pop("anyOf", None) or []) + (base.pop("oneOf", None) or [])
        parts: list[list[dict]] = [[base]]
        if isinstance(ref, str):
            parts.append(self.flat(self.resolve(ref), depth + 1))
        for sub in all_of if isinstance(all_of, list) else []:
            parts.append(self.flat(sub, depth + 1))
        if branches:
            alts: list[dict] = []
            for b in branches:
                alts += self.flat(b, depth + 1)
            parts.append(alts[:MAX_BRANCHES])
        for combo in itertools.islice(itertools.product(*parts), MAX_BRANCHES):
            merged: dict | None = {}
            for piece in combo:
                merged = _merge(merged, piece) if merged is not None else None
            if merged is not None:
                out.append(merged)
        self._flat[id(schema)] = (schema, out)  # the schema kept alive: its id is the key
        return out

    # -- children --

    def property_schema(self, obj: dict, key: str) -> Any:
        props = obj.get("properties")
        if isinstance(props, dict) and key in props:
            return props[key]
        pattern_props = obj.get("patternProperties")
        if isinstance(pattern_props, dict):
            for pattern, sub in pattern_props.items():
                try:
                    if re.search(pattern, key):
                        return sub
                except re.error:
                    continue
        return obj.get("additionalProperties", True)

    def item_schema(self, arr: dict, index: int) -> Any:
        prefix = arr.get("prefixItems")
        items = arr.get("items")
        if isinstance(items, list):  # draft 4-7 tuple form
            prefix, items = items, arr.get("additionalItems", True)
        if isinstance(prefix, list) and index < len(prefix):
            return prefix[index]
        return True if items is None else items

    # -- shortest values --

    def shortest(self, schema: Any, depth: int = 0) -> list[str]:
        """Up to a few distinct JSON texts valid under ``schema``, shortest first."""
        key = id(schema)
        cached = self._shortest.get(key)
        if cached is not None:
            return cached[1]
        if depth > MAX_DEPTH or key in self._busy:
            return []
        self._busy.add(key)
        try:
            options: list[str] = []
            for flat in self.flat(schema, depth):
                options += self._shortest_flat(flat, depth)
        finally:
            self._busy.discard(key)
        result = sorted(set(options), key=lambda s: (len(s), s))[:4]
        self._shortest[key] = (schema, result)
        return result

    def _shortest_flat(self, s: dict, depth: int) -> list[str]:
        if "const" in s:
            return [_dump(s["const"])]
        if isinstance(s.get("enum"), list):
            return sorted((_dump(v) for v in s["enum"]), key=len)[:4]
        out: list[str] = []
        for t in allowed_types(s):
            if t == "null":
                out.append("null")
            elif t == "boolean":
                out += ["true", "false"]
            elif t in ("integer", "number"):
                out += _numbers(s, t == "integer")
            elif t == "string":
                out += [_dump(v) for v in _strings(s)]
            elif t == "array":
                text = self._shortest_array(s, depth)
                if text is not None:
                    out.append(text)
            elif t == "object":
                text = self._shortest_object(s, depth)
                if text is not None:
                    out.append(text)
        return out

    def _shortest_array(self, s: dict, depth: int) -> str | None:
        n = _int(s.get("minItems"), 0)
        prefix = s.get("prefixItems") or (s["items"] if isinstance(s.get("items"), list) else [])
        contains = s.get("contains")
        if contains is not None and _int(s.get("minContains"), 1) > 0:
            n = max(n, 1)
        items: list[str] = []
        for i in range(n):
            sub = contains if (i == 0 and contains is not None and not prefix) else None
            options = self.shortest(sub if sub is not None else self.item_schema(s, i), depth + 1)
            if not options:
                return None
            if s.get("uniqueItems"):
                fresh = [o for o in options if o not in items]
                if not fresh:
                    return None
                items.append(fresh[0])
            else:
                items.append(options[0])
        return "[" + ",".join(items) + "]"

    def _shortest_object(self, s: dict, depth: int) -> str | None:
        body = self.object_fill(s, [], depth)
        return None if body is None else "{" + body + "}"

    def object_fill(self, s: dict, keys: list[str], depth: int = 0) -> str | None:
        """The ``"k":v`` pairs (comma-joined, no braces) an object holding ``keys`` still
        needs: its missing required properties in schema order, then optional ones
        until ``minProperties`` holds."""
        missing = missing_required(s, keys)
        props = s.get("properties") if isinstance(s.get("properties"), dict) else {}
        want = _int(s.get("minProperties"), 0) - len(keys) - len(missing)
        if want > 0:
            extra = [k for k in props if k not in keys and k not in missing]
            missing = [k for k in props if k in set(missing) | set(extra[:want])]
        pairs = []
        for k in missing:
            options = self.shortest(self.property_schema(s, k), depth + 1)
            if not options:
                return None
            pairs.append(_dump(k) + ":" + options[0])
        return ",".join(pairs)


def allowed_types(s: dict) -> list[str]:
    t = s.get("type")
    if isinstance(t, str):
        types = [t]
    elif isinstance(t, list):
        types = [x for x in t if isinstance(x, str)]
    else:
        types = list(_TYPES)
    return [x for x in _TYPES if x in types]


def missing_required(s: dict, keys: list[str]) -> list[str]:
    """Required keys not in ``keys``: those listed in ``properties`` in that order, then
    the others (a grammar emits extra keys after the listed ones)."""
    required = [r for r in s.get("required") or [] if isinstance(r, str) and r not in keys]
    props = s.get("properties") if isinstance(s.get("properties"), dict) else {}
    listed = [k for k in props if k in required]
    return listed + [r for r in dict.fromkeys(required) if r not in props]


def _merge(a: dict, b: dict) -> dict | None:
    """Both schemas at once (shallow: properties and required are united, types
    intersected); None when the types exclude each other."""
    out = dict(a)
    for k, v in b.items():
        if k not in out:
            out[k] = v
        elif k == "properties" and isinstance(v, dict) and isinstance(out[k], dict):
            props = dict(out[k])
            for name, sub in v.items():
                props[name] = {"allOf": [props[name], sub]} if name in props else sub
            out[k] = props
        elif k == "required" and isinstance(v, list) and isinstance(out[k], list):
            out[k] = list(dict.fromkeys(out[k] + v))
        elif k == "type":
            ta = set(allowed_types({"type": out[k]}))
            tb = set(allowed_types({"type": v}))
            both = ta & tb
            if "integer" in ta | tb and "number" in ta | tb:
                both |= {"integer"} if ("integer" in ta or "integer" in tb) else set()
            if not both:
                return None
            out[k] = [t for t in _TYPES if t in both]
        else:
            out[k] = v
    return out


def _dump(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _int(v: Any, default: int) -> int:
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else default


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def number_ok(s: dict, value: float, integer: bool) -> bool:
    """Whether ``value`` meets the numeric keywords of ``s``."""
    if not math.isfinite(value):
        return False
    if integer and not float(value).is_integer():
        return False
    lo, hi = _num(s.get("minimum")), _num(s.get("maximum"))
    xlo, xhi = s.get("exclusiveMinimum"), s.get("exclusiveMaximum")
    if xlo is True:  # draft 4: a flag on minimum
        xlo, lo = lo, None
    if xhi is True:
        xhi, hi = hi, None
    xlo, xhi = _num(xlo), _num(xhi)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        return False
    if (xlo is not None and value <= xlo) or (xhi is not None and value >= xhi):
        return False
    m = _num(s.get("multipleOf"))
    if m and m > 0:
        q = value / m
        if abs(q - round(q)) > 1e-9:
            return False
    return True


def _format_number(v: float, integer: bool) -> str:
    if float(v).is_integer() and abs(v) < 1e15:
        return str(int(v))
    return "0" if integer else repr(float(v))


def _numbers(s: dict, integer: bool) -> list[str]:
    """Short numbers valid under ``s``."""
    bounds = [
        _num(s.get(k)) for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
    ]
    m = _num(s.get("multipleOf"))
    cands: list[float] = [0, 1, 2, 3, -1]
    for b in bounds:
        if b is not None and math.isfinite(b):
            cands += [b, math.ceil(b), math.floor(b), math.ceil(b) + 1, math.floor(b) - 1]
            if m and m > 0:
                cands += [math.ceil(b / m) * m, math.floor(b / m) * m, (math.ceil(b / m) + 1) * m]
    lo = bounds[0] if bounds[0] is not None else bounds[2]
    hi = bounds[1] if bounds[1] is not None else bounds[3]
    if lo is not None and hi is not None:
        cands.append((lo + hi) / 2)
    texts = []
    for c in cands:
        if number_ok(s, c, integer):
            texts.append(_format_number(c, integer))
    return sorted(set(texts), key=lambda t: (len(t), t))[:4]


def _strings(s: dict) -> list[str]:
    """Short strings valid under ``s`` (the grammar checks the rest)."""
    n = _int(s.get("minLength"), 0)
    pattern, fmt = s.get("pattern"), s.get("format")
    if isinstance(pattern, str):
        c = RegexCompleter.of(pattern, search=True)
        text = c.complete("") if c is not None else None
        if text is not None:
            return [text + "a" * max(0, n - len(text))]
    for regex in FORMAT_REGEXES.get(fmt, ()) if isinstance(fmt, str) else ():
        c = RegexCompleter.of(regex)
        text = c.complete("") if c is not None else None
        if text is not None:
            return [text]
    return [c * n for c in "abc"] if n else ["", "a", "b"]


# ---- the partial document ----------------------------------------------------------------


@dataclass
class _Frame:
    """An open object or array, or the top level (kind ``root``)."""

    kind: str
    cands: list[dict]
    state: str  # see _Parser
    keys: list[str] = field(default_factory=list)  # object: keys so far
    key: str | None = None  # object: the key whose value comes next
    count: int = 0  # array: items so far
    scalars: list[str] = field(default_factory=list)  # array: its scalar items' JSON texts

    def copy(self) -> _Frame:
        return _Frame(
            self.kind, self.cands, self.state, list(self.keys), self.key, self.count, self.scalars
        )


@dataclass
class _Leaf:
    """A scalar in progress: a string (``key`` when it is an object key), a number or a
    literal; ``text`` is its JSON text so far, without the opening quote."""

    kind: str  # string | key | number | literal
    cands: list[dict]
    text: str = ""


class _Parser:
    """Reads a JSON prefix; ``frames[-1]`` is the innermost open container.

    Frame states: root ``value`` / ``done``; object ``key_or_end`` (after ``{``),
    ``key`` (after ``,``), ``colon``, ``value``, ``next`` (after a value); array
    ``value_or_end`` (after ``[``), ``value`` (after ``,``), ``next``.
    """

    def __init__(self, schemas: Schemas):
        self.s = schemas
        self.frames = [_Frame("root", schemas.flat(schemas.root), "value")]
        self.leaf: _Leaf | None = None
        self.failed = False

    def clone(self) -> _Parser:
        other = _Parser.__new__(_Parser)
        other.s, other.failed = self.s, self.failed
        other.frames = [f.copy() for f in self.frames]
        leaf = self.leaf
        other.leaf = None if leaf is None else _Leaf(leaf.kind, leaf.cands, leaf.text)
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
                if leaf.text in _LITERALS:
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
                self.leaf = _Leaf("key", f.cands)
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

    def child_cands(self, f: _Frame) -> list[dict]:
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
            self.frames.append(_Frame("object", cands, "key_or_end"))
        elif ch == "[":
            self.frames.append(_Frame("array", cands, "value_or_end"))
        elif ch == '"':
            self.leaf = _Leaf("string", cands)
        elif kind == "number":
            self.leaf = _Leaf("number", cands, ch)
        else:
            self.leaf = _Leaf("literal", cands, ch)

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
        if leaf.kind == "number" and not _NUMBER.fullmatch(leaf.text):
            self.failed = True
            return
        if leaf.kind == "literal" and leaf.text not in _LITERALS:
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
        _after_value(self.frames[-1])


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


# ---- completing ----------------------------------------------------------------------


class JsonCompleter:
    """Completions of partial JSON documents under one schema (reusable, not
    thread-safe: one scheduler thread)."""

    def __init__(self, schema: Any):
        self.schemas = Schemas(schema)

    def parser(self) -> _Parser:
        """A parser at the start of a document: ``feed`` it text, ``clone`` it to
        look ahead, and pass it to ``complete``."""
        return _Parser(self.schemas)

    def completions(self, text: str) -> list[str]:
        """Candidate texts that finish ``text`` as a document valid under the schema,
        shortest first; [] when ``text`` cannot be read."""
        p = self.parser()
        p.feed(text)
        return self.complete(p)

    def complete(self, p: _Parser) -> list[str]:
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
                _after_value(frames[-1])
        while frames:
            levels.append(self._close_tails(frames.pop()))
            if frames:
                _after_value(frames[-1])
        return _combine(levels)

    # -- scalars --

    def _leaf_tails(self, leaf: _Leaf) -> list[str]:
        out: list[str] = []
        for c in leaf.cands:
            if leaf.kind == "string":
                out += self._string_tails(c, leaf.text)
            elif leaf.kind == "number":
                out += _number_tails(c, leaf.text)
            else:
                out += [lit[len(leaf.text) :] for lit in _LITERALS if lit.startswith(leaf.text)]
        return _ordered(out)

    def _string_tails(self, s: dict, raw: str) -> list[str]:
        values = [s["const"]] if "const" in s else s.get("enum")
        if isinstance(values, list):
            return [
                _dump(v)[1 + len(raw) :]
                for v in values
                if isinstance(v, str) and _dump(v)[1:].startswith(raw)
            ]
        out = []
        for escape_tail in _escape_tails(raw):
            try:
                content = json.loads('"' + raw + escape_tail + '"')
            except json.JSONDecodeError:
                continue
            rest = _string_rest(s, content)
            if rest is not None:
                out.append(escape_tail + _dump(rest)[1:])
        return out

    # -- containers --

    def _key_tails(self, f: _Frame, raw: str) -> list[str]:
        """Finish an object key, its value and the object."""
        out: list[str] = []
        for c in f.cands:
            for key in _next_keys(c, f.keys):
                text = _dump(key)[1:]
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

    def _close_tails(self, f: _Frame) -> list[str]:
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

    def _close_one(self, f: _Frame, c: dict) -> str | None:
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
                head = _dump(key) + ":" + value[0]
                keys.append(key)
            rest = s.object_fill(c, keys)
            if rest is None:
                return None
            if rest and (head or f.state == "next"):
                rest = "," + rest
            return head + rest + "}"
        # array
        n, items = f.count, []
        need = _int(c.get("minItems"), 0) - n
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


def _after_value(f: _Frame) -> None:
    """Move a frame past the value that its leaf completes."""
    if f.kind == "object":
        f.keys.append(f.key or "")
        f.key = None
    elif f.kind == "array":
        f.count += 1
    f.state = "done" if f.kind == "root" else "next"


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
    short = _int(s.get("minLength"), 0) - len(content) - len(rest)
    return rest + "a" * max(short, 0)


def _number_tails(s: dict, text: str) -> list[str]:
    """Digits (and the like) that finish the number ``text`` valid under ``s``."""
    integer = "integer" in allowed_types(s) and "number" not in allowed_types(s)
    for width in range(4):
        for digits in itertools.product("0123456789", repeat=width):
            tail = "".join(digits)
            full = text + tail
            if not _NUMBER.fullmatch(full):
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
