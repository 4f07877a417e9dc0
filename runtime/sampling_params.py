"""SamplingParams: the one definition of how a request samples, shared by the
DSL, the engine and the HTTP server.

Field names follow SGLang's native API (``max_new_tokens``, ``stop``, ...), so a
``sampling_params`` dict sent to ``/generate`` maps onto this class one to one.
Validation raises :class:`SamplingParamsError` naming the field and the value.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from plait.runtime.errors import RequestError


class SamplingParamsError(RequestError):
    """A sampling parameter has a bad value. ``field`` names it."""

    def __init__(self, field_name: str, value: Any, reason: str):
        super().__init__(f"sampling_params.{field_name}", value, reason)


MAX_N = 128  # samples per prompt one request may ask for

# Which constraint fields exist; at most one may be set on a request.
CONSTRAINT_FIELDS = ("regex", "json_schema", "ebnf", "choices")


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    n: int = 1
    seed: int | None = None
    # Constraints (decoded by the grammar layer); at most one of them.
    regex: str | None = None
    json_schema: str | None = None
    ebnf: str | None = None
    choices: list[str] | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any] | SamplingParams | None) -> SamplingParams:
        """Build from a dict such as the ``sampling_params`` of a request.

        Unknown keys are an error (a typo must not silently change sampling).
        """
        if d is None:
            return cls()
        if isinstance(d, SamplingParams):
            return copy.deepcopy(d)
        if not isinstance(d, dict):
            raise SamplingParamsError("<root>", d, "expected a dict of sampling parameters")
        names = {f.name for f in dataclasses.fields(cls)}
        for key in d:
            if key not in names:
                raise SamplingParamsError(key, d[key], f"unknown field; known: {sorted(names)}")
        return cls(**{k: v for k, v in d.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def normalize(self) -> SamplingParams:
        """Coerce convenient forms (a single stop string, a dict schema) in place."""
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None:
            self.stop = []
        elif isinstance(self.stop, (list, tuple)):
            self.stop = list(self.stop)
        else:
            raise SamplingParamsError("stop", self.stop, "must be a string or a list of strings")
        if isinstance(self.stop_token_ids, int) and not isinstance(self.stop_token_ids, bool):
            self.stop_token_ids = [self.stop_token_ids]
        elif self.stop_token_ids is None:
            self.stop_token_ids = []
        elif isinstance(self.stop_token_ids, (list, tuple)):
            self.stop_token_ids = list(self.stop_token_ids)
        else:
            raise SamplingParamsError(
                "stop_token_ids", self.stop_token_ids, "must be an id or a list of ids"
            )
        if isinstance(self.json_schema, (dict, bool)):  # `true`/`false` are schemas too
            self.json_schema = json.dumps(self.json_schema)
        return self

    def verify(self, vocab_size: int | None = None) -> SamplingParams:
        """Check every field; raise SamplingParamsError naming the first bad one."""
        self.normalize()
        _check_int(self, "max_new_tokens", lo=0)
        _check_int(self, "min_new_tokens", lo=0)
        if self.min_new_tokens > self.max_new_tokens:
            raise SamplingParamsError(
                "min_new_tokens",
                self.min_new_tokens,
                f"must be <= max_new_tokens ({self.max_new_tokens})",
            )
        _check_float(self, "temperature", lo=0.0)
        _check_float(self, "top_p", lo=0.0, hi=1.0, lo_open=True)
        _check_int(self, "top_k", lo=-1)
        if self.top_k == 0:
            raise SamplingParamsError("top_k", 0, "must be -1 (disabled) or >= 1")
        _check_float(self, "min_p", lo=0.0, hi=1.0)
        _check_float(self, "frequency_penalty", lo=-2.0, hi=2.0)
        _check_float(self, "presence_penalty", lo=-2.0, hi=2.0)
        _check_float(self, "repetition_penalty", lo=0.0, lo_open=True)
        _check_int(self, "n", lo=1)
        if self.n > MAX_N:
            raise SamplingParamsError("n", self.n, f"must be <= {MAX_N}")
        if self.seed is not None:
            _check_int(self, "seed")
            # Request k of n is seeded with seed + k; torch takes seeds in [-2**63, 2**64).
            if self.seed < -(2**63) or self.seed + self.n - 1 >= 2**64:
                raise SamplingParamsError("seed", self.seed, "must be in [-2**63, 2**64 - n)")
        for name in ("ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise SamplingParamsError(name, getattr(self, name), "must be a boolean")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise SamplingParamsError("stop", self.stop, "must be non-empty strings")
        for t in self.stop_token_ids:
            if not isinstance(t, int) or isinstance(t, bool) or t < 0:
                raise SamplingParamsError("stop_token_ids", self.stop_token_ids, "must be ids >= 0")
            if vocab_size is not None and t >= vocab_size:
                raise SamplingParamsError(
                    "stop_token_ids", self.stop_token_ids, f"id {t} >= vocab size {vocab_size}"
                )
        set_constraints = [f for f in CONSTRAINT_FIELDS if getattr(self, f) is not None]
        if len(set_constraints) > 1:
            raise SamplingParamsError(
                set_constraints[1],
                getattr(self, set_constraints[1]),
                f"only one of {CONSTRAINT_FIELDS} may be set, got {set_constraints}",
            )
        for name in ("regex", "json_schema", "ebnf"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                raise SamplingParamsError(name, v, "must be a string")
        if self.choices is not None and (
            not isinstance(self.choices, list)
            or not self.choices
            or not all(isinstance(c, str) for c in self.choices)
        ):
            raise SamplingParamsError(
                "choices", self.choices, "must be a non-empty list of strings"
            )
        return self

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return (
            self.frequency_penalty != 0.0
            or self.presence_penalty != 0.0
            or self.repetition_penalty != 1.0
        )

    @property
    def constraint(self) -> tuple[str, Any] | None:
        for name in CONSTRAINT_FIELDS:
            v = getattr(self, name)
            if v is not None:
                return name, v
        return None


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_int(p: SamplingParams, name: str, lo: int | None = None) -> None:
    v = getattr(p, name)
    if isinstance(v, float) and v.is_integer():
        v = int(v)
        setattr(p, name, v)
    if not isinstance(v, int) or isinstance(v, bool):
        raise SamplingParamsError(name, v, "must be an integer")
    if lo is not None and v < lo:
        raise SamplingParamsError(name, v, f"must be >= {lo}")


def _check_float(
    p: SamplingParams,
    name: str,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
) -> None:
    v = getattr(p, name)
    if not _is_number(v) or not math.isfinite(v):
        raise SamplingParamsError(name, v, "must be a finite number")
    setattr(p, name, float(v))
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise SamplingParamsError(name, v, f"must be {'>' if lo_open else '>='} {lo}")
    if hi is not None and v > hi:
        raise SamplingParamsError(name, v, f"must be <= {hi}")
