"""The HTTP server's native (SGLang-shaped) routes, in process, on a tiny random model:
/generate gives exactly what ``Engine.generate`` gives (text, ids, batches,
constraints, logprobs, cumulative SSE), the info, health, flush, abort and
Prometheus routes report the engine's live state, and every kind of bad input is
a 4xx with an OpenAI-style error body naming the field, after which the server
keeps serving. Also the API key, the body size limit and 32 concurrent clients."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time

import httpx
import jsonschema
import pytest
from common import (
    GREEDY,
    MODEL,
    PERSON,
    PHONE,
    PROMPTS,
    assert_error,
    assert_kv_all_free,
    sse_events,
)
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from plait.runtime.server import ServerConfig, create_app


@pytest.fixture(scope="module")
def app(engine):
    return create_app(engine, ServerConfig(served_model_name=MODEL))


@pytest.fixture(scope="module")
def client(app) -> TestClient:
    # Entered, so that one event loop serves the whole module: the engine delivers an
    # aborted request's last result to its caller's loop, which must still be open
    # (a TestClient not entered runs each request on a loop of its own). Leaving it runs
    # the app's shutdown hook, which stops the engine at the end of the module.
    with TestClient(app) as c:
        yield c


def assert_still_serves(client: TestClient) -> None:
    r = client.post("/generate", json={"text": "a", "sampling_params": {"max_new_tokens": 2}})
    assert r.status_code == 200 and r.json()["meta_info"]["completion_tokens"] == 2


def same_result(http_out: dict, engine_out: dict) -> None:
    assert http_out["text"] == engine_out["text"]
    assert http_out["output_ids"] == engine_out["output_ids"]
    for key in ("prompt_tokens", "completion_tokens", "finish_reason"):
        assert http_out["meta_info"][key] == engine_out["meta_info"][key], key


def metric_samples(client: TestClient) -> dict:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


# ---- /generate ------------------------------------------------------------------------


def test_generate_text_equals_engine_greedy(client, engine):
    params = {**GREEDY, "max_new_tokens": 12}
    r = client.post("/generate", json={"text": PROMPTS[1], "sampling_params": params})
    assert r.status_code == 200
    out = r.json()
    same_result(out, engine.generate(PROMPTS[1], params))
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 12}
    assert out["meta_info"]["prompt_tokens"] == len(engine.tokenizer.encode(PROMPTS[1]))


def test_generate_input_ids_equals_text(client, engine):
    params = {**GREEDY, "max_new_tokens": 8}
    ids = engine.tokenizer.encode(PROMPTS[0])
    by_ids = client.post("/generate", json={"input_ids": ids, "sampling_params": params}).json()
    by_text = client.post("/generate", json={"text": PROMPTS[0], "sampling_params": params}).json()
    assert by_ids["output_ids"] == by_text["output_ids"] and by_ids["text"] == by_text["text"]


def test_generate_batch_of_texts_gives_one_result_per_prompt(client, engine):
    params = {**GREEDY, "max_new_tokens": 6}
    r = client.post("/generate", json={"text": PROMPTS, "sampling_params": params})
    outs = r.json()
    assert isinstance(outs, list) and len(outs) == len(PROMPTS)
    for out, prompt in zip(outs, PROMPTS, strict=True):
        same_result(out, engine.generate(prompt, params))


def test_generate_batch_of_input_id_lists_with_per_prompt_params(client, engine):
    ids = [engine.tokenizer.encode(p) for p in PROMPTS[:2]]
    params = [{**GREEDY, "max_new_tokens": 3}, {**GREEDY, "max_new_tokens": 5}]
    outs = client.post("/generate", json={"input_ids": ids, "sampling_params": params}).json()
    assert [len(o["output_ids"]) for o in outs] == [3, 5]
    for out, one, p in zip(outs, ids, params, strict=True):
        same_result(out, engine.generate(input_ids=one, sampling_params=p))


def test_generate_n_seeded_samples_equal_engine(client, engine):
    params = {"temperature": 1.0, "ignore_eos": True, "max_new_tokens": 8, "n": 3, "seed": 11}
    outs = client.post("/generate", json={"text": PROMPTS[0], "sampling_params": params}).json()
    ref = engine.generate(PROMPTS[0], params)
    assert [o["output_ids"] for o in outs] == [o["output_ids"] for o in ref]
    assert len({tuple(o["output_ids"]) for o in outs}) > 1


def test_generate_rid_names_the_result(client):
    out = client.post(
        "/generate", json={"text": "a", "rid": "my-rid", "sampling_params": {"max_new_tokens": 1}}
    ).json()
    assert out["meta_info"]["id"] == "my-rid"
    outs = client.post(
        "/generate",
        json={"text": ["a", "b"], "rid": ["r1", "r2"], "sampling_params": {"max_new_tokens": 1}},
    ).json()
    assert [o["meta_info"]["id"] for o in outs] == ["r1", "r2"]


def test_generate_regex_output_fullmatches(client):
    for params in [{"temperature": 0.0}, {"temperature": 1.0, "seed": 1}]:
        body = {"text": PROMPTS[1], "sampling_params": {**params, "regex": PHONE}}
        out = client.post("/generate", json=body).json()
        assert re.fullmatch(PHONE, out["text"]), out["text"]
        assert out["meta_info"]["finish_reason"]["type"] == "stop"


def test_generate_json_schema_output_validates(client):
    for schema in (PERSON, json.dumps(PERSON)):  # a dict or its JSON text
        body = {"text": PROMPTS[1], "sampling_params": {"temperature": 0, "json_schema": schema}}
        out = client.post("/generate", json=body).json()
        jsonschema.validate(json.loads(out["text"]), PERSON)


def test_generate_ebnf_output_matches_the_grammar(client):
    grammar = 'start: "(" num ("," num)* ")"\nnum: /[1-9][0-9]?/'
    body = {"text": PROMPTS[1], "sampling_params": {"temperature": 0, "ebnf": grammar}}
    out = client.post("/generate", json=body).json()
    assert re.fullmatch(r"\([1-9][0-9]?(,[1-9][0-9]?)*\)", out["text"]), out["text"]


def test_generate_logprobs_equal_engine(client, engine):
    kwargs = {
        "return_logprob": True,
        "logprob_start_len": 2,
        "top_logprobs_num": 3,
        "return_text_in_logprobs": True,
    }
    params = {**GREEDY, "max_new_tokens": 5}
    ids = engine.tokenizer.encode(PROMPTS[3])
    meta = client.post(
        "/generate", json={"input_ids": ids, "sampling_params": params, **kwargs}
    ).json()["meta_info"]
    ref = engine.generate(input_ids=ids, sampling_params=params, **kwargs)["meta_info"]
    assert [t for _, t, _ in meta["input_token_logprobs"]] == ids[2:]
    for key in ("input_token_logprobs", "output_token_logprobs"):
        assert len(meta[key]) == len(ref[key])
        for (lp, tok, text), (ref_lp, ref_tok, ref_text) in zip(meta[key], ref[key], strict=True):
            assert (tok, text) == (ref_tok, ref_text)
            assert lp == pytest.approx(ref_lp, abs=1e-4)
    for top, ref_top in zip(meta["output_top_logprobs"], ref["output_top_logprobs"], strict=True):
        assert len(top) == 3 and [t for _, t, _ in top] == [t for _, t, _ in ref_top]
        assert all(isinstance(text, str) for _, _, text in top)


def test_generate_without_text_in_logprobs_gives_null_texts(client):
    body = {"text": "a", "return_logprob": True, "sampling_params": {"max_new_tokens": 2}}
    meta = client.post("/generate", json=body).json()["meta_info"]
    assert len(meta["output_token_logprobs"]) == 2
    assert all(text is None for _, _, text in meta["output_token_logprobs"])


def test_generate_stream_is_cumulative_and_ends_with_done(client, engine):
    params = {**GREEDY, "max_new_tokens": 10}
    r = client.post(
        "/generate", json={"text": PROMPTS[0], "sampling_params": params, "stream": True}
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]" and len(events) >= 3
    chunks = events[:-1]
    for before, after in zip(chunks, chunks[1:]):
        assert after["text"].startswith(before["text"])
        assert after["output_ids"][: len(before["output_ids"])] == before["output_ids"]
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])
    same_result(chunks[-1], engine.generate(PROMPTS[0], params))


def test_generate_stream_logprobs_accumulate_to_the_full_result(client):
    body = {
        "text": PROMPTS[1],
        "sampling_params": {**GREEDY, "max_new_tokens": 6},
        "return_logprob": True,
        "logprob_start_len": 0,
        "top_logprobs_num": 2,
    }
    full = client.post("/generate", json=body).json()["meta_info"]
    last = sse_events(client.post("/generate", json={**body, "stream": True}).text)[-2]
    for key in ("input_token_logprobs", "output_token_logprobs", "output_top_logprobs"):
        assert len(last["meta_info"][key]) == len(full[key]), key
    assert [t for _, t, _ in last["meta_info"]["output_token_logprobs"]] == last["output_ids"]


def test_generate_stream_with_a_constraint_ends_in_a_match(client):
    body = {"text": "a", "stream": True, "sampling_params": {"temperature": 0, "regex": PHONE}}
    events = sse_events(client.post("/generate", json=body).text)
    assert re.fullmatch(PHONE, events[-2]["text"])


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]
)
def test_a_body_that_is_not_declared_json_is_415(client, content_type):
    """A web page can send these cross-origin without a CORS preflight: refusing them
    keeps any page the user visits from driving a local server."""
    body = json.dumps({"text": "a", "sampling_params": {"max_new_tokens": 2}})
    r = client.post("/generate", content=body, headers={"content-type": content_type})
    error = assert_error(r, 415, None)
    assert error["code"] == "unsupported_media_type" and "application/json" in error["message"]
    r = client.put("/generate", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 200 and r.json()["meta_info"]["completion_tokens"] == 2
    # A charset parameter is fine.
    r = client.post(
        "/generate", content=body, headers={"content-type": "application/json; charset=utf-8"}
    )
    assert r.status_code == 200


# ---- info, health, cache, abort -----------------------------------------------------------


def test_model_info_on_both_paths(client, engine, model_dir):
    info = client.get("/get_model_info").json()
    assert client.get("/model_info").json() == info
    # The served name, never the path of the weights on the server.
    assert info["model_path"] == "tiny" and info["tokenizer_path"] == "tiny"
    assert model_dir not in json.dumps(info)
    assert info["served_model_name"] == "tiny"
    assert info["architectures"] == ["LlamaForCausalLM"]
    assert info["context_length"] == 512 and info["vocab_size"] == 512
    assert info["is_generation"] is True and info["is_multimodal"] is False
    assert info["chat_template"] == {**engine.chat_template.to_dict(), "name": "tiny"}


def test_server_info_reports_live_stats(client, engine):
    before = client.get("/get_server_info").json()
    client.post("/generate", json={"text": "a", "sampling_params": {"max_new_tokens": 4}})
    after = client.get("/server_info").json()
    assert after["max_total_num_tokens"] == 8192 == after["max_total_tokens"]
    assert after["context_length"] == 512 and after["max_running_requests"] == 64
    assert after["served_model_name"] == "tiny" and after["uptime_s"] > 0
    stats, stats_before = after["internal_states"][0], before["internal_states"][0]
    assert set(stats) == set(engine.get_stats())
    assert stats["num_forward_passes"] >= stats_before["num_forward_passes"] + 4
    assert stats["num_running_reqs"] == 0 and stats["max_total_num_tokens"] == 8192


def test_health(client):
    r = client.get("/health")
    assert r.status_code == 200 and r.content == b""


def test_health_generate_runs_a_forward_pass(client, engine):
    before = engine.get_stats()["num_forward_passes"]
    assert client.get("/health_generate").status_code == 200
    assert engine.get_stats()["num_forward_passes"] > before


def test_flush_cache_frees_the_prefix_cache(client, engine):
    client.post("/generate", json={"text": PROMPTS[1], "sampling_params": {"max_new_tokens": 4}})
    assert engine.get_stats()["cache_tokens"] > 0
    r = client.post("/flush_cache")
    assert r.status_code == 200 and "flushed" in r.text.lower()
    stats = engine.get_stats()
    assert stats["cache_tokens"] == 0 and stats["kv_slots_used"] == 0
    assert client.get("/flush_cache").status_code == 200


def test_flush_cache_while_busy_is_400_and_abort_request_ends_the_request(client, engine):
    result: dict = {}
    body = {"text": "a", "rid": "long-one", "sampling_params": {**GREEDY, "max_new_tokens": 500}}

    def run() -> None:
        result["out"] = client.post("/generate", json=body).json()

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 10
    while engine.get_stats()["num_running_reqs"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    error = assert_error(client.post("/flush_cache"), 400, None)
    assert error["code"] == "busy" and "running" in error["message"]
    assert client.post("/abort_request", json={"rid": "long-one"}).status_code == 200
    worker.join(timeout=15)
    assert not worker.is_alive()
    out = result["out"]
    assert out["meta_info"]["id"] == "long-one"
    assert out["meta_info"]["finish_reason"]["type"] == "abort"
    assert len(out["output_ids"]) < 500
    assert_kv_all_free(engine)


def test_abort_of_an_unknown_rid_is_404(client):
    error = assert_error(client.post("/abort_request", json={"rid": "no-such-request"}), 404, "rid")
    assert error["code"] == "not_found" and "no-such-request" in error["message"]
    assert_still_serves(client)


# ---- /metrics ------------------------------------------------------------------------------


def test_metrics_counters_follow_requests(client, engine):
    before = metric_samples(client)
    prompt_tokens = len(engine.tokenizer.encode(PROMPTS[1]))
    client.post(
        "/generate", json={"text": PROMPTS[1], "sampling_params": {**GREEDY, "max_new_tokens": 5}}
    )
    after = metric_samples(client)

    def delta(name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("plait_generation_tokens_total") == 5
    assert delta("plait_prompt_tokens_total") == prompt_tokens
    assert delta("plait_requests_finished_total", reason="length") == 1
    assert delta("plait_http_requests_total", path="/generate", status="200") == 1
    assert delta("plait_e2e_request_latency_seconds_count") == 1
    assert delta("plait_http_request_duration_seconds_count", path="/generate") == 1
    stats = engine.get_stats()
    assert after[("plait_kv_slots_used", ())] + after[("plait_kv_slots_free", ())] == 8192
    assert after[("plait_num_running_reqs", ())] == 0
    assert after[("plait_cache_tokens", ())] == stats["cache_tokens"]


def test_metrics_stream_records_time_to_first_token(client):
    before = metric_samples(client)
    body = {"text": "a", "stream": True, "sampling_params": {"max_new_tokens": 3}}
    client.post("/generate", json=body)
    after = metric_samples(client)
    key = ("plait_time_to_first_token_seconds_count", ())
    assert after[key] == before.get(key, 0) + 1


def test_metrics_label_routes_by_template_not_raw_path(client):
    client.get("/v1/models/some-model-0")
    client.get("/v1/models/some-model-1")
    client.get("/no/such/route")
    paths = {dict(labels).get("path") for name, labels in metric_samples(client)}
    assert "/v1/models/{model:path}" in paths and "other" in paths
    assert not any(p and "some-model" in p for p in paths)


# ---- errors --------------------------------------------------------------------------------

LONG_IDS = [5] * 600  # the tiny model's context is 512 tokens


@pytest.mark.parametrize(
    "body,param",
    [
        ({"text": 5}, "text"),
        ({"input_ids": "abc"}, "input_ids"),
        ({"text": "a", "return_logprob": "maybe"}, "return_logprob"),
        ({"text": "a", "top_logprobs_num": -1}, "top_logprobs_num"),
        ({"text": "a", "sampling_params": "hot"}, "sampling_params"),
        ({"text": "a", "sampling_params": {"temperature": "hot"}}, "sampling_params.temperature"),
        ({"text": "a", "sampling_params": {"temperature": -1}}, "sampling_params.temperature"),
        ({"text": "a", "sampling_params": {"top_p": 2.0}}, "sampling_params.top_p"),
        ({"text": "a", "sampling_params": {"top_k": 0}}, "sampling_params.top_k"),
        (
            {"text": "a", "sampling_params": {"max_new_tokens": -1}},
            "sampling_params.max_new_tokens",
        ),
        ({"text": "a", "sampling_params": {"n": 0}}, "sampling_params.n"),
        ({"text": "a", "sampling_params": {"n": 10**6}}, "sampling_params.n"),
        ({"text": "a", "sampling_params": {"temprature": 0.5}}, "sampling_params.temprature"),
        (
            {"text": "a", "sampling_params": {"stop_token_ids": [10**6]}},
            "sampling_params.stop_token_ids",
        ),
        ({"text": "a", "sampling_params": {"regex": "(("}}, "regex"),
        ({"text": "a", "sampling_params": {"json_schema": "{not json"}}, "json_schema"),
        ({"text": "a", "sampling_params": {"json_schema": False}}, "json_schema"),
        (
            {"text": "a", "sampling_params": {"json_schema": {"type": "no-such-type"}}},
            "json_schema",
        ),
        ({"text": "a", "sampling_params": {"ebnf": 'start: "a" ('}}, "ebnf"),
        (
            {"text": "a", "sampling_params": {"regex": "a", "ebnf": 'start: "a"'}},
            "sampling_params.ebnf",
        ),
        ({"input_ids": LONG_IDS}, "input_ids"),
        ({"text": "x " * 600}, "input_ids"),
        ({"input_ids": [3, 10**6]}, "input_ids"),
        ({"input_ids": []}, "input_ids"),
        ({"text": []}, "text"),
        ({}, "text"),
        ({"text": "a", "input_ids": [1]}, "text"),
        ({"text": ["a", "b"], "stream": True}, "stream"),
        ({"text": ["a", "b"], "rid": ["only-one"]}, "rid"),
        ({"text": "a", "top_logprobs_num": 10**6, "return_logprob": True}, "top_logprobs_num"),
        ({"text": ["a"], "sampling_params": [{}, {}]}, "sampling_params"),
    ],
)
def test_generate_bad_input_is_400_naming_the_field(client, body, param):
    assert_error(client.post("/generate", json=body), 400, param)
    assert_still_serves(client)


def test_generate_stream_with_bad_input_is_a_plain_400(client):
    body = {"text": "a", "stream": True, "sampling_params": {"regex": "(("}}
    r = client.post("/generate", json=body)
    assert r.headers["content-type"].startswith("application/json")
    assert_error(r, 400, "regex")


@pytest.mark.parametrize("content", [b"{not json", b'{"text": "a",}', b"\xff\xfe", b"[1, 2"])
def test_malformed_json_body_is_400(client, content):
    r = client.post("/generate", content=content, headers={"content-type": "application/json"})
    error = assert_error(r, 400, None)
    assert "JSON" in error["message"]
    assert_still_serves(client)


@pytest.mark.parametrize("field", ["temperature", "top_p", "min_p", "frequency_penalty"])
def test_nan_sampling_value_is_400(client, field):
    content = b'{"text": "a", "sampling_params": {"%s": NaN}}' % field.encode()
    r = client.post("/generate", content=content, headers={"content-type": "application/json"})
    assert_error(r, 400, f"sampling_params.{field}")
    assert_still_serves(client)


@pytest.mark.parametrize("content", [b"", b"null", b"[1, 2]", b'"text"'])
def test_body_that_is_not_an_object_is_400(client, content):
    r = client.post("/generate", content=content, headers={"content-type": "application/json"})
    assert_error(r, 400, None)
    assert_still_serves(client)


def test_abort_request_without_rid_is_400(client):
    assert_error(client.post("/abort_request", json={}), 400, "rid")


def test_unknown_route_is_404_and_wrong_method_405(client):
    error = assert_error(client.get("/no/such/route"), 404, None)
    assert error["type"] == "not_found_error"
    assert_error(client.delete("/generate"), 405, None)


def test_bad_content_length_is_400(client):
    # Sent by hand: httpx would always write the true length.
    scope_app = client.app

    async def call() -> tuple[int, dict]:
        messages = []

        async def receive():
            return {"type": "http.request", "body": b"{}", "more_body": False}

        async def send(message):
            messages.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/generate",
            "raw_path": b"/generate",
            "query_string": b"",
            "root_path": "",
            "headers": [(b"content-length", b"abc"), (b"content-type", b"application/json")],
            "client": ("127.0.0.1", 1),
            "server": ("testserver", 80),
        }
        await scope_app(scope, receive, send)
        body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
        return messages[0]["status"], json.loads(body)

    status, body = asyncio.run(call())
    assert status == 400 and "Content-Length" in body["error"]["message"]


# ---- body size limit and API key ----------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded(engine) -> TestClient:
    app = create_app(engine, ServerConfig(api_key="sesame", max_request_bytes=2000))
    with TestClient(app) as c:  # entered: see the client fixture
        yield c


KEY = {"authorization": "Bearer sesame"}
JSON = {"content-type": "application/json"}


def test_body_over_the_size_limit_is_413(guarded):
    body = {"text": "a" * 3000, "sampling_params": {"max_new_tokens": 1}}
    error = assert_error(guarded.post("/generate", json=body, headers=KEY), 413, None)
    assert error["code"] == "request_too_large" and "2000" in error["message"]
    ok = {"text": "a", "sampling_params": {"max_new_tokens": 1}}
    assert guarded.post("/generate", json=ok, headers=KEY).status_code == 200


def test_chunked_body_over_the_size_limit_is_413(guarded):
    """A body sent without Content-Length is counted as it arrives."""

    def chunks(total: int):
        data = json.dumps({"text": "a" * total, "sampling_params": {"max_new_tokens": 1}}).encode()
        for i in range(0, len(data), 500):
            yield data[i : i + 500]

    r = guarded.post("/generate", content=chunks(3000), headers={**KEY, **JSON})
    assert "content-length" not in r.request.headers
    error = assert_error(r, 413, None)
    assert error["code"] == "request_too_large"
    r = guarded.post("/generate", content=chunks(100), headers={**KEY, **JSON})
    assert r.status_code == 200 and r.json()["meta_info"]["completion_tokens"] == 1


@pytest.mark.parametrize(
    "path,body",
    [
        ("/generate", {"text": "a" * 3000, "stream": True}),
        ("/v1/completions", {"model": "smollm2", "prompt": "a" * 3000}),
        ("/v1/completions", {"model": "smollm2", "prompt": "a" * 3000, "stream": True}),
        (
            "/v1/chat/completions",
            {"model": "smollm2", "messages": [{"role": "user", "content": "a" * 3000}]},
        ),
        (
            "/v1/chat/completions",
            {
                "model": "smollm2",
                "stream": True,
                "messages": [{"role": "user", "content": "a" * 3000}],
            },
        ),
    ],
)
@pytest.mark.parametrize("chunked", [False, True])
def test_every_route_and_stream_refuses_a_body_over_the_limit(guarded, path, body, chunked):
    data = json.dumps(body).encode()
    content = iter([data[:1000], data[1000:]]) if chunked else data
    r = guarded.post(path, content=content, headers={**KEY, **JSON})
    assert ("content-length" in r.request.headers) is not chunked
    assert assert_error(r, 413, None)["code"] == "request_too_large"


@pytest.mark.parametrize(
    "headers", [{}, {"authorization": "Bearer wrong"}, {"authorization": "sesame"}]
)
def test_missing_or_wrong_api_key_is_401(guarded, headers):
    for method, path in [("POST", "/generate"), ("GET", "/v1/models"), ("GET", "/metrics")]:
        r = guarded.request(method, path, json={"text": "a"}, headers=headers)
        error = assert_error(r, 401, None)
        assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key"
    assert guarded.get("/health").status_code == 200  # open for load balancers
    assert guarded.get("/v1/models", headers=KEY).status_code == 200


# ---- concurrency ---------------------------------------------------------------------------


def test_32_concurrent_clients_get_the_sequential_results(app, engine):
    prompts = [f"{PROMPTS[i % len(PROMPTS)]} {i}" for i in range(32)]
    params = {**GREEDY, "max_new_tokens": 8}
    expected = [engine.generate(p, params)["output_ids"] for p in prompts]
    engine.flush_cache()

    async def run() -> list[dict]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            responses = await asyncio.gather(
                *(c.post("/generate", json={"text": p, "sampling_params": params}) for p in prompts)
            )
        assert all(r.status_code == 200 for r in responses)
        return [r.json() for r in responses]

    outs = asyncio.run(run())
    assert [o["output_ids"] for o in outs] == expected
    assert_kv_all_free(engine)
