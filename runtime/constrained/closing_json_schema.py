"""What a JSON schema admits, for closing a JSON document (see closing_json.py).

``Schemas`` wraps a root schema: it resolves ``$ref``, flattens ``allOf``/``anyOf``/
``oneOf`` into alternatives, names the schema of a property or an array item, and
builds the shortest texts a schema accepts (``const``/``enum`` first, a ``type``
list, ``minimum``, ``minLength``, ``minItems``, ``pattern``, ``format``, the shortest
``anyOf``/``oneOf`` branch, ``allOf`` merged, missing ``required`` properties in
schema order, distinct items under ``uniqueItems``). The helpers beside it check
numbers against the numeric keywords and hold the regexes of string formats.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from typing import Any

from plait.runtime.constrained.closing_regex import RegexCompleter

MAX_BRANCHES = 8  # alternatives kept per value (anyOf/oneOf)
MAX_DEPTH = 24  # schema nesting followed when building a shortest value
_TYPES = ("null", "boolean", "integer", "number", "string", "array", "object")
_ANY: dict = {}  # the schema that admits anything
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
            return [dump(s["const"])]
        if isinstance(s.get("enum"), list):
            return sorted((dump(v) for v in s["enum"]), key=len)[:4]
        out: list[str] = []
        for t in allowed_types(s):
            if t == "null":
                out.append("null")
            elif t == "boolean":
                out += ["true", "false"]
            elif t in ("integer", "number"):
                out += _numbers(s, t == "integer")
            elif t == "string":
                out += [dump(v) for v in _strings(s)]
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
        n = as_int(s.get("minItems"), 0)
        prefix = s.get("prefixItems") or (s["items"] if isinstance(s.get("items"), list) else [])
        contains = s.get("contains")
        if contains is not None and as_int(s.get("minContains"), 1) > 0:
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
        want = as_int(s.get("minProperties"), 0) - len(keys) - len(missing)
        if want > 0:
            extra = [k for k in props if k not in keys and k not in missing]
            missing = [k for k in props if k in set(missing) | set(extra[:want])]
        pairs = []
        for k in missing:
            options = self.shortest(self.property_schema(s, k), depth + 1)
            if not options:
                return None
            pairs.append(dump(k) + ":" + options[0])
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


def dump(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def as_int(v: Any, default: int) -> int:
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
    n = as_int(s.get("minLength"), 0)
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
