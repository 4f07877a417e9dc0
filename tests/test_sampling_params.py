"""SamplingParams: defaults, building from a request dict, normalisation of convenient
forms, and validation that names the bad field and shows the bad value."""

from __future__ import annotations

import json
import math

import pytest
import torch

from plait.runtime.errors import RequestError
from plait.runtime.sampling_params import SamplingParams, SamplingParamsError


def verify_error(vocab_size: int | None = None, **kwargs) -> SamplingParamsError:
    """The error ``SamplingParams(**kwargs).verify(vocab_size)`` raises."""
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(**kwargs).verify(vocab_size)
    return info.value


# ---- defaults ----------------------------------------------------------------


def test_defaults():
    p = SamplingParams()
    assert p.max_new_tokens == 128
    assert p.min_new_tokens == 0
    assert p.stop == [] and p.stop_token_ids == []
    assert p.temperature == 1.0
    assert p.top_p == 1.0 and p.top_k == -1 and p.min_p == 0.0
    assert p.frequency_penalty == 0.0 and p.presence_penalty == 0.0
    assert p.repetition_penalty == 1.0
    assert p.ignore_eos is False and p.skip_special_tokens is True
    assert p.n == 1 and p.seed is None
    assert p.regex is None and p.json_schema is None and p.ebnf is None and p.choices is None


def test_defaults_pass_verify_and_sample_without_penalties_or_constraint():
    p = SamplingParams().verify(vocab_size=100)
    assert not p.is_greedy
    assert not p.has_penalties
    assert p.constraint is None


def test_default_lists_are_not_shared_between_instances():
    a, b = SamplingParams(), SamplingParams()
    a.stop.append("x")
    assert b.stop == []


# ---- from_dict -----------------------------------------------------------------


def test_from_dict_none_gives_defaults():
    assert SamplingParams.from_dict(None) == SamplingParams()


def test_from_dict_sets_the_given_fields():
    p = SamplingParams.from_dict({"max_new_tokens": 7, "temperature": 0.5, "stop": ["\n"]})
    assert p == SamplingParams(max_new_tokens=7, temperature=0.5, stop=["\n"])


def test_from_dict_none_value_means_default():
    p = SamplingParams.from_dict({"seed": None, "max_new_tokens": None, "stop": None})
    assert p == SamplingParams()


def test_from_dict_copies_an_existing_instance():
    orig = SamplingParams(max_new_tokens=5, temperature=0.3, stop=["x"])
    copy = SamplingParams.from_dict(orig)
    assert copy == orig
    assert copy is not orig
    copy.temperature = 0.9
    assert orig.temperature == 0.3


def test_from_dict_unknown_key_is_an_error_naming_the_key():
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams.from_dict({"max_tokens": 10})
    err = info.value
    assert err.field == "sampling_params.max_tokens"
    assert err.value == 10
    assert "max_tokens" in str(err)
    assert "unknown field" in str(err)
    # The message lists the real names, so the typo is easy to fix.
    assert "max_new_tokens" in str(err)


def test_from_dict_rejects_a_non_dict():
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams.from_dict([("temperature", 0.0)])  # type: ignore[arg-type]
    assert info.value.field == "sampling_params.<root>"


def test_to_dict_round_trips_through_from_dict():
    p = SamplingParams(max_new_tokens=3, stop=["a"], seed=7, regex="[0-9]+")
    assert SamplingParams.from_dict(p.to_dict()) == p


# ---- normalize ---------------------------------------------------------------------


def test_normalize_single_stop_string_becomes_a_list():
    assert SamplingParams(stop="\n\n").normalize().stop == ["\n\n"]


def test_normalize_stop_tuple_becomes_a_list():
    assert SamplingParams(stop=("a", "b")).normalize().stop == ["a", "b"]


def test_normalize_stop_token_ids_int_becomes_a_list():
    assert SamplingParams(stop_token_ids=2).normalize().stop_token_ids == [2]


