"""The HTTP server over a real socket (uvicorn in a thread) and as the ``plait serve``
command: a client that disconnects mid-stream or while waiting aborts its request
and its KV comes back; 32 parallel clients get the sequential greedy results; the
official ``openai`` client works against it; and ``python -m plait serve`` starts,
serves, and exits cleanly on SIGTERM."""

from __future__ import annotations

import gc
import http.client
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest
import uvicorn
from common import GREEDY, MODEL, PERSON, assert_kv_all_free, wait_idle
from http_server import free_port
from prometheus_client.parser import text_string_to_metric_families

from plait.runtime.server import ServerConfig, create_app

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
LONG = 400  # tokens a request would generate if it were not aborted


@pytest.fixture(scope="module")
def base_url(engine):
    """The app served by uvicorn on a free port, in a background thread."""
    app = create_app(engine, ServerConfig(served_model_name=MODEL))
    port = free_port()
    # lifespan off: the engine fixture, not the server, shuts the engine down.
    # log_config None: uvicorn's errors reach the root logger (and caplog).
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", lifespan="off", log_config=None
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def oai(base_url) -> openai.OpenAI:
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0) as client:
        yield client


def aborted_count(base_url: str) -> float:
    """The server's finished-requests counter for aborts."""
    text = httpx.get(f"{base_url}/metrics").text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "plait_requests_finished_total" and s.labels == {"reason": "abort"}:
                return s.value
    return 0.0


def wait_aborted(base_url: str, expected: float, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while aborted_count(base_url) != expected:
        assert time.monotonic() < deadline, (aborted_count(base_url), expected)
        time.sleep(0.05)


def assert_no_errors_logged(caplog) -> None:
    gc.collect()  # an unawaited task's error is logged when it is collected
    time.sleep(0.1)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


# ---- disconnects -----------------------------------------------------------------------------

STREAMS = {
    "generate": (
        "/generate",
        {"text": "Hello", "sampling_params": {**GREEDY, "max_new_tokens": LONG}},
    ),
    "completions": ("/v1/completions", {"prompt": "Hello", "max_tokens": LONG, **GREEDY}),
    "completions-n3": (
        "/v1/completions",
        {"prompt": "Hello", "max_tokens": LONG, "n": 3, **GREEDY},
    ),
    "chat": ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": LONG, **GREEDY}),
    "chat-n2": (
        "/v1/chat/completions",
        {"messages": MESSAGES, "max_tokens": LONG, "n": 2, **GREEDY},
    ),
}


def _model(path: str) -> dict:
    """OpenAI routes name the model; SGLang's native /generate has no such field."""
    return {"model": MODEL} if path.startswith("/v1/") else {}


# How many requests each body makes (choices x prompts).
OUTPUTS = {"generate": 1, "completions": 1, "completions-n3": 3, "chat": 1, "chat-n2": 2}


@pytest.mark.parametrize("route", list(STREAMS))
def test_disconnect_mid_stream_aborts_and_frees_kv(base_url, engine, caplog, route):
    path, body = STREAMS[route]
    assert engine.flush_cache()
    aborted = aborted_count(base_url)
    passes = engine.get_stats()["num_forward_passes"]
    with (
        httpx.Client(base_url=base_url, timeout=30) as client,
        client.stream("POST", path, json={**_model(path), "stream": True, **body}) as r,
    ):
        assert r.status_code == 200
        events = []
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: ") :]))
            if len(events) == 2:
                break
    # The connection is closed here, long before LONG tokens: had the request run to
    # its end, it would have taken at least LONG forward passes.
    wait_idle(engine)
    assert engine.get_stats()["num_forward_passes"] - passes < LONG
    assert_kv_all_free(engine)
    wait_aborted(base_url, aborted + OUTPUTS[route])  # counted as finished by abort
    assert_no_errors_logged(caplog)


@pytest.mark.parametrize(
    "path,body",
    [
        ("/generate", {"text": "Hello", "sampling_params": {**GREEDY, "max_new_tokens": LONG}}),
        ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": LONG, "n": 2, **GREEDY}),
        ("/v1/completions", {"prompt": ["Hello", "Hi"], "max_tokens": LONG, **GREEDY}),
    ],
    ids=["generate", "chat-n2", "completions-batch"],
)
def test_disconnect_while_waiting_aborts_and_frees_kv(base_url, engine, caplog, path, body):
    assert engine.flush_cache()
    aborted = aborted_count(base_url)
    passes = engine.get_stats()["num_forward_passes"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(base_url + path, json={**_model(path), **body}, timeout=0.5)
    wait_idle(engine)
    assert engine.get_stats()["num_forward_passes"] - passes < LONG
    assert_kv_all_free(engine)
    wait_aborted(base_url, aborted + (1 if path == "/generate" else 2))
    assert_no_errors_logged(caplog)


# ---- keep-alive ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path,body",
    [
        ("/generate", b'{"text": "abc \\ud800"}'),
        ("/generate", b'{"text": "a", "sampling_params": {"stop": ["\\udfff"]}}'),
        (
            "/v1/chat/completions",
            b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}',
        ),
        ("/generate", b'{"text": "a", "sampling_params": {"max_new_tokens": 2}, "lora_path": "x"}'),
    ],
)
def test_a_refused_request_keeps_the_connection_alive(base_url, path, body):
    """A 400, not a 500 that closes the connection: the next request goes out on the
    same socket."""
    conn = http.client.HTTPConnection(base_url.removeprefix("http://"), timeout=30)
    try:
        conn.request("POST", path, body=body, headers={"content-type": "application/json"})
        r = conn.getresponse()
        error = json.loads(r.read())["error"]
        assert r.status == 400 and r.getheader("connection") != "close", error
        sock = conn.sock
        assert sock is not None  # not closed after the error
        ok = json.dumps({"text": "a", "sampling_params": {"max_new_tokens": 2}})
        conn.request("POST", "/generate", body=ok, headers={"content-type": "application/json"})
        r = conn.getresponse()
        assert r.status == 200 and json.loads(r.read())["meta_info"]["completion_tokens"] == 2
        assert conn.sock is sock
    finally:
        conn.close()


