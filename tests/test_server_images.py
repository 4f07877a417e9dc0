"""Images over HTTP on the tiny Idefics3: native ``/generate`` ``image_data`` and OpenAI
chat ``image_url`` parts give the in-process engine's greedy ids (the engine is checked
against transformers in test_vlm_idefics3.py); the server's media rules (local files,
URLs from a real server on 127.0.0.1, byte limit, host list, timeout); and bad images,
each a 400 naming the field, after which the server still serves and holds no KV."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import jsonschema
import pytest
from common import ERROR_KEYS, GREEDY, PERSON, assert_kv_all_free, sse_events
from fastapi.testclient import TestClient
from http_server import free_port
from pictures import (
    SQUARE,
    TALL,
    WIDE,
    ask,
    b64,
    bomb_png,
    data_url,
    picture,
    picture_server,
    png,
)

import plait
from plait.runtime.server import ServerConfig, create_app

N = 8  # new tokens per request
MODEL = "tiny-vlm"


BIG = picture(200, 200, 4)  # a PNG of ~120 kB: over the guarded server's byte limit
LIMIT = 50_000  # the guarded server's --max-media-bytes


def sampling(**extra) -> dict:
    return {**GREEDY, "max_new_tokens": N, **extra}


# ---- servers -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def web():
    """The base URL of a picture server on 127.0.0.1 (``/slow.png`` answers in 3 s)."""
    routes = {"/wide.png": png(WIDE), "/tall.png": png(TALL), "/big.png": png(BIG)}
    routes["/slow.png"] = png(SQUARE)
    with picture_server(routes, delays={"/slow.png": 3}) as url:
        yield url


# Fetches go straight to 127.0.0.1, whatever proxy the environment names.
pytestmark = pytest.mark.usefixtures("no_proxy")


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    """(allowed directory, a picture inside it, a picture outside it)."""
    root = tmp_path_factory.mktemp("media")
    allowed = root / "allowed"
    allowed.mkdir()
    WIDE.save(allowed / "wide.png")
    TALL.save(root / "secret.png")
    return allowed, allowed / "wide.png", root / "secret.png"


@pytest.fixture(scope="module")
def engine(idefics3_dir):
    with plait.Engine(model=idefics3_dir, max_total_tokens=2048, max_running_requests=8) as eng:
        yield eng


@pytest.fixture(scope="module")
def servers(engine, media_dir):
    """Clients of three servers on the one engine: ``open`` (the defaults: no local
    file, any host), ``guarded`` (files under the media directory, a byte limit, a 1 s
    fetch timeout) and ``listed`` (only the host example.com). Entered, so one event
    loop serves each; the engine stops when the module's last one closes."""
    configs = {
        "open": ServerConfig(served_model_name=MODEL),
        "guarded": ServerConfig(
            served_model_name=MODEL,
            allowed_local_media_path=str(media_dir[0]),
            max_media_bytes=LIMIT,
            media_fetch_timeout_s=1.0,
        ),
        "listed": ServerConfig(served_model_name=MODEL, allowed_media_domains=("example.com",)),
    }
    with contextlib.ExitStack() as stack:
        yield {
            name: stack.enter_context(TestClient(create_app(engine, config)))
            for name, config in configs.items()
        }


@pytest.fixture(scope="module")
def client(servers) -> TestClient:
    return servers["open"]


def generate(client: TestClient, text, image_data, **extra):
    body = {"text": text, "sampling_params": sampling(), "image_data": image_data, **extra}
    return client.post("/generate", json=body)


def chat(client: TestClient, content: list, **extra):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": N,
        "temperature": 0,
        **extra,
    }
    return client.post("/v1/chat/completions", json=body)


def assert_refused(response, param: str, *words: str) -> dict:
    """A 400 with an OpenAI-style error body naming ``param`` and saying ``words``."""
    assert response.status_code == 400, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    assert body["error"]["param"] == param, body
    for word in words:
        assert word in body["error"]["message"], body
    return body["error"]


