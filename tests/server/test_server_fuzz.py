"""Fuzzing the HTTP server: whatever a client sends, no route answers with a 5xx and
every refusal has the OpenAI error shape. schemathesis drives every operation of the
app's own OpenAPI spec (bodies valid and invalid by the spec); hypothesis drives the
free-form ``sampling_params`` of /generate, and completion and chat bodies, with the
real field names and values of any JSON type. The engine has a 64-token context and
batches are capped, so that every fuzzed generation stays cheap."""

from __future__ import annotations

import pytest
import schemathesis
from common import ERROR_KEYS, MODEL
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import plait
from plait.runtime.sampling_params import SamplingParams
from plait.runtime.server import ServerConfig, create_app

MAX_FUZZ_N = 4  # samples per prompt
MAX_FUZZ_BATCH = 4  # prompts per request


def small_engine(model_dir: str) -> plait.Engine:
    return plait.Engine(
        model=model_dir, max_total_tokens=8192, max_running_requests=64, context_length=64
    )


def make_app(engine: plait.Engine):
    return create_app(engine, ServerConfig(served_model_name=MODEL, chat_default_max_tokens=8))


@pytest.fixture(scope="module")
def api_schema(tiny_model_dir):
    # Its own engine: schemathesis runs the app's lifespan, whose shutdown stops the engine.
    with small_engine(tiny_model_dir("llama")) as engine:
        yield schemathesis.openapi.from_asgi("/openapi.json", make_app(engine))


@pytest.fixture(scope="module")
def client(tiny_model_dir) -> TestClient:
    # The client is entered: one event loop for the module, which the engine's late
    # results (an aborted request's last output) need.
    with (
        small_engine(tiny_model_dir("llama")) as engine,
        TestClient(make_app(engine)) as c,
    ):
        yield c


def assert_not_a_server_error(response, request) -> None:
    assert response.status_code < 500, (request, response.text)
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == ERROR_KEYS, error


schema = schemathesis.pytest.from_fixture("api_schema")


def keep_cheap(body: object) -> None:
    """Cap the prompts of a batch and the samples per prompt (n) of a fuzzed body in
    place: a long list of prompts with n up to 128 makes thousands of requests."""
    if not isinstance(body, dict):
        return
    for key in ("text", "prompt", "input_ids"):
        if isinstance(body.get(key), list) and body[key] and isinstance(body[key][0], (list, str)):
            body[key] = body[key][:MAX_FUZZ_BATCH]
    params = body.get("sampling_params")
    if isinstance(params, list):
        body["sampling_params"] = params = params[:MAX_FUZZ_BATCH]
    for d in [body, *(params if isinstance(params, list) else [params])]:
        if isinstance(d, dict) and isinstance(d.get("n"), int) and d["n"] > MAX_FUZZ_N:
            d["n"] = MAX_FUZZ_N


@schema.parametrize()
@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_request_from_the_openapi_spec_makes_a_server_error(case):
    # The served model's name, so that fuzzed bodies get past the model check
    # (an unknown model is tested on its own in test_server_openai.py).
    if case.path.startswith("/v1/") and isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = MODEL
    keep_cheap(case.body)
    response = case.call()
    assert_not_a_server_error(response, (case.method, case.path, case.body))


JSON_VALUE = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
SAMPLING_FIELDS = sorted(SamplingParams().to_dict())
SAMPLING_PARAMS = st.dictionaries(
    st.sampled_from(SAMPLING_FIELDS) | st.text(max_size=8), JSON_VALUE, max_size=4
)


@given(
    params=SAMPLING_PARAMS,
    logprobs=st.fixed_dictionaries(
        {},
        optional={
            "return_logprob": st.booleans(),
            "logprob_start_len": st.integers(-5, 100),
            "top_logprobs_num": st.integers(0, 1000),
            "return_text_in_logprobs": st.booleans(),
        },
    ),
    stream=st.booleans(),
)
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_sampling_params_make_a_server_error(client, params, logprobs, stream):
    params = {"max_new_tokens": 8, **params}  # a short default; fuzzed values still apply
    body = {"text": "Hello", "sampling_params": params, "stream": stream, **logprobs}
    response = client.post("/generate", json=body)
    assert_not_a_server_error(response, body)
    if response.status_code == 200 and not stream:
        assert response.json()["meta_info"]["finish_reason"]["type"] != "abort", response.text


ANY = st.one_of(JSON_VALUE, st.integers(-5, 600), st.floats(-3, 3))
TOKEN_IDS = st.lists(
    st.integers(min_value=-(2**40), max_value=2**40) | st.integers(0, 511), max_size=6
)
SHARED_FIELDS = {
    name: ANY
    for name in (
        "max_tokens",
        "temperature",
        "top_p",
        "n",
        "stop",
        "seed",
        "frequency_penalty",
        "presence_penalty",
        "top_k",
        "min_p",
        "min_tokens",
        "repetition_penalty",
        "stop_token_ids",
        "ignore_eos",
        "skip_special_tokens",
        "regex",
        "ebnf",
        "json_schema",
        "response_format",
        "stream_options",
    )
}


@given(
    body=st.fixed_dictionaries(
        {
            "prompt": st.text(max_size=20)
            | st.lists(st.text(max_size=8), max_size=3)
            | TOKEN_IDS
            | st.lists(TOKEN_IDS, max_size=3)
        },
        optional={**SHARED_FIELDS, "echo": st.booleans(), "logprobs": st.integers(-1, 21) | ANY},
    ),
    stream=st.booleans(),
)
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_completion_request_makes_a_server_error(client, body, stream):
    keep_cheap(body)
    body = {**body, "model": MODEL, "stream": stream}
    assert_not_a_server_error(client.post("/v1/completions", json=body), body)


CONTENT_PART = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image_url", "input_image", "audio"]) | st.text(max_size=5)},
    optional={"text": ANY, "image_url": ANY},
)
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "developer", "tool"])},
    optional={"content": st.text(max_size=30) | st.none() | st.lists(CONTENT_PART, max_size=3)},
)


@given(
    body=st.fixed_dictionaries(
        {"messages": st.lists(MESSAGE, max_size=4)},
        optional={
            **SHARED_FIELDS,
            "max_completion_tokens": ANY,
            "logprobs": ANY,
            "top_logprobs": st.integers(-1, 21) | ANY,
        },
    ),
    stream=st.booleans(),
)
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_chat_request_makes_a_server_error(client, body, stream):
    keep_cheap(body)
    body = {**body, "model": MODEL, "stream": stream}
    assert_not_a_server_error(client.post("/v1/chat/completions", json=body), body)
