"""The server under hostile or careless clients, in process on a tiny random model:
every bad request is a 4xx naming the field, refused before it can stall or break
anything, and nothing on the server is exposed or drivable from a web page."""

from __future__ import annotations

import json
import threading

import pytest
from common import GREEDY, MODEL, PROMPTS, assert_error, assert_kv_all_free, sse_events
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from plait.runtime.server import ServerConfig, create_app


@pytest.fixture(scope="module")
def client(engine):
    with TestClient(create_app(engine, ServerConfig(served_model_name=MODEL))) as c:
        yield c


def _samples(client: TestClient) -> dict:
    out = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _serves(client: TestClient) -> None:
    body = {"text": "a", "sampling_params": {"max_new_tokens": 2}}
    r = client.post("/generate", json=body)
    assert r.status_code == 200 and r.json()["meta_info"]["completion_tokens"] == 2


# ---- bad values ---------------------------------------------------------------------------


def _post_raw(client: TestClient, path: str, body: str):
    """Post JSON text as it is (json= would refuse to encode a lone surrogate)."""
    return client.post(
        path, content=body.encode("ascii"), headers={"content-type": "application/json"}
    )


def test_a_lone_surrogate_in_a_prompt_is_400(client):
    r = _post_raw(client, "/generate", '{"text": "abc \\ud800 def"}')
    error = assert_error(r, 400, "text")
    assert error["code"] == "invalid_unicode"
    assert "surrogate" in error["message"] and "'\\ud800'" in error["message"]
    r = _post_raw(
        client,
        "/v1/chat/completions",
        '{"model": "tiny", "messages": [{"role": "user", "content": "\\udfff"}]}',
    )
    assert "surrogate" in assert_error(r, 400, "messages.0.content")["message"]
    _serves(client)


# Every string of a request, keys included: each would have been echoed (in a result's
# meta_info or an error message) into a response UTF-8 cannot encode, a 500 that drops
# the connection.
@pytest.mark.parametrize(
    "path,body,param",
    [
        ("/generate", '{"text": ["ok", "a S"]}', "text.1"),
        ("/generate", '{"text": "a", "rid": "S"}', "rid"),
        (
            "/generate",
            '{"text": "a", "sampling_params": {"stop": ["S"]}}',
            "sampling_params.stop.0",
        ),
        ("/generate", '{"text": "a", "sampling_params": {"regex": "S"}}', "sampling_params.regex"),
        ("/generate", '{"text": "a", "sampling_params": {"S": 1}}', "sampling_params.\\ud800"),
        ("/generate", '{"text": "a", "S": 1}', "\\ud800"),
        ("/generate", '{"text": "S", "stream": true}', "text"),
        ("/v1/completions", '{"model": "S", "prompt": "a"}', "model"),
        (
            "/v1/completions",
            '{"model": "tiny", "prompt": "a", "stop": "S", "stream": true}',
            "stop",
        ),
        (
            "/v1/chat/completions",
            '{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "S"}]}]}',
            "messages.0.content.0.type",
        ),
        ("/abort_request", '{"rid": "S"}', "rid"),
    ],
)
def test_a_lone_surrogate_anywhere_is_400_naming_the_field(client, path, body, param):
    r = _post_raw(client, path, body.replace("S", "\\ud800"))
    error = assert_error(r, 400, param)
    assert error["code"] == "invalid_unicode"
    r = _post_raw(client, path, body.replace("S", "\\ud83d\\ude00"))  # a pair is fine
    assert r.status_code != 500
    _serves(client)


@pytest.mark.parametrize(
    "params,param",
    [
        ({"temperature": 1e-45, "max_new_tokens": 3}, None),  # greedy, not a crash
        ({"repetition_penalty": 1e-300}, "sampling_params.repetition_penalty"),
        ({"json_schema": {"$ref": "#"}}, "json_schema"),
        ({"structural_tag": "{}"}, "sampling_params.structural_tag"),
    ],
)
def test_values_that_broke_the_engine_are_answered_alone(client, params, param):
    r = client.post("/generate", json={"text": PROMPTS[0], "sampling_params": params})
    if param is None:
        assert r.status_code == 200, r.text
        assert r.json()["meta_info"]["finish_reason"]["type"] in ("length", "stop")
    else:
        assert_error(r, 400, param)
    _serves(client)


def test_top_logprobs_num_over_the_cap_is_400(client):
    body = {"text": "a", "return_logprob": True, "top_logprobs_num": 49152}
    error = assert_error(client.post("/generate", json=body), 400, "top_logprobs_num")
    assert "20" in error["message"]


