"""GenerateInput, the one request type into the engine: the engine's keyword API,
a /generate body and a GenerateInput given directly all make the same requests,
and its fields are validated in one place with errors naming field and value."""

from __future__ import annotations

import ast
import pathlib

import pytest
from common import GREEDY

from plait.runtime.errors import RequestError
from plait.runtime.inputs import TEXT_ONLY, GenerateInput, InputLimits
from plait.runtime.server.native import generate_input
from plait.runtime.server.protocol import GenerateRequest

LIMITS = InputLimits(
    vocab_size=100, context_len=64, max_total_tokens=256, max_top_logprobs_num=20, model_name="m"
)


def encode(text: str) -> list[int]:
    return [ord(c) % 100 for c in text]


def _summary(reqs) -> list[tuple]:
    """What a request is, without what differs per call (sinks, drawn rids)."""
    return [
        (
            r.rid,
            r.given_rid,
            r.input_ids,
            r.params,
            r.stream,
            r.return_logprob,
            r.logprob_start,
            r.top_logprobs_num,
            r.return_text_in_logprobs,
            r.capped_max_new_tokens,
        )
        for r in reqs
    ]


# ---- the same requests, however they are asked for ----------------------------------


def test_engine_kwargs_and_a_generate_body_make_the_same_requests(engine):
    params = [{**GREEDY, "max_new_tokens": 3, "n": 2}, {**GREEDY, "max_new_tokens": 5}]
    kwargs = dict(
        prompt=["Hello there", "The quick brown fox"],
        sampling_params=params,
        return_logprob=True,
        logprob_start_len=1,
        top_logprobs_num=2,
        return_text_in_logprobs=True,
        rid="batch",
    )
    body = GenerateRequest(
        text=kwargs["prompt"],
        sampling_params=params,
        return_logprob=[True, True],  # the native API's per-prompt form
        logprob_start_len=1,
        top_logprobs_num=2,
        return_text_in_logprobs=True,
        rid="batch",
    )
    from_kwargs, single = engine._make_requests(GenerateInput(**kwargs), sinks=None)
    from_body, single_body = engine._make_requests(generate_input(body), sinks=None)
    assert not single and not single_body
    assert _summary(from_kwargs) == _summary(from_body)
    assert [r.rid for r in from_kwargs] == ["batch-0-0", "batch-0-1", "batch-1"]
    assert {r.given_rid for r in from_kwargs} == {"batch"}


def test_generate_body_with_token_ids_builds_the_same_input():
    body = GenerateRequest(input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 2}, rid="x")
    assert generate_input(body) == GenerateInput(
        input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 2}, rid="x"
    )


def test_engine_takes_a_generate_input_directly(engine):
    params = {**GREEDY, "max_new_tokens": 4}
    by_kwargs = engine.generate("Hello there", params)
    direct = engine.generate(GenerateInput(prompt="Hello there", sampling_params=params))
    assert direct["output_ids"] == by_kwargs["output_ids"]
    assert direct["text"] == by_kwargs["text"]
    pieces = list(engine.generate(GenerateInput("Hello there", params, stream=True)))
    assert sum((p["output_ids"] for p in pieces), []) == by_kwargs["output_ids"]


def test_async_generate_takes_a_generate_input(engine):
    import asyncio

    params = {**GREEDY, "max_new_tokens": 4}
    expected = engine.generate(input_ids=[5, 6, 7], sampling_params=params)
    out = asyncio.run(
        engine.async_generate(GenerateInput(input_ids=[5, 6, 7], sampling_params=params))
    )
    assert out["output_ids"] == expected["output_ids"]


def test_a_generate_input_and_keyword_arguments_do_not_mix(engine):
    with pytest.raises(TypeError, match="GenerateInput alone"):
        engine.generate(GenerateInput(prompt="hi"), {"max_new_tokens": 1})
    with pytest.raises(TypeError, match="GenerateInput alone"):
        engine.generate(GenerateInput(prompt="hi"), stream=True)


# ---- one place validates, naming field and value ----------------------------------------


