"""Budget-aware closing (constrained/closing.py): near the end of its token budget a
constrained output is steered onto the shortest way to finish its grammar, so a
JSON output cut by max_new_tokens still parses and validates.

Closings are checked on the tiny byte-level tokenizer with llguidance matchers
(exact texts, acceptance by the grammar, validity), then through the engine on a
tiny random model whose strings are kept open by a logit bias, and on the real
default model."""

from __future__ import annotations

import itertools
import json
import re

import jsonschema
import pytest
from transformers import AutoTokenizer

import plait
from plait.runtime.constrained import GrammarCompiler, GrammarSpec, TokenizerInfo
from plait.runtime.constrained.closing import BudgetCloser
from plait.runtime.constrained.closing_json import JsonCompleter
from plait.runtime.constrained.closing_regex import RegexCompleter
from plait.runtime.constrained.compiler import make_backend
from plait.runtime.sampling_params import SamplingParams, SamplingParamsError

EOS = 2  # <|im_end|> of the tiny tokenizer
VOCAB = 512

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 18},
        "tags": {"type": "array", "items": {"enum": ["red", "green"]}, "minItems": 1},
    },
    "required": ["name", "age", "tags"],
}
SHAPES = {
    "$defs": {
        "point": {
            "type": "object",
            "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
            "required": ["x", "y"],
        }
    },
    "type": "object",
    "properties": {
        "shape": {"anyOf": [{"$ref": "#/$defs/point"}, {"type": "string", "enum": ["none"]}]},
        "when": {"type": "string", "format": "date"},
    },
    "required": ["shape", "when"],
}
CODES = {
    "type": "object",
    "properties": {
        "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
        "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]+$"},
        "ok": {"type": "boolean"},
        "none": {"type": "null"},
    },
    "required": ["zip", "code", "ok", "none"],
}
UNIQUE = {
    "type": "object",
    "properties": {
        "ids": {"type": "array", "items": {"type": "integer"}, "minItems": 3, "uniqueItems": True},
        "note": {"type": "string", "minLength": 3},
    },
    "required": ["ids", "note"],
}


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def compiler(tok):
    info = TokenizerInfo.from_hf(tok, VOCAB, [EOS])
    comp = GrammarCompiler(info)
    yield comp
    comp.close()


@pytest.fixture(scope="module")
def closer(tok):
    return BudgetCloser(tok, VOCAB, [EOS])


def close(compiler, closer, tok, kind, value, partial: str) -> str:
    """Walk ``partial`` through a fresh matcher, close it, check that the matcher takes
    every closing token and can then stop; return the closing text."""
    spec = GrammarSpec.of(kind, value)
    m = compiler.compile(spec).grammar.matcher()
    ids = tok.encode(partial, add_special_tokens=False)
    for t in ids:
        assert m.accept(t), f"the partial text {partial!r} is not a prefix of the grammar"
    closing = closer.closing_tokens(m, spec, ids)
    assert closing is not None, f"no closing for {partial!r}"
    for t in closing:
        assert m.accept(t), f"closing token {t} rejected after {partial!r}"
    assert m.can_stop()
    return closer.text_bytes(closing).decode()


# ---- JSON schema ---------------------------------------------------------------------