def test_a_rid_in_flight_is_400_and_the_first_request_is_untouched(client, engine):
    results = []
    stream = engine.generate(
        PROMPTS[1], {**GREEDY, "max_new_tokens": 60}, stream=True, rid="shared-rid"
    )
    first = next(stream)
    thread = threading.Thread(target=lambda: results.extend([first, *stream]))
    thread.start()
    body = {"text": "a", "rid": "shared-rid", "sampling_params": {"max_new_tokens": 2}}
    error = assert_error(client.post("/generate", json=body), 400, "rid")
    assert "already in flight" in error["message"]
    thread.join(30)
    assert results[-1]["meta_info"]["finish_reason"]["type"] == "length"
    assert sum(len(p["output_ids"]) for p in results) == 60


# ---- SGLang's fields ----------------------------------------------------------------------


def test_image_data_on_a_text_model_is_400_naming_the_model(client):
    body = {"text": "What is in the image?", "image_data": "data:image/png;base64,AAAA"}
    error = assert_error(client.post("/generate", json=body), 400, "image_data")
    assert "'tiny'" in error["message"] and "text-only" in error["message"]


@pytest.mark.parametrize("field", ["return_hidden_states", "lora_path", "session_params"])
def test_sglang_fields_that_cannot_apply_are_400(client, field):
    body = {"text": "a", field: True if field == "return_hidden_states" else "x"}
    assert_error(client.post("/generate", json=body), 400, field)


def test_an_unknown_top_level_field_is_400_and_sglang_fields_are_accepted(client):
    r = client.post("/generate", json={"text": "a", "temprature": 1})
    assert "no such field" in assert_error(r, 400, "temprature")["message"]
    body = {
        "text": "a",
        "sampling_params": {"max_new_tokens": 2, "no_stop_trim": True, "custom_params": {}},
        "log_metrics": True,
        "modalities": [],
        "return_logprob": [True],
        "logprob_start_len": [-1],
        "top_logprobs_num": [2],
    }
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    assert len(r.json()["meta_info"]["output_top_logprobs"][0]) == 2


def test_incremental_streaming_output_sends_only_what_is_new(client):
    params = {**GREEDY, "max_new_tokens": 8}
    whole = client.post("/generate", json={"text": PROMPTS[1], "sampling_params": params}).json()
    body = {
        "text": PROMPTS[1],
        "sampling_params": params,
        "stream": True,
        "incremental_streaming_output": True,
        "return_logprob": True,
    }
    events = sse_events(client.post("/generate", json=body).text)
    assert events[-1] == "[DONE]"
    pieces = events[:-1]
    assert "".join(p["text"] for p in pieces) == whole["text"]
    assert sum(len(p["output_ids"]) for p in pieces) == 8
    lengths = [p["meta_info"]["output_token_logprobs_length"] for p in pieces]
    assert lengths == sorted(lengths) and lengths[-1] == 8
    assert sum(len(p["meta_info"]["output_token_logprobs"]) for p in pieces) == 8
    cumulative = sse_events(
        client.post("/generate", json={**body, "incremental_streaming_output": False}).text
    )
    assert cumulative[-2]["text"] == whole["text"]
    assert cumulative[-2]["meta_info"]["output_token_logprobs_length"] == 8


# ---- what a web page or a client may see ------------------------------------------------------


def test_server_info_names_device_and_dtype_and_no_paths(client, engine):
    info = client.get("/get_server_info").json()
    assert info["device"] == "cpu" and info["dtype"] == "float32"
    assert info["model"] == MODEL and "cache_dir" not in info
    assert str(engine.source.model_path) not in json.dumps(info)


def test_bearer_scheme_is_case_insensitive(engine):
    app = create_app(engine, ServerConfig(served_model_name=MODEL, api_key="sesame"))
    # Not entered: leaving a TestClient runs the app's shutdown, which would stop the
    # module's engine.
    c = TestClient(app)
    for scheme in ("Bearer", "bearer", "BEARER"):
        r = c.get("/v1/models", headers={"authorization": f"{scheme} sesame"})
        assert r.status_code == 200, scheme
    assert c.get("/v1/models", headers={"authorization": "Basic sesame"}).status_code == 401