def assert_fine(client: TestClient, engine) -> None:
    """The server still serves, and no request holds KV."""
    assert client.get("/health").status_code == 200
    assert_kv_all_free(engine)


# ---- model info --------------------------------------------------------------------------------


def test_model_info_says_the_model_understands_images(client):
    info = client.get("/get_model_info").json()
    assert info["has_image_understanding"] is True
    assert info["is_multimodal"] is True
    assert info["has_audio_understanding"] is False
    assert info["architectures"] == ["Idefics3ForConditionalGeneration"]
    template = info["chat_template"]
    assert template["content_parts"] is True and template["image_token"] == "<image>"


def test_a_text_model_says_it_does_not(tiny_model_dir):
    with (
        plait.Engine(model=tiny_model_dir("llama"), max_total_tokens=256) as eng,
        TestClient(create_app(eng, ServerConfig(served_model_name="text-only"))) as c,
    ):
        info = c.get("/get_model_info").json()
        assert info["has_image_understanding"] is False and info["is_multimodal"] is False
        r = c.post("/generate", json={"text": "<image>Look", "image_data": b64(png(WIDE))})
        error = assert_refused(r, "image_data", "'text-only'", "text-only")
        assert error["code"] == "model_not_multimodal"
        r = c.post(
            "/v1/chat/completions",
            json={
                "model": "text-only",
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "Look"},
                            {"type": "image_url", "image_url": {"url": data_url(png(WIDE))}},
                        ],
                    }
                ],
            },
        )
        assert_refused(r, "messages.0.content.1", "'text-only'", "vision-language")
        assert c.get("/health").status_code == 200
        assert_kv_all_free(eng)


# ---- native /generate --------------------------------------------------------------------------


def test_native_generate_with_two_images_equals_the_engine(client, engine):
    prompt = ask("<image>", "and", "<image>", "Which is taller?")
    r = generate(client, prompt, [b64(png(TALL)), data_url(png(SQUARE))])
    assert r.status_code == 200, r.text
    expected = engine.generate(prompt, sampling(), image_data=[TALL, SQUARE])
    assert r.json()["output_ids"] == expected["output_ids"]
    assert r.json()["meta_info"]["prompt_tokens"] == expected["meta_info"]["prompt_tokens"]


def test_native_generate_takes_one_image_and_a_batch_of_lists(client, engine):
    one = ask("<image>", "What is in the picture?")
    r = generate(client, one, b64(png(WIDE)))
    assert r.status_code == 200, r.text
    assert r.json()["output_ids"] == engine.generate(one, sampling(), image_data=WIDE)["output_ids"]
    prompts = [ask("Hello, how are you?"), one, ask("First", "<image>", "then", "<image>")]
    wire = [None, data_url(png(WIDE)), [b64(png(SQUARE)), b64(png(TALL))]]
    r = generate(client, prompts, wire)
    assert r.status_code == 200, r.text
    expected = engine.generate(prompts, sampling(), image_data=[None, WIDE, [SQUARE, TALL]])
    assert [o["output_ids"] for o in r.json()] == [o["output_ids"] for o in expected]


def test_native_stream_with_images(client, engine):
    prompt = ask("<image>", "and", "<image>")
    r = generate(client, prompt, [b64(png(WIDE)), b64(png(TALL))], stream=True)
    assert r.status_code == 200, r.text
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    expected = engine.generate(prompt, sampling(), image_data=[WIDE, TALL])
    assert events[-2]["output_ids"] == expected["output_ids"]
    assert events[-2]["text"] == expected["text"]


# ---- OpenAI chat -------------------------------------------------------------------------------


def chat_content(web: str) -> list:
    return [
        {"type": "text", "text": "Compare"},
        {"type": "image_url", "image_url": {"url": data_url(png(SQUARE)), "detail": "low"}},
        {"type": "text", "text": "with"},
        {"type": "image_url", "image_url": {"url": f"{web}/tall.png", "detail": "high"}},
    ]