JSON_CASES = [
    (PERSON, "", '{"name":"","age":18,"tags":["red"]}'),
    (PERSON, "{", '"name":"","age":18,"tags":["red"]}'),
    (PERSON, '{"na', 'me":"","age":18,"tags":["red"]}'),
    (PERSON, '{"name":"Bo', '","age":18,"tags":["red"]}'),
    (PERSON, '{"name":"Bob","age":1', '8,"tags":["red"]}'),
    (PERSON, '{"name":"Bob","age":20,"tags":["gr', 'een"]}'),
    (PERSON, '{"name":"Bob","age":20,"tags":["red",', '"red"]}'),
    (PERSON, '{"name":"a\\', None),  # inside an escape
    (PERSON, '{"name":"caf\\u00', None),
    (SHAPES, '{"shape":{"x":1.', '0,"y":0},"when":"1000-01-01"}'),
    (SHAPES, '{"shape":{"x":-', '0,"y":0},"when":"1000-01-01"}'),
    (SHAPES, '{"shape":{"x":2e', '0,"y":0},"when":"1000-01-01"}'),
    (SHAPES, '{"shape":"n', 'one","when":"1000-01-01"}'),
    (SHAPES, '{"shape":{"x":1,"y":2},"when":"2024-1', '0-01"}'),
    (CODES, '{"zip":"12', '000","code":"AA-0","ok":true,"none":null}'),
    (CODES, '{"zip":"12345","code":"X', 'A-0","ok":true,"none":null}'),
    (CODES, '{"zip":"12345","code":"XY-1","ok":f', 'alse,"none":null}'),
    (UNIQUE, '{"ids":[0,', '1,2],"note":"aaa"}'),
    (UNIQUE, '{"ids":[0,1,2],"note":"a', 'aa"}'),
]


@pytest.mark.parametrize("schema, partial, expected", JSON_CASES)
def test_json_closing_is_accepted_and_validates(compiler, closer, tok, schema, partial, expected):
    text = close(compiler, closer, tok, "json_schema", schema, partial)
    if expected is not None:
        assert text == expected
    jsonschema.validate(json.loads(partial + text), schema)


def test_closing_works_with_the_outlines_backend(tok, closer):
    info = TokenizerInfo.from_hf(tok, VOCAB, [EOS])
    spec = GrammarSpec.of("json_schema", CODES)
    m = make_backend("outlines", info).compile(spec).matcher()
    ids = tok.encode('{"zip":"12', add_special_tokens=False)
    assert all(m.accept(t) for t in ids)
    closing = closer.closing_tokens(m, spec, ids)
    assert closer.text_bytes(closing).decode() == '000","code":"AA-0","ok":true,"none":null}'
    assert all(m.accept(t) for t in closing) and m.can_stop()


def test_json_completer_fills_required_properties_in_schema_order():
    schema = {
        "type": "object",
        "properties": {"b": {"type": "string"}, "a": {"type": "integer"}, "c": {}},
        "required": ["a", "b"],
    }
    assert JsonCompleter(schema).completions("{")[0] == '"b":"","a":0}'
    assert JsonCompleter(schema).completions('{"b":"x",')[0] == '"a":0}'


def test_json_completer_gives_nothing_for_text_that_is_not_json():
    assert JsonCompleter(PERSON).completions('{"name" 12') == []


# ---- regex, choices, EBNF -----------------------------------------------------------


@pytest.mark.parametrize(
    "regex, partial, expected",
    [
        (r"[0-9]{3}-[0-9]{4}", "12", "0-0000"),
        (r"(ab|abc)d+|x", "ab", "d"),
        (r"(ab)+c", "aba", "bc"),
        (r"(yes|no|maybe)", "", "no"),
    ],
)
def test_regex_closing_is_the_shortest_completion(compiler, closer, tok, regex, partial, expected):
    text = close(compiler, closer, tok, "regex", regex, partial)
    assert text == expected
    assert re.fullmatch(regex, partial + text)
    # Nothing shorter over the regex's own characters completes it.
    alphabet = sorted(set(re.sub(r"[^a-z0-9-]", "", regex)))
    for n in range(len(expected)):
        for combo in itertools.product(alphabet, repeat=n):
            assert not re.fullmatch(regex, partial + "".join(combo))


def test_choices_closing_finishes_the_choice_it_started(compiler, closer, tok):
    text = close(compiler, closer, tok, "choices", ["positive", "negative", "neutral"], "neu")
    assert text == "tral"