@pytest.mark.parametrize(
    "fields,field,value,reason",
    [
        ({}, "prompt", None, "give exactly one of prompt or input_ids"),
        ({"prompt": "a", "input_ids": [1]}, "prompt", "a", "give exactly one of prompt"),
        ({"prompt": ["a", 3]}, "prompt[1]", 3, "must be a string"),
        ({"prompt": "a\ud800b"}, "prompt", "a\ud800b", "lone surrogate"),
        ({"prompt": []}, "prompt", [], "empty batch"),
        ({"prompt": ["a", "b"], "sampling_params": [{}]}, "sampling_params", [{}], "expected 2"),
        ({"prompt": ["a", "b"], "rid": ["x"]}, "rid", ["x"], "1 rids for 2 prompts"),
        ({"prompt": ["a", "b"], "rid": ["x", "x"]}, "rid", ["x", "x"], "rids must be unique"),
        ({"prompt": "a", "top_logprobs_num": 21}, "top_logprobs_num", 21, "[0, 20]"),
        ({"prompt": "a", "top_logprobs_num": True}, "top_logprobs_num", True, "integer"),
        ({"prompt": "a", "logprob_start_len": "1"}, "logprob_start_len", "1", "integer"),
        ({"prompt": "a", "token_ids_logprob": [1]}, "token_ids_logprob", [1], "not supported"),
        ({"input_ids": []}, "input_ids", [], "the prompt has no tokens"),
        ({"input_ids": [1, 100]}, "input_ids", [100], "integers in [0, 100)"),
        ({"input_ids": [[1], [2, -1]]}, "input_ids[1]", [-1], "integers in [0, 100)"),
        ({"input_ids": [1] * 64}, "input_ids", "<64 tokens>", "longer than the context"),
        ({"prompt": "a", "sampling_params": {"n": 2}, "stream": True}, "stream", True, "n=1"),
        (
            {"prompt": "a", "sampling_params": {"temperature": -1}},
            "sampling_params.temperature",
            -1,
            "",
        ),
    ],
)
def test_bad_fields_name_field_and_value(fields, field, value, reason):
    with pytest.raises(RequestError) as err:
        GenerateInput(**fields).check(encode, LIMITS)
    assert err.value.field == field
    assert err.value.value == value
    assert reason in err.value.reason


def test_the_engine_gives_the_same_errors(engine):
    vocab = engine.model_config.vocab_size
    for fields in (
        {"prompt": "a", "top_logprobs_num": -1},
        {"input_ids": [vocab]},
        {"prompt": ["a", "b"], "rid": ["x", "x"]},
    ):
        with pytest.raises(RequestError) as direct:
            GenerateInput(**fields).check(engine.tokenizer.encode, engine.input_limits)
        with pytest.raises(RequestError) as through_engine:
            engine.generate(**fields)
        assert str(through_engine.value) == str(direct.value)


def test_a_max_new_tokens_past_the_context_is_capped():
    (p,), single = GenerateInput(input_ids=[1] * 60, sampling_params={"max_new_tokens": 10}).check(
        encode, LIMITS
    )
    assert single
    assert p.params.max_new_tokens == 4
    assert p.capped_max_new_tokens == 4


# ---- images ---------------------------------------------------------------------------------


def test_images_on_a_text_model_are_refused(engine):
    with pytest.raises(RequestError) as err:
        engine.generate(GenerateInput(prompt="Look:", images=[["a picture"]]))
    assert err.value.field == "images"
    assert err.value.value == engine.model_name
    assert err.value.reason == TEXT_ONLY
    assert engine.model_name.startswith("tiny_llama")  # a name, not the weights' path


def test_no_images_is_fine_on_a_text_model():
    prompts, _ = GenerateInput(prompt=["a", "b"], images=[[], None]).check(encode, LIMITS)
    assert [p.images for p in prompts] == [[], []]


def test_images_come_one_list_per_prompt():
    with_images = InputLimits(**{**LIMITS.__dict__, "supports_images": True})
    prompts, _ = GenerateInput(prompt=["a", "b"], images=[["x"], ["y", "z"]]).check(
        encode, with_images
    )
    assert [p.images for p in prompts] == [["x"], ["y", "z"]]
    with pytest.raises(RequestError, match="expected a list of 2 image lists") as err:
        GenerateInput(prompt=["a", "b"], images=[["x"]]).check(encode, with_images)
    assert err.value.field == "images"


# ---- the server's modules --------------------------------------------------------------------


def test_the_server_modules_do_not_import_the_app():
    """app.py builds the app from the other modules; none of them imports it back."""
    server = pathlib.Path(__file__).parents[1] / "runtime" / "server"
    for path in server.glob("*.py"):
        if path.name in ("__init__.py", "serve.py", "app.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.module not in ("plait.runtime.server", "plait.runtime.server.app"), (
                    path.name
                )