def test_cors_only_for_the_origins_given(engine, client):
    preflight = {
        "origin": "http://example.test",
        "access-control-request-method": "POST",
        "access-control-request-headers": "content-type",
    }
    r = client.options("/generate", headers=preflight)
    assert "access-control-allow-origin" not in r.headers
    r = client.get("/v1/models", headers={"origin": "http://example.test"})
    assert "access-control-allow-origin" not in r.headers
    app = create_app(
        engine, ServerConfig(served_model_name=MODEL, allow_origins=("http://example.test",))
    )
    c = TestClient(app)  # not entered (see above)
    r = c.options("/generate", headers=preflight)
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "http://example.test"
    other = c.options("/generate", headers={**preflight, "origin": "http://evil.test"})
    assert "access-control-allow-origin" not in other.headers


# ---- metrics ------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_openai_streams_record_time_to_first_token(client, route):
    key = ("plait_time_to_first_token_seconds_count", ())
    before = _samples(client).get(key, 0)
    body = {"model": MODEL, "stream": True, "max_tokens": 3, "temperature": 0, "n": 2}
    if route.endswith("chat/completions"):
        body["messages"] = [{"role": "user", "content": "Hi"}]
    else:
        body["prompt"] = "Hi"
    events = sse_events(client.post(route, json=body).text)
    assert events[-1] == "[DONE]"
    assert _samples(client)[key] == before + 2


# ---- SGLang 0.5's GenerateReqInput -----------------------------------------------------------


def test_sglang_bookkeeping_fields_are_accepted(client):
    """Fields SGLang's clients and routers send that change nothing here."""
    body = {
        "text": "a",
        "sampling_params": {"max_new_tokens": 2},
        "session_id": "s-1",
        "routing_key": "k",
        "conversation_id": "c",
        "use_audio_in_video": False,
        "routed_experts_start_len": 0,
        "external_trace_header": {"traceparent": "00-x"},
        "return_logprob": None,
    }
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["meta_info"]["completion_tokens"] == 2


@pytest.mark.parametrize(
    "field,value",
    [
        ("watermark", {"key": 1}),
        ("return_prompt_token_ids", True),
        ("return_flat_raw_top_logprobs", True),
        ("routed_dp_rank", 0),
        ("require_reasoning", True),
        ("max_thinking_tokens", 10),
        ("token_indices_to_pool", [1]),
    ],
)
def test_sglang_fields_that_cannot_apply_are_400_by_name(client, field, value):
    error = assert_error(client.post("/generate", json={"text": "a", field: value}), 400, field)
    assert error["code"] == "unsupported_field"


@pytest.mark.parametrize(
    "field,value",
    [("mm_hashes", ["ab"]), ("video_config", {"fps": 1}), ("max_dynamic_patch", 4)],
)
def test_media_fields_on_a_text_model_are_400_naming_the_model(client, field, value):
    error = assert_error(client.post("/generate", json={"text": "a", field: value}), 400, field)
    assert error["code"] == "model_not_multimodal" and "'tiny' is text-only" in error["message"]


def test_engine_errors_name_generates_own_fields(client):
    error = assert_error(client.post("/generate", json={"text": []}), 400, "text")
    assert error["message"].startswith("text")


def test_a_served_model_name_cannot_be_a_path():
    for path in ("/root/models/x", "~/models/x", "./x", "..", "C:\\models\\x", "", " x"):
        with pytest.raises(ValueError, match="not a path"):
            ServerConfig(served_model_name=path)
    assert ServerConfig(served_model_name="HuggingFaceTB/SmolLM2-135M").served_model_name


def test_incremental_streaming_output_as_the_servers_default(engine):
    app = create_app(
        engine, ServerConfig(served_model_name=MODEL, incremental_streaming_output=True)
    )
    c = TestClient(app)  # not entered (see test_bearer_scheme_is_case_insensitive)
    body = {
        "text": PROMPTS[1],
        "sampling_params": {**GREEDY, "max_new_tokens": 6},
        "stream": True,
        "return_logprob": True,
    }
    pieces = sse_events(c.post("/generate", json=body).text)[:-1]
    assert [len(p["meta_info"]["output_token_logprobs"]) for p in pieces] == [
        len(p["output_ids"]) for p in pieces
    ]
    assert sum(len(p["output_ids"]) for p in pieces) == 6
    whole = sse_events(
        c.post("/generate", json={**body, "incremental_streaming_output": False}).text
    )[-2]
    assert "".join(p["text"] for p in pieces) == whole["text"]
    assert len(whole["meta_info"]["output_token_logprobs"]) == 6


# ---- profiling -------------------------------------------------------------------------------


def test_profiling_is_off_without_a_profile_dir(client):
    for method in ("GET", "POST"):
        error = assert_error(client.request(method, "/start_profile"), 400, None)
        assert error["code"] == "profiling_disabled" and "--profile-dir" in error["message"]
    assert_error(client.post("/stop_profile"), 400, None)