def test_normalize_none_lists_become_empty():
    p = SamplingParams(stop=None, stop_token_ids=None).normalize()
    assert p.stop == [] and p.stop_token_ids == []


def test_normalize_json_schema_dict_becomes_a_json_string():
    schema = {"type": "object", "properties": {"name": {"type": "string"}}}
    p = SamplingParams(json_schema=schema).normalize()
    assert isinstance(p.json_schema, str)
    assert json.loads(p.json_schema) == schema


def test_normalize_returns_self_and_verify_normalizes():
    p = SamplingParams(stop="x", stop_token_ids=3)
    assert p.normalize() is p
    q = SamplingParams(stop="x", stop_token_ids=3).verify()
    assert q.stop == ["x"] and q.stop_token_ids == [3]


# ---- verify: integers -----------------------------------------------------------


def test_verify_returns_self_when_valid():
    p = SamplingParams(max_new_tokens=4, temperature=0.0)
    assert p.verify() is p


def test_verify_max_new_tokens_negative():
    err = verify_error(max_new_tokens=-1)
    assert err.field == "sampling_params.max_new_tokens"
    assert "-1" in str(err)


def test_verify_max_new_tokens_zero_is_allowed():
    assert SamplingParams(max_new_tokens=0).verify().max_new_tokens == 0


def test_verify_max_new_tokens_non_integer_float():
    err = verify_error(max_new_tokens=2.5)
    assert err.field == "sampling_params.max_new_tokens"
    assert "2.5" in str(err)
    assert "integer" in str(err)


def test_verify_max_new_tokens_integral_float_is_coerced_to_int():
    p = SamplingParams(max_new_tokens=16.0).verify()
    assert p.max_new_tokens == 16 and type(p.max_new_tokens) is int


def test_verify_max_new_tokens_bool_is_rejected():
    err = verify_error(max_new_tokens=True)
    assert err.field == "sampling_params.max_new_tokens"
    assert "True" in str(err)


def test_verify_max_new_tokens_string_is_rejected():
    err = verify_error(max_new_tokens="10")
    assert err.field == "sampling_params.max_new_tokens"
    assert "'10'" in str(err)


def test_verify_min_new_tokens_above_max_new_tokens():
    err = verify_error(min_new_tokens=9, max_new_tokens=8)
    assert err.field == "sampling_params.min_new_tokens"
    assert "9" in str(err) and "8" in str(err)


def test_verify_min_new_tokens_equal_to_max_is_allowed():
    SamplingParams(min_new_tokens=8, max_new_tokens=8).verify()


def test_verify_min_new_tokens_negative():
    err = verify_error(min_new_tokens=-3)
    assert err.field == "sampling_params.min_new_tokens"
    assert "-3" in str(err)


@pytest.mark.parametrize("bad", [0, -2, -100])
def test_verify_top_k_zero_or_below_minus_one(bad):
    err = verify_error(top_k=bad)
    assert err.field == "sampling_params.top_k"
    assert str(bad) in str(err)


@pytest.mark.parametrize("ok", [-1, 1, 50])
def test_verify_top_k_minus_one_or_positive_is_allowed(ok):
    assert SamplingParams(top_k=ok).verify().top_k == ok


def test_verify_top_k_non_integer():
    err = verify_error(top_k=2.5)
    assert err.field == "sampling_params.top_k"
    assert "2.5" in str(err)


def test_verify_n_below_one():
    err = verify_error(n=0)
    assert err.field == "sampling_params.n"
    assert "0" in str(err)


@pytest.mark.parametrize("bad", ["42", 1.5, True])
def test_verify_seed_must_be_an_integer(bad):
    err = verify_error(seed=bad)
    assert err.field == "sampling_params.seed"
    assert repr(bad) in str(err)


def test_verify_seed_integer_is_allowed():
    assert SamplingParams(seed=1234).verify().seed == 1234