@pytest.mark.parametrize(
    "grammar, partial, expected",
    [
        ('start: "(" start ")" | "x"', "((", "x))"),
        ('start: "Answer: " NUMBER "."\nNUMBER: /[0-9]+/', "Answer: 4", "."),
        ('start: "[" item ("," item)* "]"\nitem: "a" | "bb"', "[a,", "a]"),
    ],
)
def test_ebnf_closing_by_search(compiler, closer, tok, grammar, partial, expected):
    assert close(compiler, closer, tok, "ebnf", grammar, partial) == expected


def test_regex_completer_reads_json_schema_patterns_as_searches():
    assert RegexCompleter.of("ab", search=True).complete("xx") == "ab"
    assert RegexCompleter.of("^ab$", search=True).complete("a") == "b"
    assert RegexCompleter.of("^ab$", search=True).complete("x") is None


# ---- never a rejected token -------------------------------------------------------------


def test_wrong_candidates_are_rejected_by_the_matcher(compiler, closer, tok, monkeypatch):
    """Candidates the grammar does not take (a wrong key, a broken text) are skipped;
    with none left the search over the matcher still finds a closing."""
    good = JsonCompleter.complete

    def wrong_first(self, parser):
        return ['"}', "x", *good(self, parser)]

    monkeypatch.setattr(JsonCompleter, "complete", wrong_first)
    text = close(compiler, closer, tok, "json_schema", PERSON, '{"name":"Bob","age":20')
    assert text == ',"tags":["red"]}'

    monkeypatch.setattr(JsonCompleter, "complete", lambda self, parser: ['"}', "]]"])
    text = close(compiler, closer, tok, "json_schema", PERSON, '{"name":"Bob","age":20')
    jsonschema.validate(json.loads('{"name":"Bob","age":20' + text), PERSON)


def test_closing_of_a_finished_document_is_empty(compiler, closer, tok):
    assert (
        close(compiler, closer, tok, "json_schema", PERSON, '{"name":"","age":18,"tags":["red"]}')
        == ""
    )


# ---- through the engine (tiny random model) ---------------------------------------------

OPEN_STRINGS = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"id": {"type": "integer"}, "label": {"type": "string"}},
                "required": ["id", "label"],
            },
        },
        "done": {"type": "boolean"},
    },
    "required": ["title", "items", "done"],
}


@pytest.fixture(scope="module")
def quote_ban(tok) -> dict[int, float]:
    """A logit bias that keeps the model from ever closing a string itself."""
    return {i: -100.0 for i in range(VOCAB) if '"' in tok.decode([i])}


def test_engine_closes_a_cut_json_output(engine, quote_ban):
    base = {"temperature": 0.0, "json_schema": OPEN_STRINGS, "logit_bias": quote_ban}
    on = engine.generate("Make a list:", {**base, "max_new_tokens": 32})
    off = engine.generate("Make a list:", {**base, "max_new_tokens": 32, "budget_closing": False})
    meta = on["meta_info"]
    assert meta["finish_reason"] == {"type": "length", "length": 32, "closed": True}
    assert 0 < meta["closed_tokens"] < 32
    assert len(on["output_ids"]) == 32
    jsonschema.validate(json.loads(on["text"]), OPEN_STRINGS)
    assert off["meta_info"]["finish_reason"] == {"type": "length", "length": 32}
    assert off["meta_info"]["closed_tokens"] == 0
    with pytest.raises(json.JSONDecodeError):
        json.loads(off["text"])
    # Up to the closing, both runs decode the same tokens.
    free = len(on["output_ids"]) - meta["closed_tokens"]
    assert on["output_ids"][:free] == off["output_ids"][:free]