def engine_chat(engine, images: list, **params) -> dict:
    """The engine's greedy result on the chat template's rendering of ``chat_content``."""
    content = [
        {"type": "text", "text": "Compare"},
        {"type": "image"},
        {"type": "text", "text": "with"},
        {"type": "image"},
    ]
    prompt = engine.apply_chat_template([{"role": "user", "content": content}])
    assert prompt == "<|im_start|>User: Compare<image>with<image><end_of_utterance>\nAssistant:"
    return engine.generate(
        prompt, {"temperature": 0, "max_new_tokens": N, **params}, image_data=images
    )


def test_chat_with_two_images_equals_the_engine(client, engine, web):
    r = chat(client, chat_content(web))
    assert r.status_code == 200, r.text
    body = r.json()
    expected = engine_chat(engine, [SQUARE, TALL])
    assert body["choices"][0]["message"]["content"] == expected["text"]
    assert body["usage"]["prompt_tokens"] == expected["meta_info"]["prompt_tokens"]
    assert body["usage"]["completion_tokens"] == expected["meta_info"]["completion_tokens"]


def test_chat_stream_with_images(client, engine, web):
    r = chat(client, chat_content(web), stream=True)
    assert r.status_code == 200, r.text
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert text == engine_chat(engine, [SQUARE, TALL])["text"]