@pytest.mark.parametrize("seed,n", [(2**64, 1), (-(2**63) - 1, 1), (2**64 - 1, 2)])
def test_verify_rejects_a_seed_torch_generator_cannot_take(seed, n):
    """The engine seeds choice k of a request with ``seed + k`` through
    ``torch.Generator.manual_seed``, which only takes [-2**63, 2**64); a seed verify
    accepts must not make the engine fail later with a plain ValueError."""
    with pytest.raises(ValueError):  # the precondition: torch refuses the last seed
        torch.Generator().manual_seed(seed + n - 1)
    err = verify_error(seed=seed, n=n)
    assert err.field == "sampling_params.seed"


# ---- verify: floats ---------------------------------------------------------------


def test_verify_temperature_negative():
    err = verify_error(temperature=-0.5)
    assert err.field == "sampling_params.temperature"
    assert "-0.5" in str(err)


def test_verify_temperature_nan():
    err = verify_error(temperature=float("nan"))
    assert err.field == "sampling_params.temperature"
    assert "nan" in str(err)


def test_verify_temperature_string():
    err = verify_error(temperature="hot")
    assert err.field == "sampling_params.temperature"
    assert "'hot'" in str(err)


def test_verify_temperature_bool_is_not_a_number():
    err = verify_error(temperature=False)
    assert err.field == "sampling_params.temperature"


def test_verify_temperature_int_is_coerced_to_float():
    p = SamplingParams(temperature=1).verify()
    assert p.temperature == 1.0 and type(p.temperature) is float


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.01, 2])
def test_verify_top_p_outside_zero_exclusive_to_one(bad):
    err = verify_error(top_p=bad)
    assert err.field == "sampling_params.top_p"
    assert repr(bad) in str(err)


@pytest.mark.parametrize("ok", [1e-6, 0.5, 1.0])
def test_verify_top_p_in_range_is_allowed(ok):
    SamplingParams(top_p=ok).verify()


@pytest.mark.parametrize("bad", [-0.01, 1.5])
def test_verify_min_p_outside_zero_to_one(bad):
    err = verify_error(min_p=bad)
    assert err.field == "sampling_params.min_p"
    assert repr(bad) in str(err)


@pytest.mark.parametrize("name", ["frequency_penalty", "presence_penalty"])
@pytest.mark.parametrize("bad", [-2.5, 2.01])
def test_verify_frequency_and_presence_penalty_outside_minus_two_to_two(name, bad):
    err = verify_error(**{name: bad})
    assert err.field == f"sampling_params.{name}"
    assert repr(bad) in str(err)


@pytest.mark.parametrize("name", ["frequency_penalty", "presence_penalty"])
@pytest.mark.parametrize("ok", [-2.0, 0.0, 2.0])
def test_verify_frequency_and_presence_penalty_bounds_are_inclusive(name, ok):
    SamplingParams(**{name: ok}).verify()


@pytest.mark.parametrize("bad", [0, 0.0, -1.0])
def test_verify_repetition_penalty_must_be_positive(bad):
    err = verify_error(repetition_penalty=bad)
    assert err.field == "sampling_params.repetition_penalty"
    assert repr(bad) in str(err)


def test_verify_repetition_penalty_nan():
    err = verify_error(repetition_penalty=math.nan)
    assert err.field == "sampling_params.repetition_penalty"


# ---- verify: booleans, stops, constraints -------------------------------------------


@pytest.mark.parametrize("name", ["ignore_eos", "skip_special_tokens"])
def test_verify_flags_must_be_booleans(name):
    err = verify_error(**{name: 1})
    assert err.field == f"sampling_params.{name}"
    assert "boolean" in str(err)


def test_verify_stop_with_an_empty_string():
    err = verify_error(stop=["end", ""])
    assert err.field == "sampling_params.stop"
    assert "''" in str(err)