@pytest.fixture(scope="module")
def profiled(engine, tmp_path_factory):
    profile_dir = tmp_path_factory.mktemp("profiles")
    app = create_app(engine, ServerConfig(served_model_name=MODEL, profile_dir=str(profile_dir)))
    return TestClient(app), profile_dir  # not entered (see above)


def test_start_and_stop_profile_write_a_trace_of_the_forward_passes(profiled):
    c, profile_dir = profiled
    assert c.get("/start_profile").status_code == 200  # SGLang's client sends a GET
    assert_error(c.post("/start_profile"), 400, None)  # one at a time
    r = c.post("/generate", json={"text": "a", "sampling_params": {"max_new_tokens": 3}})
    assert r.status_code == 200
    r = c.get("/stop_profile")
    assert r.status_code == 200
    (trace,) = profile_dir.glob("*.trace.json")
    assert trace.name in r.text and str(profile_dir) not in r.text
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e.get("name", "").startswith("aten::") for e in events)
    assert_error(c.post("/stop_profile"), 400, None)  # nothing is recording now
    body = {"activities": ["CPU", "MEM"], "profile_id": "run-1", "profile_prefix": "plait"}
    assert c.post("/start_profile", json=body).status_code == 200
    assert c.post("/stop_profile").status_code == 200
    assert (profile_dir / "plait-run-1.trace.json").is_file()


@pytest.mark.parametrize(
    "body,param",
    [
        ({"output_dir": "/etc"}, "output_dir"),  # a client does not choose where files go
        ({"profile_id": "../../etc/x"}, "profile_id"),
        ({"profile_prefix": "a/b"}, "profile_prefix"),
        ({"num_steps": 5}, "num_steps"),
        ({"activities": ["GPU"]}, "activities"),  # a CPU server
        ({"activities": ["RPD"]}, "activities"),
        ({"unknown": 1}, "unknown"),
    ],
)
def test_profile_requests_that_cannot_apply_are_400(profiled, body, param):
    c, profile_dir = profiled
    assert_error(c.post("/start_profile", json=body), 400, param)
    assert not list(profile_dir.parent.glob("etc*"))
    assert_error(c.post("/stop_profile"), 400, None)  # none was started


def test_concate_and_append_request_is_acknowledged(client):
    body = {"src_rids": ["a", "b"], "dst_rid": "c"}
    r = client.post("/concate_and_append_request", json=body)
    assert r.status_code == 200 and r.json()["success"] is True
    assert_error(
        client.post("/concate_and_append_request", json={"src_rids": "a"}), 400, "src_rids"
    )


def test_plait_serve_names_a_model_dir_by_its_own_name(tmp_path, monkeypatch):
    from plait.runtime.cli import _model_name

    model = tmp_path / "MyModel-1B"
    model.mkdir()
    monkeypatch.chdir(model)
    for given in (str(model), f"{model}/", ".", "./"):
        assert _model_name(given) == "MyModel-1B"
        ServerConfig(served_model_name=_model_name(given))  # a name, not a path
    assert _model_name("smollm2") == "smollm2" and _model_name("/m/x.gguf") == "x"


def test_extra_key_and_cache_salt_keep_prefixes_apart(client, engine):
    """SGLang's extra_key and vLLM's cache_salt name a prefix-cache namespace, on the
    native and the OpenAI routes; giving both, or a bad shape, is a 400 by name."""
    text = "Only this tenant reuses this opening. " * 3
    body = {"text": text, "sampling_params": {**GREEDY, "max_new_tokens": 2}}

    def cached(**extra) -> int:
        r = client.post("/generate", json={**body, **extra})
        assert r.status_code == 200, r.text
        return r.json()["meta_info"]["cached_tokens"]

    assert cached(extra_key="a") == 0
    assert cached(extra_key="a") > 0
    assert cached(cache_salt="a") > 0  # the same namespace, by vLLM's name
    assert cached(extra_key="b") == 0
    chat = {
        "model": MODEL,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 2,
        "temperature": 0,
    }

    def chat_cached(**extra) -> int:
        r = client.post("/v1/chat/completions", json={**chat, **extra})
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    assert chat_cached(cache_salt="c") == 0
    assert chat_cached(cache_salt="c") > 0
    assert chat_cached(cache_salt="d") == 0
    assert_error(
        client.post("/generate", json={**body, "extra_key": "a", "cache_salt": "a"}),
        400,
        "cache_salt",
    )
    r = client.post("/generate", json={"text": [text, text], "extra_key": ["a"]})
    assert_error(r, 400, "extra_key")
    assert_kv_all_free(engine)
