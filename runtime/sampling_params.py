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
import re
from dataclasses import dataclass, field
from typing import Any

from plait.runtime.errors import RequestError


class SamplingParamsError(RequestError):
    """A sampling parameter has a bad value. ``field`` names it."""

    def __init__(self, field_name: str, value: Any, reason: str):
        super().__init__(f"sampling_params.{field_name}", value, reason)


MAX_N = 128  # samples per prompt one request may ask for

# A temperature or top_p below this samples like greedy decoding: dividing by a tiny
# temperature overflows, and a tiny top_p keeps the first token only anyway.
SAMPLING_EPS = 1e-5
# A repetition penalty near 0 overflows float logits (a logit divided by 1e-300); one
# past 10 already bans every seen token. OpenAI's range for the logit bias.
REPETITION_PENALTY_RANGE = (0.01, 10.0)
LOGIT_BIAS_RANGE = (-100.0, 100.0)  # -100 bans a token, 100 forces it

# SGLang 0.5 sampling fields that plait accepts by name but cannot honour: a request
# that sets one gets a clear error instead of silently different output.
UNSUPPORTED_FIELDS = {
    "structural_tag": "structural tags are not supported; use json_schema, regex or ebnf",
}

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
    # SGLang's detokenization and stopping extras.
    stop_regex: list[str] = field(default_factory=list)  # stop where the output matches one
    no_stop_trim: bool = False  # keep the matched stop string (or stop token's text)
    spaces_between_special_tokens: bool = True
    # Additive bias per token id (``{"123": -100}``), applied before the grammar mask.
    logit_bias: dict[int, float] | None = None
    custom_params: dict[str, Any] | None = None  # opaque: carried, never interpreted
    stream_interval: int = 1  # a streamed request sends a piece every this many tokens
    # Constraints (decoded by the grammar layer); at most one of them.
    regex: str | None = None
    json_schema: str | None = None
    ebnf: str | None = None
    choices: list[str] | None = None
    # Near the end of the budget, steer a constrained output onto the shortest way to
    # finish its grammar, so it still parses (constrained/closing.py).
    budget_closing: bool = True

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
        d = dict(d)
        if d.get("sampling_seed") is not None:  # SGLang's name for the seed
            if d.get("seed") is not None and d["seed"] != d["sampling_seed"]:
                raise SamplingParamsError(
                    "sampling_seed", d["sampling_seed"], f"disagrees with seed={d['seed']!r}"
                )
            d["seed"] = d["sampling_seed"]
        d.pop("sampling_seed", None)
        for key, why in UNSUPPORTED_FIELDS.items():
            if d.get(key) is not None:
                raise SamplingParamsError(key, d[key], why)
            d.pop(key, None)
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
        if isinstance(self.stop_regex, str):
            self.stop_regex = [self.stop_regex]
        elif isinstance(self.stop_regex, tuple):
            self.stop_regex = list(self.stop_regex)
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
        if self.temperature < SAMPLING_EPS:
            self.temperature = 0.0  # greedy (1 / 1e-45 overflows)
        _check_float(self, "top_p", lo=0.0, hi=1.0, lo_open=True)
        if self.top_p < SAMPLING_EPS:
            self.top_p, self.top_k = 1.0, 1  # only the most likely token survives: greedy
        _check_int(self, "top_k", lo=-1)
        if self.top_k == 0:
            raise SamplingParamsError("top_k", 0, "must be -1 (disabled) or >= 1")
        _check_float(self, "min_p", lo=0.0, hi=1.0)
        _check_float(self, "frequency_penalty", lo=-2.0, hi=2.0)
        _check_float(self, "presence_penalty", lo=-2.0, hi=2.0)
        lo, hi = REPETITION_PENALTY_RANGE
        _check_float(self, "repetition_penalty", lo=lo, hi=hi)
        _check_int(self, "n", lo=1)
        if self.n > MAX_N:
            raise SamplingParamsError("n", self.n, f"must be <= {MAX_N}")
        if self.seed is not None:
            _check_int(self, "seed")
            # Request k of n is seeded with seed + k; torch takes seeds in [-2**63, 2**64).
            if self.seed < -(2**63) or self.seed + self.n - 1 >= 2**64:
                raise SamplingParamsError("seed", self.seed, "must be in [-2**63, 2**64 - n)")
        _check_int(self, "stream_interval", lo=1)
        self._verify_logit_bias(vocab_size)
        self._verify_stop_regex()
        if self.custom_params is not None and not isinstance(self.custom_params, dict):
            raise SamplingParamsError("custom_params", self.custom_params, "must be an object")
        for name in (
            "ignore_eos",
            "skip_special_tokens",
            "no_stop_trim",
            "spaces_between_special_tokens",
            "budget_closing",
        ):
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

    def _verify_logit_bias(self, vocab_size: int | None) -> None:
        bias = self.logit_bias
        if bias is None:
            return
        if not isinstance(bias, dict):
            raise SamplingParamsError("logit_bias", bias, "must map token ids to numbers")
        lo, hi = LOGIT_BIAS_RANGE
        clean: dict[int, float] = {}
        for key, value in bias.items():
            try:  # JSON object keys are strings
                token = int(key) if not isinstance(key, bool) else None
            except (TypeError, ValueError):
                token = None
            if token is None or str(token) != str(key).strip() or token < 0:
                raise SamplingParamsError("logit_bias", key, "keys must be token ids")
            if vocab_size is not None and token >= vocab_size:
                raise SamplingParamsError(
                    "logit_bias", key, f"token id {token} >= vocab size {vocab_size}"
                )
            if not _is_number(value) or not math.isfinite(value) or not lo <= value <= hi:
                raise SamplingParamsError(
                    f"logit_bias.{key}", value, f"must be a number in [{lo:g}, {hi:g}]"
                )
            clean[token] = float(value)
        self.logit_bias = clean or None

    def _verify_stop_regex(self) -> None:
        if not isinstance(self.stop_regex, list):
            raise SamplingParamsError(
                "stop_regex", self.stop_regex, "must be a regex or a list of regexes"
            )
        for pattern in self.stop_regex:
            if not isinstance(pattern, str) or not pattern:
                raise SamplingParamsError("stop_regex", pattern, "must be non-empty strings")
            try:
                compiled = re.compile(pattern)
            except re.error as e:
                raise SamplingParamsError("stop_regex", pattern, f"bad regex: {e}") from None
            if compiled.match(""):
                raise SamplingParamsError("stop_regex", pattern, "matches the empty string")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        """Anything that changes the logits before masking (penalties, logit bias)."""
        return (
            self.frequency_penalty != 0.0
            or self.presence_penalty != 0.0
            or self.repetition_penalty != 1.0
            or bool(self.logit_bias)
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