def test_verify_stop_with_a_non_string():
    err = verify_error(stop=["end", 5])
    assert err.field == "sampling_params.stop"
    assert "5" in str(err)


def test_verify_stop_that_is_neither_a_string_nor_a_list():
    """``{"stop": 5}`` from a request must be a SamplingParamsError (a 4xx), not a
    TypeError from ``list(5)`` inside ``normalize``."""
    err = verify_error(stop=5)
    assert err.field == "sampling_params.stop"
    assert "5" in str(err)


def test_verify_stop_token_ids_that_is_neither_an_int_nor_a_list():
    err = verify_error(stop_token_ids=1.5)
    assert err.field == "sampling_params.stop_token_ids"
    assert "1.5" in str(err)


def test_verify_stop_token_ids_negative():
    err = verify_error(stop_token_ids=[3, -1])
    assert err.field == "sampling_params.stop_token_ids"
    assert "-1" in str(err)


def test_verify_stop_token_ids_bool_is_not_an_id():
    err = verify_error(stop_token_ids=[True])
    assert err.field == "sampling_params.stop_token_ids"


def test_verify_stop_token_ids_at_or_above_vocab_size():
    err = verify_error(vocab_size=100, stop_token_ids=[5, 100])
    assert err.field == "sampling_params.stop_token_ids"
    assert "100" in str(err)


def test_verify_stop_token_ids_below_vocab_size_is_allowed():
    SamplingParams(stop_token_ids=[0, 99]).verify(vocab_size=100)


def test_verify_stop_token_ids_unchecked_against_vocab_when_vocab_size_unknown():
    SamplingParams(stop_token_ids=[10**6]).verify()


def test_verify_two_constraints_at_once():
    err = verify_error(regex="[a-z]+", json_schema='{"type": "string"}')
    assert err.field == "sampling_params.json_schema"
    assert '{"type": "string"}' in str(err)
    assert "regex" in str(err)


def test_verify_constraint_must_be_a_string():
    err = verify_error(regex=42)
    assert err.field == "sampling_params.regex"
    assert "42" in str(err)


@pytest.mark.parametrize("bad", [[], ["yes", 1], "yes"])
def test_verify_choices_must_be_a_non_empty_list_of_strings(bad):
    err = verify_error(choices=bad)
    assert err.field == "sampling_params.choices"
    assert repr(bad) in str(err)


def test_constraint_names_the_one_set():
    assert SamplingParams(choices=["yes", "no"]).verify().constraint == ("choices", ["yes", "no"])


def test_error_message_truncates_a_long_value():
    err = verify_error(stop=["x" * 200, ""])
    assert len(str(err)) < 200
    assert "..." in str(err)


# ---- is_greedy / has_penalties -------------------------------------------------------


def test_is_greedy_with_temperature_zero():
    assert SamplingParams(temperature=0.0).is_greedy
    assert SamplingParams(temperature=0).is_greedy


def test_is_greedy_with_top_k_one():
    assert SamplingParams(temperature=1.0, top_k=1).is_greedy


def test_is_not_greedy_with_a_positive_temperature():
    assert not SamplingParams(temperature=0.01, top_k=2).is_greedy


@pytest.mark.parametrize(
    "kwargs", [{"frequency_penalty": 0.1}, {"presence_penalty": -0.1}, {"repetition_penalty": 1.1}]
)
def test_has_penalties(kwargs):
    assert SamplingParams(**kwargs).has_penalties


# ---- the error type -------------------------------------------------------------------


def test_sampling_params_error_is_a_request_error_and_a_value_error():
    err = SamplingParamsError("top_p", 2.0, "must be <= 1.0")
    assert isinstance(err, RequestError)
    assert isinstance(err, ValueError)
    assert err.field == "sampling_params.top_p"
    assert err.value == 2.0
    assert str(err) == "sampling_params.top_p=2.0: must be <= 1.0"