# ---- concurrency ---------------------------------------------------------------------------


def test_32_parallel_clients_get_the_sequential_greedy_results(base_url, engine):
    prompts = [f"Question {i}: what is {i} plus {i}?" for i in range(32)]
    params = {**GREEDY, "max_new_tokens": 12}
    expected = []
    for i, p in enumerate(prompts):
        prompt = engine.apply_chat_template([{"role": "user", "content": p}]) if i % 2 else p
        expected.append(engine.generate(prompt, params)["text"])
    engine.flush_cache()

    def one(i: int) -> str:
        if i % 2:  # odd clients chat, even ones use the native API
            body = {"model": MODEL, "messages": [{"role": "user", "content": prompts[i]}]}
            r = httpx.post(
                f"{base_url}/v1/chat/completions",
                json={**body, "max_tokens": 12, **GREEDY},
                timeout=60,
            )
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["message"]["content"]
        r = httpx.post(
            f"{base_url}/generate", json={"text": prompts[i], "sampling_params": params}, timeout=60
        )
        assert r.status_code == 200, r.text
        return r.json()["text"]

    with ThreadPoolExecutor(max_workers=32) as pool:
        results = list(pool.map(one, range(32)))
    assert results == expected
    assert_kv_all_free(engine)


# ---- the official openai client -----------------------------------------------------------------


def test_openai_client_lists_and_retrieves_models(oai, model_dir):
    models = oai.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert oai.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("gpt-4")


def test_openai_client_chat_equals_engine(oai, engine):
    out = oai.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0)
    prompt = engine.apply_chat_template(MESSAGES)
    ref = engine.generate(prompt, {"temperature": 0, "max_new_tokens": 8})
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == ref["text"]
    assert out.usage.prompt_tokens == len(engine.tokenizer.encode(prompt))
    assert out.usage.completion_tokens == len(ref["output_ids"])


def test_openai_client_completion_equals_engine(oai, engine):
    out = oai.completions.create(
        model=MODEL, prompt="The quick brown fox", max_tokens=8, temperature=0
    )
    ref = engine.generate("The quick brown fox", {"temperature": 0, "max_new_tokens": 8})
    assert out.choices[0].text == ref["text"]
    assert out.usage.completion_tokens == len(ref["output_ids"])


def test_openai_client_chat_stream_adds_up_to_the_greedy_text(oai):
    kwargs = {"model": MODEL, "messages": MESSAGES, "max_tokens": 10, "temperature": 0}
    full = oai.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(
        oai.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_openai_client_completion_stream_adds_up_to_the_greedy_text(oai):
    kwargs = {"model": MODEL, "prompt": "Hello", "max_tokens": 10, "temperature": 0}
    full = oai.completions.create(**kwargs).choices[0].text
    assert "".join(c.choices[0].text for c in oai.completions.create(**kwargs, stream=True)) == full


def test_openai_client_response_format_json_schema_validates(oai):
    out = oai.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=64,
        temperature=0,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": PERSON},
        },
    )
    jsonschema.validate(json.loads(out.choices[0].message.content), PERSON)


def test_openai_client_logprobs_and_n(oai):
    out = oai.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=4, n=2, seed=3, logprobs=True, top_logprobs=2
    )
    assert len(out.choices) == 2
    for choice in out.choices:
        assert len(choice.logprobs.content) == 4
        assert all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)


def test_openai_client_sees_errors_with_their_param(oai):
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=-1)
    assert info.value.param == "temperature" and "temperature" in info.value.message
    with pytest.raises(openai.NotFoundError) as info:
        oai.chat.completions.create(model="gpt-4", messages=MESSAGES)
    assert info.value.code == "model_not_found"


# ---- plait serve --------------------------------------------------------------------------------


def test_plait_serve_command_serves_and_exits_on_sigterm(model_dir, engine, tmp_path):
    port = free_port()
    log = open(tmp_path / "serve.log", "w+")  # noqa: SIM115 (read back after the process ends)
    proc = subprocess.Popen(
        [sys.executable, "-m", "plait", "serve", "--model", model_dir, "--port", str(port)]
        + ["--max-total-tokens", "4096", "--served-model-name", MODEL],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, "plait serve exited early"
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "plait serve did not come up"
            time.sleep(0.2)

        params = {"temperature": 0, "max_new_tokens": 8}
        out = httpx.post(
            f"{base}/generate", json={"text": "Hello", "sampling_params": params}, timeout=60
        )
        assert out.status_code == 200
        assert out.json()["output_ids"] == engine.generate("Hello", params)["output_ids"]
        chat = httpx.post(
            f"{base}/v1/chat/completions",
            json={"model": MODEL, "messages": MESSAGES, "max_tokens": 4, "temperature": 0},
            timeout=60,
        )
        assert chat.status_code == 200
        assert chat.json()["usage"]["completion_tokens"] <= 4
        assert httpx.get(f"{base}/get_model_info").json()["served_model_name"] == MODEL

        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log.seek(0)
    output = log.read()
    log.close()
    assert code in (0, -signal.SIGTERM), output
    assert "Traceback" not in output, output