def test_chat_response_format_with_an_image_gives_valid_json(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    content = [
        {"type": "image_url", "image_url": {"url": data_url(png(WIDE))}},
        {"type": "text", "text": "Who is it?"},
    ]
    r = chat(client, content, response_format=fmt, max_tokens=64)
    assert r.status_code == 200, r.text
    jsonschema.validate(json.loads(r.json()["choices"][0]["message"]["content"]), PERSON)


def test_chat_string_content_reaches_a_template_of_parts(client, engine):
    """The template renders text only from parts: string content is sent as one."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hello there"}],
        "max_tokens": N,
        "temperature": 0,
    }
    r = client.post("/v1/chat/completions", json=body)
    prompt = "<|im_start|>User: Hello there<end_of_utterance>\nAssistant:"
    expected = engine.generate(prompt, {"temperature": 0, "max_new_tokens": N})
    assert r.json()["choices"][0]["message"]["content"] == expected["text"]


def test_chat_continues_an_assistant_message_that_holds_an_image(client, engine):
    body = {
        "model": MODEL,
        "messages": [
            {"role": "user", "content": "Draw something."},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Here:"},
                    {"type": "image_url", "image_url": {"url": data_url(png(TALL))}},
                ],
            },
        ],
        "continue_final_message": True,
        "max_tokens": N,
        "temperature": 0,
    }
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    prompt = "<|im_start|>User: Draw something.<end_of_utterance>\nAssistant:Here:<image>"
    expected = engine.generate(prompt, {"temperature": 0, "max_new_tokens": N}, image_data=TALL)
    assert r.json()["choices"][0]["message"]["content"] == expected["text"]


# ---- the media rules ---------------------------------------------------------------------------


def test_a_local_path_needs_the_flag_and_must_lie_inside_the_directory(servers, engine, media_dir):
    allowed, inside, outside = media_dir
    prompt = ask("<image>", "What is in the picture?")
    r = generate(servers["open"], prompt, [str(inside)])
    assert_refused(r, "image_data[0]", "reads no local files", "--allowed-local-media-path")
    r = generate(servers["guarded"], prompt, [str(outside)])
    assert_refused(r, "image_data[0]", "outside the allowed local media directory")
    r = generate(servers["guarded"], prompt, [str(allowed / ".." / "secret.png")])
    assert_refused(r, "image_data[0]", "outside the allowed local media directory")
    expected = engine.generate(prompt, sampling(), image_data=WIDE)["output_ids"]
    for source in (str(inside), "wide.png"):  # relative paths are taken from the directory
        r = generate(servers["guarded"], prompt, [source])
        assert r.status_code == 200, r.text
        assert r.json()["output_ids"] == expected
    assert_fine(servers["guarded"], engine)


def test_file_urls_are_refused_everywhere(servers, engine, media_dir):
    """A file URL never reaches the file system, even inside the allowed directory (the
    same file as a plain path is read there)."""
    _, inside, outside = media_dir
    r = generate(servers["open"], ask("<image>"), [f"file://{inside}"])
    assert_refused(r, "image_data[0]", "file://", "scheme is not accepted")
    content = [{"type": "image_url", "image_url": {"url": f"file://{inside}"}}]
    r = chat(servers["open"], content)
    assert_refused(r, "messages.0.content.0.image_url", "scheme is not accepted")
    for path in (inside, outside):
        r = generate(servers["guarded"], ask("<image>"), [f"file://{path}"])
        assert_refused(r, "image_data[0]", "scheme is not accepted")
    r = generate(servers["guarded"], ask("<image>"), [str(inside)])
    assert r.status_code == 200, r.text
    assert_fine(servers["guarded"], engine)


def test_a_url_over_the_byte_limit_is_refused(servers, engine, web):
    assert len(png(BIG)) > LIMIT
    r = generate(
        servers["guarded"], ask("<image>", "<image>"), [f"{web}/wide.png", f"{web}/big.png"]
    )
    assert_refused(r, "image_data[1]", f"{web}/big.png", str(LIMIT))
    content = [{"type": "image_url", "image_url": {"url": f"{web}/big.png"}}]
    assert_refused(chat(servers["guarded"], content), "messages.0.content.0.image_url", "limit")
    for source in (b64(png(BIG)), data_url(png(BIG))):  # sent inline: the same limit
        r = generate(servers["guarded"], ask("<image>"), source)
        assert_refused(r, "image_data", f"more than {LIMIT} bytes")
    assert_fine(servers["guarded"], engine)


def test_a_host_outside_the_allowed_domains_is_refused(servers, engine, web):
    r = generate(servers["listed"], ask("<image>"), f"{web}/wide.png")
    assert_refused(r, "image_data", "'127.0.0.1' is not in the server's allowed media domains")
    assert_fine(servers["listed"], engine)


def test_an_unreachable_url_is_refused(servers, engine, web):
    start = time.monotonic()
    r = generate(servers["guarded"], ask("<image>"), [f"{web}/slow.png"])
    assert_refused(r, "image_data[0]", "timed out", "1s")
    assert 1.0 <= time.monotonic() - start < 3.0  # after the timeout, not the whole wait
    closed = f"http://127.0.0.1:{free_port()}/wide.png"  # nothing listens there
    assert_refused(
        generate(servers["open"], ask("<image>"), [closed]), "image_data[0]", "unreachable"
    )
    assert_refused(
        generate(servers["guarded"], ask("<image>"), [f"{web}/missing.png"]),
        "image_data[0]",
        "HTTP 404",
    )
    assert_fine(servers["guarded"], engine)


# ---- bad images --------------------------------------------------------------------------------


def test_bytes_that_are_not_an_image_are_refused(client, engine):
    r = generate(client, ask("<image>", "<image>"), [b64(png(WIDE)), b64(b"not an image at all")])
    assert_refused(r, "image_data[1]", "not a readable image")
    content = [{"type": "image_url", "image_url": {"url": data_url(b"hello")}}]
    assert_refused(chat(client, content), "messages.0.content.0.image_url", "not a readable image")
    assert_fine(client, engine)


def test_a_truncated_png_is_refused(client, engine):
    r = generate(client, ask("<image>"), data_url(png(BIG)[:-100]))
    assert_refused(r, "image_data", "not a readable image")
    assert_fine(client, engine)


def test_a_decompression_bomb_is_refused(client, engine):
    r = generate(client, [ask("a"), ask("<image>")], [None, [b64(bomb_png())]])
    assert_refused(r, "image_data[1][0]", "decompression bomb")
    assert_fine(client, engine)


def test_images_and_placeholders_must_match(client, engine):
    r = generate(client, ask("<image>", "two?"), [b64(png(WIDE)), b64(png(TALL))])
    assert_refused(r, "image_data", "1 '<image>' placeholders for 2 images")
    r = generate(client, ask("<image>", "<image>"), [b64(png(WIDE))])
    assert_refused(r, "image_data", "2 '<image>' placeholders for 1 images")
    r = generate(client, [ask("a"), ask("b")], [None, b64(png(WIDE))])
    assert_refused(r, "image_data[1]", "placeholders")
    assert_fine(client, engine)


def test_image_tokens_past_the_context_are_refused(client, engine):
    """Thirty images of a few words' text expand past the 512-token context."""
    prompt = ask(*["<image>"] * 30)
    r = generate(client, prompt, [b64(png(WIDE))] * 30)
    assert_refused(r, "input_ids", "longer than the context length (512 tokens)")
    content = [{"type": "image_url", "image_url": {"url": data_url(png(WIDE))}}] * 30
    assert_refused(chat(client, content), "messages", "longer than the context length")
    assert_fine(client, engine)


def test_other_media_fields_and_bad_shapes_are_refused(client, engine):
    r = client.post("/generate", json={"text": ask("<image>"), "video_data": "x"})
    assert_refused(r, "video_data", "takes images only")
    r = generate(client, [ask("<image>"), ask("<image>")], b64(png(WIDE)))
    assert_refused(r, "image_data", "one entry per prompt")
    r = generate(client, ask("<image>"), [{"url": "x"}])
    assert_refused(r, "image_data[0]", "type dict")
    assert_refused(
        chat(client, [{"type": "image_url", "image_url": {}}]),
        "messages.0.content.0.image_url",
        "image_url.url",
    )
    assert_fine(client, engine)


# ---- plait serve -------------------------------------------------------------------------------


@plait.function
def describe_two(s, first, second):
    s += plait.user(plait.image(first) + "and" + plait.image(second) + "Which is taller?")
    s += plait.assistant(plait.gen("answer", max_tokens=N, ignore_eos=True))


def test_plait_serve_takes_the_media_flags_and_images_from_runtime_endpoint(
    idefics3_dir, engine, media_dir, tmp_path
):
    """``plait serve`` on the VLM with --allowed-local-media-path and --max-media-bytes:
    a program through RuntimeEndpoint (two images, sent as base64) and a /generate
    naming a local file give the engine's results; a file outside the directory and an
    image over the byte limit are refused."""
    allowed, inside, outside = media_dir
    port = free_port()
    log = open(tmp_path / "serve.log", "w+")  # noqa: SIM115 (read back on failure)
    cmd = [sys.executable, "-m", "plait", "serve", "--model", idefics3_dir, "--port", str(port)]
    cmd += ["--max-total-tokens", "2048", "--served-model-name", MODEL]
    cmd += ["--allowed-local-media-path", str(allowed), "--max-media-bytes", str(LIMIT)]
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            log.seek(0)
            assert proc.poll() is None, f"plait serve exited early: {log.read()[-2000:]}"
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "plait serve did not come up"
            time.sleep(0.5)
        endpoint = plait.RuntimeEndpoint(base)
        assert endpoint.supports_images
        remote = describe_two.run(first=TALL, second=SQUARE, backend=endpoint, temperature=0)
        local = describe_two.run(first=TALL, second=SQUARE, backend=engine, temperature=0)
        assert remote.text() == local.text()
        prompt = ask("<image>", "What is in the picture?")
        body = {"text": prompt, "sampling_params": sampling(), "image_data": str(inside)}
        r = httpx.post(f"{base}/generate", json=body, timeout=120)
        assert r.status_code == 200, r.text
        expected = engine.generate(prompt, sampling(), image_data=WIDE)
        assert r.json()["output_ids"] == expected["output_ids"]
        r = httpx.post(f"{base}/generate", json={**body, "image_data": str(outside)}, timeout=60)
        assert_refused(r, "image_data", "outside the allowed local media directory")
        r = httpx.post(f"{base}/generate", json={**body, "image_data": b64(png(BIG))}, timeout=60)
        assert_refused(r, "image_data", f"more than {LIMIT} bytes")
        assert httpx.get(f"{base}/health", timeout=5).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