@pytest.mark.parametrize("max_new_tokens", range(26, 56, 3))
def test_every_budget_ends_valid(engine, quote_ban, compiler, max_new_tokens):
    """Whatever the budget (a closing may grow by many tokens in one step: then the
    step is dropped and the previous closing used), the output validates, stays in
    the budget, and a fresh matcher takes every token."""
    out = engine.generate(
        "Make a list:",
        {
            "temperature": 0.0,
            "json_schema": OPEN_STRINGS,
            "logit_bias": quote_ban,
            "max_new_tokens": max_new_tokens,
        },
    )
    assert len(out["output_ids"]) <= max_new_tokens
    assert out["meta_info"]["finish_reason"]["closed"] is True
    jsonschema.validate(json.loads(out["text"]), OPEN_STRINGS)
    m = engine.grammar_compiler.compile(GrammarSpec.of("json_schema", OPEN_STRINGS)).grammar
    m = m.matcher()
    assert all(m.accept(t) for t in out["output_ids"])
    assert m.can_stop()


def test_regex_and_ebnf_close_through_the_engine(engine, tok):
    no_dash = {i: -100.0 for i in range(VOCAB) if "-" in tok.decode([i])}  # never ends alone
    regex = r"[a-z ]+-[0-9]{4}"
    params = {"temperature": 0.0, "regex": regex, "max_new_tokens": 12, "logit_bias": no_dash}
    out = engine.generate("x", params)
    assert re.fullmatch(regex, out["text"]), out["text"]
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 12, "closed": True}
    no_x = {i: -100.0 for i in range(VOCAB) if "x" in tok.decode([i])}
    ebnf = 'start: "(" start ")" | "x"'
    out = engine.generate(
        "x", {"temperature": 0.0, "ebnf": ebnf, "max_new_tokens": 10, "logit_bias": no_x}
    )
    assert out["meta_info"]["finish_reason"]["closed"] is True
    depth = out["text"].count("(")
    assert out["text"] == "(" * depth + "x" + ")" * depth


def test_closing_tokens_get_null_logprobs(engine, quote_ban):
    out = engine.generate(
        "Make a list:",
        {
            "temperature": 0.0,
            "json_schema": OPEN_STRINGS,
            "logit_bias": quote_ban,
            "max_new_tokens": 30,
        },
        return_logprob=True,
    )
    meta = out["meta_info"]
    assert meta["finish_reason"]["closed"] is True
    lps = meta["output_token_logprobs"]
    assert len(lps) == len(out["output_ids"])
    closed = meta["closed_tokens"]
    assert all(lp[0] is None for lp in lps[-closed:])
    assert [lp[1] for lp in lps] == out["output_ids"]


def test_output_that_finishes_by_itself_is_not_closed(engine):
    out = engine.generate("x", {"temperature": 0.0, "regex": "[0-9]{3}", "max_new_tokens": 16})
    assert out["meta_info"]["finish_reason"]["type"] == "stop"
    assert "closed" not in out["meta_info"]["finish_reason"]
    assert out["meta_info"]["closed_tokens"] == 0


def test_budget_closing_must_be_a_boolean():
    assert SamplingParams(budget_closing=False).verify().budget_closing is False
    with pytest.raises(SamplingParamsError, match="budget_closing"):
        SamplingParams(budget_closing="yes").verify()


# ---- the real default model -------------------------------------------------------------


@pytest.fixture(scope="module")
def smol(default_model_source):
    with plait.Engine(model="smollm2", num_threads=1) as eng:
        yield eng


@pytest.mark.default_model
def test_default_model_json_cut_by_budget_is_closed(smol):
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1},
            "address": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "zip": {"pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"],
            },
        },
        "required": ["name", "tags", "address"],
    }
    prompt = smol.apply_chat_template(
        [{"role": "user", "content": "Describe a person as JSON with a very long list of tags."}]
    )
    params = {"temperature": 0.0, "json_schema": schema, "max_new_tokens": 48}
    on = smol.generate(prompt, params)
    off = smol.generate(prompt, {**params, "budget_closing": False})
    assert on["meta_info"]["finish_reason"]["closed"] is True
    jsonschema.validate(json.loads(on["text"]), schema)
    assert off["meta_info"]["finish_reason"] == {"type": "length", "length": 48}
    with pytest.raises(json.JSONDecodeError):
        json.loads(off["text"])
