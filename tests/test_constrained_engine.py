"""Constrained decoding through the engine, on a tiny random model: outputs obey
their constraint whatever the model prefers, constrained and free requests share
batches without changing each other, jump-forward saves forward passes, and bad
constraints are refused before decoding while the engine keeps serving."""

from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import pytest
from common import PHONE

import plait
from plait.runtime.constrained import GrammarError
from plait.runtime.errors import RequestError

PROMPT = "The quick brown fox"
GREEDY = {"temperature": 0.0, "max_new_tokens": 48}

# Every string is bounded, so even a random model finishes within max_new_tokens.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "enum": ["Alice", "Bob", "Carol"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "student": {"type": "boolean"},
        "city": {"type": "string", "maxLength": 4, "pattern": "^[a-z]+$"},
    },
    "required": ["name", "age", "student", "city"],
    "additionalProperties": False,
}
# What both backends express exactly (outlines ignores integer bounds).
FIXED_KEYS = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "enum": ["Alice", "Bob", "Carol"]},
        "age": {"type": "integer", "enum": [20, 30, 40]},
        "student": {"type": "boolean"},
    },
    "required": ["name", "age", "student"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> str:
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def engine(model_dir):
    with plait.Engine(model=model_dir, max_total_tokens=4096, max_running_requests=16) as eng:
        yield eng


def assert_valid_person(text: str) -> None:
    jsonschema.validate(json.loads(text), PERSON)


# ---- outputs obey the constraint ---------------------------------------------------


def test_regex_output_fullmatches_greedy_and_sampled(engine):
    outs = [engine.generate(PROMPT, {**GREEDY, "regex": PHONE})]
    outs += [
        engine.generate(PROMPT, {"temperature": 1.0, "seed": s, "regex": PHONE}) for s in range(4)
    ]
    for out in outs:
        assert re.fullmatch(PHONE, out["text"]), out["text"]
        assert out["meta_info"]["finish_reason"]["type"] == "stop"
        assert out["meta_info"]["grammar_backend"] == "llguidance"


def test_backslash_d_means_ascii_digits(engine):
    out = engine.generate(PROMPT, {**GREEDY, "regex": r"\d{6}"})
    assert re.fullmatch(r"[0-9]{6}", out["text"]), out["text"]


def test_json_schema_output_validates_greedy_and_sampled(engine):
    assert_valid_person(engine.generate(PROMPT, {**GREEDY, "json_schema": PERSON})["text"])
    for seed in range(4):
        params = {"temperature": 1.0, "seed": seed, "max_new_tokens": 48, "json_schema": PERSON}
        assert_valid_person(engine.generate(PROMPT, params)["text"])


def test_json_schema_as_string_equals_dict(engine):
    a = engine.generate(PROMPT, {**GREEDY, "json_schema": PERSON})
    b = engine.generate(PROMPT, {**GREEDY, "json_schema": json.dumps(PERSON)})
    assert a["output_ids"] == b["output_ids"]


def test_choices_give_one_of_them(engine):
    choices = ["red", "green", "blue and yellow"]
    for seed in range(4):
        out = engine.generate(
            PROMPT, {"temperature": 1.0, "seed": seed, "max_new_tokens": 16, "choices": choices}
        )
        assert out["text"] in choices


def test_ebnf_grammar(engine):
    grammar = 'start: "(" num ("," num)* ")"\nnum: /[1-9][0-9]?/'
    out = engine.generate(PROMPT, {**GREEDY, "ebnf": grammar})
    assert re.fullmatch(r"\([1-9][0-9]?(,[1-9][0-9]?)*\)", out["text"]), out["text"]


def test_n_samples_each_obey_the_constraint(engine):
    outs = engine.generate(PROMPT, {"temperature": 1.0, "seed": 3, "n": 4, "regex": PHONE})
    assert len(outs) == 4
    assert all(re.fullmatch(PHONE, o["text"]) for o in outs)
    assert len({o["text"] for o in outs}) > 1  # each sample has its own matcher and draws


def test_constraint_stops_without_sampling_eos(engine):
    """Once the grammar is complete the request ends: no token past the match."""
    out = engine.generate(PROMPT, {**GREEDY, "regex": "abc"})
    assert out["text"] == "abc"
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": None}
    assert engine.tokenizer.decode(out["output_ids"]) == "abc"


def test_prefill_only_request_with_a_grammar_generates_nothing(engine):
    out = engine.generate(PROMPT, {"max_new_tokens": 0, "json_schema": PERSON})
    assert out["output_ids"] == [] and out["text"] == ""


def test_max_new_tokens_cuts_a_constrained_output(engine):
    out = engine.generate(PROMPT, {"temperature": 0.0, "max_new_tokens": 3, "regex": "[a-z]{40}"})
    assert len(out["output_ids"]) == 3
    assert out["meta_info"]["finish_reason"]["type"] == "length"


def test_streaming_pieces_concatenate_to_the_constrained_text(engine):
    params = {**GREEDY, "json_schema": PERSON}
    full = engine.generate(PROMPT, params)["text"]
    pieces = [p["text"] for p in engine.generate(PROMPT, params, stream=True)]
    assert "".join(pieces) == full


# ---- batching -------------------------------------------------------------------------


def test_mixed_batch_equals_each_request_alone(engine):
    """Masks touch only constrained rows: free and constrained requests batched
    together give what each gives alone (greedy)."""
    prompts = [PROMPT, "Hello, world!", "Numbers like 0 1 2", "An agent program"]
    params = [
        {**GREEDY, "json_schema": PERSON},
        {**GREEDY, "ignore_eos": True, "max_new_tokens": 24},
        {**GREEDY, "regex": PHONE},
        {**GREEDY, "choices": ["yes", "no"]},
    ]
    alone = [engine.generate(p, sp)["output_ids"] for p, sp in zip(prompts, params)]
    engine.flush_cache()
    together = engine.generate(prompts, params)
    assert [o["output_ids"] for o in together] == alone


def test_free_requests_are_unchanged_by_the_grammar_layer(model_dir, engine):
    """A request without a constraint decodes exactly as before constrained ones ran."""
    params = {**GREEDY, "ignore_eos": True, "max_new_tokens": 20}
    before = engine.generate("Hello there", params)["output_ids"]
    engine.generate(PROMPT, {**GREEDY, "json_schema": PERSON})
    assert engine.generate("Hello there", params)["output_ids"] == before


# ---- jump-forward ---------------------------------------------------------------------


def passes(engine) -> int:
    return engine.get_stats()["num_forward_passes"]


@pytest.mark.parametrize("backend", ["llguidance", "outlines"])
def test_jump_forward_saves_passes_and_both_ways_are_valid(model_dir, backend):
    prompts = [PROMPT, "Hello, world!", "An agent program"]
    counts, metas = {}, {}
    for off in (False, True):
        with plait.Engine(
            model=model_dir,
            max_total_tokens=4096,
            grammar_backend=backend,
            disable_jump_forward=off,
        ) as eng:
            eng.generate("warm", {"max_new_tokens": 1})
            start = passes(eng)
            outs = eng.generate(prompts, [{**GREEDY, "json_schema": FIXED_KEYS}] * len(prompts))
            counts[off] = passes(eng) - start
            metas[off] = [o["meta_info"] for o in outs]
            for o in outs:
                jsonschema.validate(json.loads(o["text"]), FIXED_KEYS)
                assert o["meta_info"]["grammar_backend"] == backend
    assert all(m["forced_tokens"] == 0 for m in metas[True])
    forced = [m["forced_tokens"] for m in metas[False]]
    assert all(f >= 4 for f in forced), forced  # at least the fixed keys are forced
    assert all(m["forward_passes_saved"] == m["forced_tokens"] for m in metas[False])
    assert counts[False] < counts[True], counts


def test_jump_forward_text_is_what_the_tokens_spell(engine):
    """Forced tokens go through the detokenizer like sampled ones."""
    out = engine.generate(PROMPT, {**GREEDY, "json_schema": PERSON})
    assert out["meta_info"]["forced_tokens"] > 0
    assert engine.tokenizer.decode(out["output_ids"]) == out["text"]


def test_outlines_boundary_retokenization_keeps_the_text_valid(model_dir):
    """The outlines path tokenizes forced text together with the sampled token."""
    with plait.Engine(model=model_dir, max_total_tokens=4096, grammar_backend="outlines") as eng:
        for seed in range(3):
            params = {"temperature": 1.0, "seed": seed, "max_new_tokens": 48, "regex": PHONE}
            out = eng.generate(PROMPT, params)
            assert re.fullmatch(PHONE, out["text"])
            assert eng.tokenizer.decode(out["output_ids"]) == out["text"]


def test_logprobs_turn_jump_forward_off(engine):
    out = engine.generate(
        PROMPT, {**GREEDY, "json_schema": PERSON}, return_logprob=True, top_logprobs_num=2
    )
    meta = out["meta_info"]
    assert meta["forced_tokens"] == 0
    assert [t for _, t, _ in meta["output_token_logprobs"]] == out["output_ids"]
    assert_valid_person(out["text"])


# ---- fallback and errors --------------------------------------------------------------


def test_fallback_is_reported_in_meta_info(engine):
    # llguidance (strict) refuses `dependencies`, outlines would ignore it: lenient llguidance.
    schema = {
        "type": "object",
        "properties": {"a": {"type": "integer", "enum": [1, 2, 3]}},
        "required": ["a"],
        "additionalProperties": False,
        "dependencies": {"a": ["a"]},
    }
    out = engine.generate(PROMPT, {**GREEDY, "json_schema": schema})
    meta = out["meta_info"]
    assert meta["grammar_backend"] == "llguidance-lenient"
    assert "dependencies" in meta["grammar_fallback"]
    jsonschema.validate(json.loads(out["text"]), schema)


@pytest.mark.parametrize(
    "field,value,words",
    [
        ("regex", "((", "bad regex syntax"),
        ("json_schema", "{not json", "malformed JSON"),
        ("json_schema", False, "unsatisfiable"),
        ("ebnf", 'start: "a" (', "grammar error"),
    ],
)
def test_bad_constraint_is_refused_and_the_engine_keeps_serving(engine, field, value, words):
    with pytest.raises(GrammarError, match=words) as info:
        engine.generate(PROMPT, {**GREEDY, field: value})
    assert isinstance(info.value, RequestError) and info.value.field == field
    assert re.fullmatch(PHONE, engine.generate(PROMPT, {**GREEDY, "regex": PHONE})["text"])


def test_two_constraints_are_refused(engine):
    with pytest.raises(RequestError, match="only one of"):
        engine.generate(PROMPT, {"regex": "a", "json_schema": {}})


def test_async_generate_with_a_bad_constraint_raises_in_the_caller(engine):
    async def run():
        with pytest.raises(GrammarError):
            await engine.async_generate(PROMPT, {"regex": "(("})
        return await engine.async_generate(PROMPT, {**GREEDY, "regex": PHONE})

    assert re.fullmatch(PHONE, asyncio.run(run())["text"])


def test_abort_of_a_constrained_stream_frees_its_kv(engine):
    engine.flush_cache()
    stream = engine.generate(
        PROMPT, {"temperature": 0.0, "max_new_tokens": 200, "regex": "[a-z]{200}"}, stream=True
    )
    next(stream)
    stream.close()  # the consumer stops early: the request is aborted
    for _ in range(100):
        stats = engine.get_stats()
        if stats["num_running_reqs"] == 0:
            break
    assert stats["kv_slots_used"] == stats["cache_tokens"]
    assert engine.flush_cache() and engine.get_stats()["kv_slots_used"] == 0
