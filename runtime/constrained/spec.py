"""What a request asks the grammar layer for: a normalized :class:`GrammarSpec`,
and the two errors the layer raises.

* :class:`GrammarError` -- the request's constraint is invalid (bad regex syntax,
  malformed JSON, an unsatisfiable schema) or no backend can compile it. It is a
  :class:`RequestError`, so the HTTP layer answers 400 naming the field.
* :class:`UnsupportedGrammar` -- one backend cannot compile a valid constraint
  (a feature it lacks, or too slow). Internal: the compiler then tries another.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from plait.runtime.errors import RequestError
from plait.runtime.sampling_params import CONSTRAINT_FIELDS, SamplingParams


class GrammarError(RequestError):
    """A constraint that cannot be compiled. ``field`` is the SamplingParams field."""


class UnsupportedGrammar(Exception):
    """A backend cannot compile a (valid) constraint; ``reason`` names the feature."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class GrammarSpec:
    """A constraint in canonical form; ``(kind, source)`` is its cache identity.

    ``kind`` is one of ``CONSTRAINT_FIELDS``. ``source`` is the regex or EBNF text
    as given, a JSON schema re-serialized compactly, or the choices as a JSON list.

    A schema keeps its key order: both backends emit object properties in the
    order of the schema's ``properties``, so sorting keys would change the output.
    """

    kind: str
    source: str

    def __post_init__(self) -> None:
        if self.kind not in CONSTRAINT_FIELDS:
            raise ValueError(f"unknown grammar kind {self.kind!r}; known: {CONSTRAINT_FIELDS}")

    @staticmethod
    def from_params(params: SamplingParams) -> GrammarSpec | None:
        """The spec of a request's constraint, or None when it has none."""
        constraint = params.constraint
        if constraint is None:
            return None
        kind, value = constraint
        return GrammarSpec.of(kind, value)

    @staticmethod
    def of(kind: str, value: Any) -> GrammarSpec:
        """Normalize one constraint value; raise GrammarError when it is malformed."""
        if kind == "json_schema":
            return GrammarSpec(kind, _normalize_schema(value))
        if kind == "choices":
            return GrammarSpec(kind, _normalize_choices(value))
        if not isinstance(value, str):
            raise GrammarError(kind, value, "must be a string")
        return GrammarSpec(kind, value)

    def value(self) -> Any:
        """The constraint as a Python value: a str, a parsed schema, or a list of choices."""
        if self.kind in ("json_schema", "choices"):
            return json.loads(self.source)
        return self.source


def python_regex_error(regex: str) -> str | None:
    """Why Python's ``re`` rejects ``regex``, or None if it compiles.

    Used as the arbiter of regex *syntax*: a regex ``re`` accepts but a backend
    rejects uses a feature that backend lacks (look-around, back-references).
    """
    try:
        re.compile(regex)
    except re.error as e:
        return f"bad regex syntax: {e}"
    return None


def _normalize_schema(value: Any) -> str:
    if isinstance(value, str):
        try:
            schema = json.loads(value)
        except json.JSONDecodeError as e:
            raise GrammarError("json_schema", value, f"malformed JSON: {e}") from None
    else:
        schema = value
    if schema is True:
        schema = {}
    if schema is False:
        raise GrammarError("json_schema", value, "unsatisfiable schema: `false` admits no value")
    if not isinstance(schema, dict):
        raise GrammarError(
            "json_schema", value, f"a schema must be a JSON object, got {type(schema).__name__}"
        )
    return json.dumps(close_objects(schema), separators=(",", ":"), ensure_ascii=False)


# Keys under which a schema holds a map of names to subschemas, and data keys.
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_DATA_KEYS = ("enum", "const", "default", "examples", "required")
# Where any of these appears, closing an object could make the schema unsatisfiable
# (allOf merges objects; unevaluatedProperties and if/then/else see across subschemas).
_OPEN_SCHEMA_KEYWORDS = ("allOf", "unevaluatedProperties", "if", "$dynamicRef")


def close_objects(schema: dict[str, Any]) -> dict[str, Any]:
    """Give every object schema that says nothing about extra keys
    ``additionalProperties: false``, as xgrammar's strict mode (SGLang's default)
    and OpenAI's structured outputs do.

    This only narrows what may be generated, so outputs stay valid under the
    original schema, and it stops a small model from inventing keys (and nesting
    them, ``{"type":{"type":...``) until it runs out of tokens. An object is left
    open where closing it could leave no valid output: it requires keys it does
    not list, sets ``minProperties``/``dependencies``, or the schema uses allOf,
    unevaluatedProperties or if/then/else anywhere.
    """
    if _mentions(schema, _OPEN_SCHEMA_KEYWORDS):
        return schema
    return _close(schema)


def _close(node: Any) -> Any:
    if isinstance(node, list):
        return [_close(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: _close(sub) for name, sub in value.items()}
        elif key in _DATA_KEYS:
            out[key] = value
        else:
            out[key] = _close(value)
    props = out.get("properties")
    closable = (
        isinstance(props, dict)
        and not any(k in out for k in ("additionalProperties", "patternProperties"))
        and not any(k in out for k in ("minProperties", "dependencies", "dependentRequired"))
        and all(isinstance(r, str) and r in props for r in out.get("required", []))
    )
    if closable:
        out["additionalProperties"] = False
    return out


def _mentions(node: Any, keywords: tuple[str, ...]) -> bool:
    """Whether a schema keyword in ``keywords`` appears anywhere in ``node``."""
    if isinstance(node, list):
        return any(_mentions(x, keywords) for x in node)
    if not isinstance(node, dict):
        return False
    for key, value in node.items():
        if key in keywords:
            return True
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            if any(_mentions(sub, keywords) for sub in value.values()):
                return True
        elif key not in _DATA_KEYS and _mentions(value, keywords):
            return True
    return False


def _normalize_choices(value: Any) -> str:
    if (
        not isinstance(value, (list, tuple))
        or not value
        or not all(isinstance(c, str) for c in value)
    ):
        raise GrammarError("choices", value, "must be a non-empty list of strings")
    return json.dumps(list(value), ensure_ascii=False)
