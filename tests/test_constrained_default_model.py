"""Constrained decoding on the real default model (SmolLM2-135M-Instruct): JSON
that validates against its schema and text that fullmatches its regex, greedy and
sampled, and a sample of each shared JSONSchemaBench set compiled, generated and
validated."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest

import plait
from plait.runtime.constrained.coverage import sample_schemas

pytestmark = pytest.mark.default_model

BENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "jsonschemabench"
SETS = ["Github_trivial", "Github_easy", "Glaiveai2K"]

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "email": {"type": "string", "format": "email"},
        "hobbies": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
    },
    "required": ["name", "age", "email", "hobbies"],
    "additionalProperties": False,
}
DATE = r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"


@pytest.fixture(scope="module")
def engine(default_model_source):
    with plait.Engine(model="smollm2", max_total_tokens=32768, num_threads=2) as eng:
        yield eng


def chat(engine, text: str) -> str:
    return engine.apply_chat_template([{"role": "user", "content": text}])


def test_json_schema_outputs_validate_greedy_and_sampled(engine):
    prompt = chat(engine, "Describe a fictional person as JSON.")
    params = [{"temperature": 0.0, "max_new_tokens": 128, "json_schema": PERSON}]
    params += [
        {"temperature": 1.0, "seed": s, "max_new_tokens": 128, "json_schema": PERSON}
        for s in range(3)
    ]
    outs = engine.generate([prompt] * len(params), params)
    for out in outs:
        assert out["meta_info"]["finish_reason"]["type"] == "stop", out["text"]
        jsonschema.validate(json.loads(out["text"]), PERSON)
    assert outs[0]["meta_info"]["forced_tokens"] > 0  # the fixed keys were jumped over


def test_regex_outputs_fullmatch_greedy_and_sampled(engine):
    prompt = chat(engine, "When did the first person walk on the moon? Give the date.")
    for params in [{"temperature": 0.0}] + [{"temperature": 1.0, "seed": s} for s in range(3)]:
        out = engine.generate(prompt, {**params, "max_new_tokens": 32, "regex": DATE})
        assert re.fullmatch(DATE, out["text"]), out["text"]


def test_choices_on_a_real_question(engine):
    prompt = chat(engine, "Is Paris the capital of France? Answer yes or no.")
    out = engine.generate(prompt, {"temperature": 0.0, "choices": ["yes", "no"]})
    assert out["text"] == "yes"


@pytest.mark.skipif(not BENCH.is_dir(), reason=f"JSONSchemaBench data not found at {BENCH}")
def test_jsonschemabench_samples_compile_generate_and_validate(engine):
    """Four schemas per shared set: each compiles, and every output that finishes
    validates. An output cut at max_new_tokens is this small model looping inside
    an unbounded number or string ("1000000..."): the grammar allows it, so that is
    the model's failure, counted by ``plait bench grammar``, not the runtime's."""
    prompts, params, schemas = [], [], []
    for name in SETS:
        for path in sample_schemas(BENCH / name, limit=4, seed=1):
            schema = json.loads(path.read_text())
            schemas.append((path.name, schema))
            text = json.dumps(schema)[:2000]
            prompts.append(chat(engine, f"Give a JSON object valid under this schema:\n{text}"))
            params.append({"temperature": 0.0, "max_new_tokens": 256, "json_schema": schema})
    outs = engine.generate(prompts, params)
    finished = 0
    for (name, schema), out in zip(schemas, outs, strict=True):
        if out["meta_info"]["finish_reason"]["type"] != "stop":
            continue
        finished += 1
        errors = list(
            jsonschema.validators.validator_for(schema)(schema).iter_errors(json.loads(out["text"]))
        )
        assert not errors, f"{name}: {errors[0].message}"
    assert finished >= len(schemas) // 2, f"only {finished} of {len(schemas)} finished"
