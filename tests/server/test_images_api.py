"""Images out over HTTP. A fake OpenAI-images server on 127.0.0.1 (the remote peer: it
renders a deterministic PNG per prompt, seed and index) drives OpenAIImagesGenerator:
its images decode exactly, 5xx answers are retried, and a server that is down, slow
or answers junk is a clear error naming the URL. Then plait's own
``/v1/images/generations``, wired to that generator, through the ``openai`` client:
images, extras passed through, 400s naming the field, ``/metrics``; chained to a
second plait server; and a client that goes away sets its request's cancel event."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.server
import io
import json
import logging
import threading
import time

import diffusers
import httpx
import numpy as np
import openai
import pytest
import torch
from common import MODEL, assert_error
from fastapi.testclient import TestClient
from http_server import free_port, running_server
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pictures import b64, picture, png
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from tiny_models import make_tiny_sd

from plait.multimodal.generation import GenerationCancelled, ImageGenerationError, ImageRequest
from plait.multimodal.openai_images import ImageBackendError, OpenAIImagesGenerator
from plait.runtime import cli
from plait.runtime.server import ServerConfig, create_app
from plait.runtime.server.images_api import NO_GENERATOR

FAKE_MODEL = "fake-sd"
DEFAULT_SIZE = (32, 32)


def render(prompt: str, seed: int | None, index: int, size: tuple[int, int]) -> Image.Image:
    """The fake server's picture: noise seeded by the prompt, the seed and the index."""
    key = hashlib.sha256(f"{prompt}|{seed}|{index}".encode()).digest()
    return picture(size[0], size[1], int.from_bytes(key[:4], "little"))


class FakeImagesServer:
    """An OpenAI-images server: ``POST /v1/images/generations`` answers ``n`` rendered
    PNGs as b64_json. ``replies`` (status, body) are given first, one per call, and
    ``delay_s`` delays every answer; ``bodies`` and ``auth`` record what came."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.auth: list[str | None] = []
        self.replies: list[tuple[int, bytes]] = []
        self.delay_s = 0.0
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    status, body = fake.answer(self.path, data, self.headers.get("Authorization"))
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, path: str, data: bytes, auth: str | None) -> tuple[int, bytes]:
        """Recorded and chosen at once, then delayed: a late answer is not counted in
        the next test."""
        if path != "/v1/images/generations":
            return 404, b'{"error": {"message": "no such route"}}'
        body, delay = json.loads(data), self.delay_s
        self.bodies.append(body)
        self.auth.append(auth)
        reply = self.replies.pop(0) if self.replies else (200, self.draw(body))
        time.sleep(delay)
        return reply

    def draw(self, body: dict) -> bytes:
        size = tuple(int(x) for x in body["size"].split("x")) if "size" in body else DEFAULT_SIZE
        images = [
            {"b64_json": b64(png(render(body["prompt"], body.get("seed"), k, size)))}
            for k in range(body.get("n", 1))
        ]
        return json.dumps({"created": 1, "data": images}).encode()

    def reset(self) -> FakeImagesServer:
        self.bodies, self.auth, self.replies, self.delay_s = [], [], [], 0.0
        return self

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class SlowGenerator:
    """A generator that draws nothing: it waits until its request is cancelled."""

    name = "slow"

    def __init__(self) -> None:
        self.started = threading.Event()
        self.cancelled = threading.Event()

    def generate(self, requests: list[ImageRequest]) -> list[list[Image.Image]]:
        self.started.set()
        if requests[0].cancel.wait(30):
            self.cancelled.set()
            raise GenerationCancelled("the client went away")
        raise AssertionError("never cancelled")

    def close(self) -> None:
        pass


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def decoded(b64_json: str) -> np.ndarray:
    return pixels(Image.open(io.BytesIO(base64.b64decode(b64_json))))


def error_json(message: str, param: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": "x", "param": param}}).encode()


@pytest.fixture(autouse=True)
def _direct(no_proxy):
    """The openai client (httpx) goes straight to 127.0.0.1."""


@pytest.fixture(scope="module")
def fake_server():
    server = FakeImagesServer()
    yield server
    server.close()


@pytest.fixture
def fake(fake_server) -> FakeImagesServer:
    return fake_server.reset()


def generator(fake: FakeImagesServer, **options) -> OpenAIImagesGenerator:
    return OpenAIImagesGenerator(fake.url, FAKE_MODEL, **{"backoff_s": 0.01, **options})


# ---- OpenAIImagesGenerator against the fake server ------------------------------------------


def test_images_decode_to_what_the_server_rendered(fake):
    gen = generator(fake)
    requests = [
        ImageRequest("a red fox", size=(40, 24), seed=7, n=2),
        ImageRequest("a blue whale"),
    ]
    results = gen.generate(requests)
    assert [len(r) for r in results] == [2, 1]
    for k, image in enumerate(results[0]):
        assert image.size == (40, 24)
        np.testing.assert_array_equal(pixels(image), pixels(render("a red fox", 7, k, (40, 24))))
    np.testing.assert_array_equal(
        pixels(results[1][0]), pixels(render("a blue whale", None, 0, DEFAULT_SIZE))
    )
    assert not np.array_equal(pixels(results[0][0]), pixels(results[0][1]))


def test_the_body_has_openai_fields_and_the_extras_only_when_set(fake):
    gen = generator(fake, api_key="sk-test")
    gen.generate([ImageRequest("a fox")])
    gen.generate(
        [
            ImageRequest(
                "a fox", negative_prompt="blur", size=(64, 48), steps=4, guidance=2.5, seed=3, n=2
            )
        ]
    )
    assert fake.bodies == [
        {"prompt": "a fox", "n": 1, "model": FAKE_MODEL, "response_format": "b64_json"},
        {
            "prompt": "a fox",
            "n": 2,
            "model": FAKE_MODEL,
            "size": "64x48",
            "response_format": "b64_json",
            "seed": 3,
            "negative_prompt": "blur",
            "num_inference_steps": 4,
            "guidance_scale": 2.5,
        },
    ]
    assert fake.auth == ["Bearer sk-test"] * 2
    assert gen.name == FAKE_MODEL and gen.url == fake.url + "/v1/images/generations"
    assert OpenAIImagesGenerator(fake.url + "/v1/", None).url == gen.url  # OpenAI-style base


def test_5xx_answers_are_retried_then_succeed(fake):
    fake.replies = [(500, error_json("boom")), (503, b"busy")]
    [[image]] = generator(fake, retries=2).generate([ImageRequest("a fox", seed=1)])
    assert len(fake.bodies) == 3
    np.testing.assert_array_equal(pixels(image), pixels(render("a fox", 1, 0, DEFAULT_SIZE)))


def test_retries_run_out_in_an_error_naming_the_url_and_the_status(fake):
    fake.replies = [(500, error_json("out of memory"))] * 3
    with pytest.raises(ImageBackendError) as e:
        generator(fake, retries=2).generate([ImageRequest("a fox")])
    assert str(e.value) == (
        f"image backend {fake.url}/v1/images/generations: HTTP 500: out of memory "
        "(after 3 attempts)"
    )
    assert isinstance(e.value, ConnectionError) and len(fake.bodies) == 3


def test_a_server_that_is_down_is_a_clear_error():
    url = f"http://127.0.0.1:{free_port()}"
    gen = OpenAIImagesGenerator(url, FAKE_MODEL, retries=1, backoff_s=0.01)
    with pytest.raises(ImageBackendError) as e:
        gen.generate([ImageRequest("a fox")])
    assert e.value.url == url + "/v1/images/generations"
    assert e.value.reason == "connection refused (is the server running?) (after 2 attempts)"


def test_a_slow_server_times_out_without_retrying(fake):
    fake.delay_s = 3
    started = time.monotonic()
    with pytest.raises(ImageBackendError, match=r"/v1/images/generations: no answer within 0.3s$"):
        generator(fake, timeout_s=0.3, retries=2).generate([ImageRequest("a fox")])
    assert time.monotonic() - started < 2


def test_cancel_stops_the_wait_for_the_server(fake):
    fake.delay_s = 5
    request = ImageRequest("a fox")
    threading.Timer(0.2, request.cancel.set).start()
    started = time.monotonic()
    with pytest.raises(GenerationCancelled, match="cancelled while waiting for http://127"):
        generator(fake).generate([request])
    assert time.monotonic() - started < 2


@pytest.mark.parametrize(
    "reply, reason",
    [
        ((200, b"<html>oops</html>"), "the answer is not JSON: '<html>oops</html>'"),
        ((200, b'{"data": []}'), """the answer has no images: '{"data": []}'"""),
        ((200, b'{"object": "list"}'), """the answer has no images: '{"object": "list"}'"""),
        ((200, b'{"data": [{"b64_json": "!!"}, {}]}'), "asked for 1 images, the answer has 2"),
        ((200, b'{"data": [{"url": "http://x/a.png"}]}'), "data[0] has a URL instead of b64_json"),
        ((200, b'{"data": [{"b64_json": "@@@"}]}'), "data[0].b64_json is not base64"),
        (
            (200, b'{"data": [{"b64_json": "aGVsbG8="}]}'),
            "image source 'data[0].b64_json': not a readable image",
        ),
        ((404, b"Not Found"), "HTTP 404: 'Not Found'"),
        ((401, error_json("bad key")), "HTTP 401 (check the API key): bad key"),
    ],
    ids=["html", "empty", "no-data", "count", "url", "base64", "not-image", "404", "401"],
)
def test_junk_answers_are_clear_errors(fake, reply, reason):
    fake.replies = [reply]
    with pytest.raises(ImageBackendError) as e:
        generator(fake).generate([ImageRequest("a fox")])
    assert e.value.reason.startswith(reason), e.value.reason
    assert str(e.value).startswith(f"image backend {fake.url}/v1/images/generations: ")
    assert len(fake.bodies) == 1  # junk is not retried


def test_a_refusal_naming_a_field_is_an_error_for_that_field(fake):
    fake.replies = [(400, error_json("steps must be <= 50", param="num_inference_steps"))]
    with pytest.raises(ImageGenerationError) as e:
        generator(fake).generate([ImageRequest("a fox", steps=100)])
    assert (e.value.field, e.value.value) == ("steps", 100)
    assert e.value.reason == "the image backend refused it: steps must be <= 50"


def test_bad_requests_and_urls_are_refused_before_any_call(fake):
    with pytest.raises(ImageGenerationError, match="^n=0"):
        generator(fake).generate([ImageRequest("a fox", n=0)])
    assert fake.bodies == []
    with pytest.raises(ValueError, match="base_url='ftp://x'"):
        OpenAIImagesGenerator("ftp://x", None)


# ---- plait's /v1/images/generations ---------------------------------------------------------


@pytest.fixture(scope="module")
def plait_url(engine, fake_server):
    """plait, drawing through OpenAIImagesGenerator with the fake server."""
    config = ServerConfig(
        served_model_name=MODEL, image_backend=fake_server.url, image_backend_model=FAKE_MODEL
    )
    with running_server(create_app(engine, config)) as url:
        yield url


@pytest.fixture(scope="module")
def chained_url(engine, plait_url):
    """A second plait whose image backend is the first."""
    config = ServerConfig(
        served_model_name=MODEL, image_backend=plait_url, image_backend_model=FAKE_MODEL
    )
    with running_server(create_app(engine, config)) as url:
        yield url


_CLIENTS: dict[str, openai.OpenAI] = {}


def client(url: str) -> openai.OpenAI:
    """One openai client per server, closed at the end of the module."""
    if url not in _CLIENTS:
        _CLIENTS[url] = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    return _CLIENTS[url]


@pytest.fixture(scope="module", autouse=True)
def _close_clients():
    yield
    for c in _CLIENTS.values():
        c.close()
    _CLIENTS.clear()


def metric(url: str, name: str, labels: dict | None = None) -> float:
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in family.samples:
            if s.name == name and s.labels == (labels or {}):
                return s.value
    return 0.0


EXTRAS = {"seed": 7, "negative_prompt": "blurry", "num_inference_steps": 3, "guidance_scale": 1.5}


@pytest.mark.parametrize("route", ["plait", "plait-to-plait"])
def test_the_openai_client_gets_n_images_and_the_extras_pass_through(
    fake, plait_url, chained_url, route
):
    url = plait_url if route == "plait" else chained_url
    images_before = metric(plait_url, "plait_images_generated_total")
    ok_before = metric(plait_url, "plait_image_requests_total", {"status": "ok"})
    result = client(url).images.generate(
        model=FAKE_MODEL,
        prompt="a red fox",
        n=2,
        size="40x24",
        response_format="b64_json",
        extra_body=EXTRAS,
    )
    assert len(result.data) == 2 and isinstance(result.created, int)
    for k, item in enumerate(result.data):
        np.testing.assert_array_equal(
            decoded(item.b64_json), pixels(render("a red fox", 7, k, (40, 24)))
        )
    assert fake.bodies == [
        {
            "prompt": "a red fox",
            "n": 2,
            "model": FAKE_MODEL,
            "size": "40x24",
            "response_format": "b64_json",
            **EXTRAS,
        }
    ]
    assert metric(plait_url, "plait_images_generated_total") == images_before + 2
    assert metric(plait_url, "plait_image_requests_total", {"status": "ok"}) == ok_before + 1


def test_defaults_model_omitted_one_image_at_the_backends_size(fake, plait_url):
    result = client(plait_url).images.generate(prompt="a blue whale")
    [item] = result.data
    np.testing.assert_array_equal(
        decoded(item.b64_json), pixels(render("a blue whale", None, 0, DEFAULT_SIZE))
    )
    assert fake.bodies[0]["n"] == 1 and "size" not in fake.bodies[0]


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"size": "big"}, "size"),
        ({"size": "0x64"}, "size"),
        ({"size": "64x99999"}, "size"),
        ({"n": 0}, "n"),
        ({"n": 9}, "n"),
        ({"n": "two"}, "n"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"num_inference_steps": 100000}, "num_inference_steps"),
        ({"guidance_scale": -1}, "guidance_scale"),
        ({"seed": -1}, "seed"),
        ({"prompt": "  "}, "prompt"),
        ({"response_format": "url"}, "response_format"),
        ({"response_format": "jpeg"}, "response_format"),
        ({"quality": "hd"}, "quality"),
        ({"stream": True}, "stream"),
        ({"colour": "red"}, "colour"),
    ],
    ids=lambda v: json.dumps(v) if isinstance(v, dict) else v,
)
def test_bad_input_is_a_400_naming_the_field(fake, plait_url, fields, param):
    body = {"prompt": "a fox", **fields}
    failed = metric(plait_url, "plait_image_requests_total", {"status": "invalid"})
    with pytest.raises(openai.BadRequestError) as e:
        client(plait_url).images.generate(prompt=body.pop("prompt"), extra_body=body, timeout=10)
    assert e.value.status_code == 400 and e.value.param == param
    assert param in e.value.body["message"]
    assert fake.bodies == []  # refused before the backend is asked
    assert metric(plait_url, "plait_image_requests_total", {"status": "invalid"}) == failed + 1


JSON = {"Content-Type": "application/json"}
FLOATS = st.floats(allow_nan=False, allow_infinity=False)  # what JSON can carry
ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | FLOATS | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=5,
)
# The route's fields with values of any JSON type, and sizes kept small where valid.
FIELDS = {
    "prompt": st.text(max_size=10) | ANY_JSON,
    "n": st.integers(-2, 10) | ANY_JSON,
    "size": st.sampled_from(["16x8", "8x24", "auto", "big", "0x4", "4x9999", "x", ""]) | ANY_JSON,
    "model": st.sampled_from([FAKE_MODEL, "other"]) | ANY_JSON,
    "response_format": st.sampled_from(["b64_json", "url", "png"]) | ANY_JSON,
    "seed": st.integers(-(2**64), 2**64) | ANY_JSON,
    "negative_prompt": st.text(max_size=10) | ANY_JSON,
    "num_inference_steps": st.integers(-1, 300) | ANY_JSON,
    "guidance_scale": st.floats(-10, 200) | ANY_JSON,
    "quality": ANY_JSON,
    "colour": ANY_JSON,
}


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=st.fixed_dictionaries({}, optional=FIELDS) | ANY_JSON)
def test_no_body_makes_a_server_error(fake, plait_url, body):
    r = httpx.post(plait_url + "/v1/images/generations", json=body, timeout=30)
    if r.status_code == 200:
        data = r.json()["data"]
        assert len(data) == (body.get("n", 1)) and all(decoded(d["b64_json"]).size for d in data)
        return
    assert 400 <= r.status_code < 500, (body, r.text)
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text


def test_the_server_stays_healthy_after_bad_input(fake, plait_url):
    with httpx.Client(base_url=plait_url) as http:
        assert_error(http.post("/v1/images/generations", json={"n": 2}), 400, "prompt")
        r = http.post("/v1/images/generations", content=b"{not json", headers=JSON)
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
        assert http.get("/health").status_code == 200
    assert len(client(plait_url).images.generate(prompt="a fox", n=3).data) == 3


def test_another_model_name_is_a_404_naming_the_model(fake, plait_url):
    with pytest.raises(openai.NotFoundError) as e:
        client(plait_url).images.generate(model="dall-e-3", prompt="a fox")
    assert e.value.param == "model" and repr(FAKE_MODEL) in e.value.body["message"]


def test_a_failing_backend_is_a_502_and_its_refusals_stay_400s(fake, plait_url, chained_url):
    fake.replies = [(500, error_json("out of memory"))] * 3
    with pytest.raises(openai.InternalServerError) as e:
        client(plait_url).images.generate(prompt="a fox")
    assert e.value.status_code == 502 and e.value.code == "backend_error"
    assert "HTTP 500: out of memory (after 3 attempts)" in e.value.body["message"]
    assert fake.url not in e.value.body["message"]  # a client does not learn the backend
    # The backend's own 400 naming a field comes back through two plaits as a 400 for it.
    fake.replies = [(400, error_json("size must be a multiple of 8", param="size"))]
    with pytest.raises(openai.BadRequestError) as e:
        client(chained_url).images.generate(prompt="a fox", size="60x60")
    assert e.value.param == "size" and "size must be a multiple of 8" in e.value.body["message"]


def test_no_generator_is_a_404_saying_how_to_set_one(engine):
    # Not entered: leaving the app's lifespan would shut the module's engine down.
    http = TestClient(create_app(engine, ServerConfig(served_model_name=MODEL)))
    error = assert_error(http.post("/v1/images/generations", json={"prompt": "a fox"}), 404, None)
    assert error["message"] == NO_GENERATOR and error["code"] == "no_image_generator"
    assert "--image-model DIR" in NO_GENERATOR and "--image-backend URL" in NO_GENERATOR
    assert http.get("/health").status_code == 200


# ---- disconnects ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slow():
    return SlowGenerator()


@pytest.fixture(scope="module")
def slow_url(engine, slow):
    app = create_app(engine, ServerConfig(served_model_name=MODEL), image_generator=slow)
    with running_server(app) as url:
        yield url


@pytest.fixture(scope="module")
def slow_chained_url(engine, slow_url):
    config = ServerConfig(
        served_model_name=MODEL, image_backend=slow_url, image_backend_model="slow"
    )
    with running_server(create_app(engine, config)) as url:
        yield url


@pytest.mark.parametrize("route", ["plait", "plait-to-plait"])
def test_a_client_that_goes_away_cancels_the_generation(slow, slow_url, slow_chained_url, route):
    url = slow_url if route == "plait" else slow_chained_url
    slow.started.clear()
    slow.cancelled.clear()
    cancelled = metric(url, "plait_image_requests_total", {"status": "cancelled"})
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/images/generations", json={"prompt": "a fox"}, timeout=1.0)
    assert slow.started.is_set()
    assert slow.cancelled.wait(5)  # the generator saw its cancel event, through both servers
    deadline = time.monotonic() + 5
    while metric(url, "plait_image_requests_total", {"status": "cancelled"}) != cancelled + 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert httpx.get(url + "/health").status_code == 200


# ---- a local pipeline: --image-model ---------------------------------------------------------

IDLE_OFFLOAD_S = 1.0


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory) -> str:
    return make_tiny_sd(tmp_path_factory.mktemp("tiny_sd"), seed=0)


@pytest.fixture(scope="module")
def local(engine, sd_dir):
    """plait serving ``--image-model sd_dir --image-scheduler euler --image-idle-offload 1``:
    its URL and the DiffusersGenerator the config built."""
    config = ServerConfig(
        served_model_name=MODEL,
        image_model=sd_dir,
        image_scheduler="euler",
        image_idle_offload_s=IDLE_OFFLOAD_S,
        image_max_batch=4,
    )
    app = create_app(engine, config)
    with running_server(app) as url:
        yield url, app.state.images.generator


def plain_pictures(path: str, prompt: str, negative: str, n: int, seed: int, steps: int):
    """A plain diffusers call with the Euler scheduler and CPU generators seed + i."""
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(path, local_files_only=True)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        prompt=[prompt] * n,
        negative_prompt=[negative] * n,
        width=32,
        height=32,
        num_inference_steps=steps,
        generator=[torch.Generator().manual_seed(seed + i) for i in range(n)],
    ).images


def test_the_local_pipeline_runs_as_the_engine_does_and_equals_a_plain_call(engine, sd_dir, local):
    url, gen = local
    assert (gen.device, gen.dtype) == (engine.device, engine.dtype)
    assert gen.max_batch_images == 4 and gen.idle_offload_s == IDLE_OFFLOAD_S
    result = client(url).images.generate(
        model=gen.name,
        prompt="a red fox",
        n=2,
        size="32x32",
        response_format="b64_json",
        extra_body={"seed": 11, "num_inference_steps": 3, "negative_prompt": "blurry"},
    )
    want = plain_pictures(sd_dir, "a red fox", "blurry", n=2, seed=11, steps=3)
    assert len(result.data) == 2
    for item, plain in zip(result.data, want, strict=True):
        np.testing.assert_array_equal(decoded(item.b64_json), pixels(plain))
    assert type(gen.pipeline.scheduler).__name__ == "EulerDiscreteScheduler"


def test_a_client_that_goes_away_stops_the_denoising_loop(local):
    url, gen = local
    client(url).images.generate(prompt="warm up", extra_body={"num_inference_steps": 1})
    before = dict(gen.counters)
    steps = 200  # far more than run before the client goes away
    body = {"prompt": "a slow fox", "size": "256x256", "num_inference_steps": steps}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/images/generations", json=body, timeout=1.0)
    deadline = time.monotonic() + 30
    while gen.counters["stopped"] == before["stopped"]:
        assert time.monotonic() < deadline, gen.counters
        time.sleep(0.05)
    after = gen.counters
    assert after["images_generated"] == before["images_generated"]
    assert 0 < after["denoise_steps"] - before["denoise_steps"] < steps
    assert metric(url, "plait_image_requests_total", {"status": "cancelled"}) >= 1
    assert len(client(url).images.generate(prompt="a fox", n=2).data) == 2  # still serving


def test_an_idle_local_pipeline_is_offloaded_and_comes_back_for_the_next_request(sd_dir, local):
    url, gen = local
    ask = {"seed": 5, "num_inference_steps": 2, "negative_prompt": "dark"}
    first = client(url).images.generate(prompt="a blue whale", extra_body=ask).data[0]
    deadline = time.monotonic() + IDLE_OFFLOAD_S + 10
    while not gen.offloaded:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert gen.pipeline is None  # on a CPU the weights are released
    reloads = gen.counters["reloads"]
    again = client(url).images.generate(prompt="a blue whale", extra_body=ask).data[0]
    assert gen.counters["reloads"] == reloads + 1
    np.testing.assert_array_equal(decoded(again.b64_json), decoded(first.b64_json))
    [want] = plain_pictures(sd_dir, "a blue whale", "dark", n=1, seed=5, steps=2)
    np.testing.assert_array_equal(decoded(first.b64_json), pixels(want))


@pytest.mark.parametrize(
    "fields, param, words",
    [
        ({"size": "36x36"}, "size", "multiples of 8"),
        ({"num_inference_steps": 0}, "num_inference_steps", "must be 1 to"),
        ({"n": 9}, "n", "must be 1 to 8"),
    ],
    ids=["size-multiple", "steps", "n"],
)
def test_the_local_pipelines_limits_are_400s_naming_the_field(local, fields, param, words):
    url, _ = local
    with pytest.raises(openai.BadRequestError) as e:
        client(url).images.generate(prompt="a fox", extra_body=fields)
    assert e.value.param == param and words in e.value.body["message"]
    assert httpx.get(url + "/health").status_code == 200


def test_a_prompt_past_the_text_encoders_limit_is_truncated_with_a_warning(local, caplog):
    url, gen = local
    prompt = " ".join(["a very long prompt about a fox"] * 40)
    with caplog.at_level(logging.WARNING, logger="plait.multimodal.diffusers_backend"):
        result = client(url).images.generate(prompt=prompt, extra_body={"seed": 1})
    assert len(result.data) == 1
    limit = gen.pipeline.tokenizer.model_max_length
    assert any(f"the text encoder reads {limit}" in r.getMessage() for r in caplog.records)


# ---- plait serve's flags ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--image-model", "/no/such/dir"], "--image-model=/no/such/dir: not a directory"),
        (["--image-backend", "localhost:8000"], "--image-backend=localhost:8000: not an http"),
        (["--image-backend-model", "x"], "--image-backend-model: needs --image-backend URL"),
        (
            ["--image-backend", "http://a", "--image-model", "."],
            "--image-model and --image-backend: give one",
        ),
        (
            ["--image-backend", "http://a", "--image-backend-timeout", "0"],
            "--image-backend-timeout",
        ),
        (["--image-scheduler", "euler"], "--image-scheduler: needs --image-model DIR"),
        (["--image-idle-offload", "5"], "--image-idle-offload: needs --image-model DIR"),
        (["--image-batch-invariant"], "--image-batch-invariant: needs --image-model DIR"),
        (["--image-model", ".", "--image-idle-offload", "-1"], "--image-idle-offload=-1.0"),
        (["--image-model", ".", "--image-max-batch", "0"], "--image-max-batch=0: must be >= 1"),
    ],
    ids=[
        "model-dir",
        "backend-url",
        "model-alone",
        "both",
        "timeout",
        "scheduler-alone",
        "offload-alone",
        "invariant-alone",
        "offload",
        "max-batch",
    ],
)
def test_serve_checks_the_image_flags(flags, message):
    args = cli.build_parser().parse_args(["serve", *flags])
    with pytest.raises(cli.UsageError) as e:
        cli.check_args(args)
    assert str(e.value).startswith(message)


def test_serve_passes_the_image_flags_to_the_server(monkeypatch):
    import plait.runtime.server as server

    seen = {}
    monkeypatch.setattr(server, "serve", lambda **kw: seen.update(kw))
    flags = ["--image-backend", "http://127.0.0.1:9/v1", "--image-backend-model", "sd"]
    flags += ["--image-backend-api-key", "sk-1", "--image-backend-timeout", "7"]
    args = cli.build_parser().parse_args(["serve", *flags])
    cli.check_args(args)
    assert args.func(args) == 0
    config = seen["server"]
    assert (config.image_backend, config.image_backend_model) == ("http://127.0.0.1:9/v1", "sd")
    assert (config.image_backend_api_key, config.image_backend_timeout_s) == ("sk-1", 7.0)
    assert config.image_model is None


def test_an_unknown_scheduler_name_is_refused_listing_the_known_ones(capsys):
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(["serve", "--image-model", ".", "--image-scheduler", "x"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--image-scheduler: invalid choice: 'x'" in err and "dpm++_2m" in err
    with pytest.raises(ValueError, match="image_scheduler='x': known names: default, euler"):
        ServerConfig(image_model=".", image_scheduler="x")


def test_the_scheduler_names_are_the_backends(sd_dir):
    from plait.multimodal.diffusers_backend import SCHEDULERS
    from plait.multimodal.generation import SCHEDULER_NAMES

    assert ("default", *SCHEDULERS) == SCHEDULER_NAMES


def test_serve_passes_the_local_pipeline_flags_to_the_server(monkeypatch, sd_dir):
    import plait.runtime.server as server

    seen = {}
    monkeypatch.setattr(server, "serve", lambda **kw: seen.update(kw))
    flags = ["--image-model", sd_dir, "--image-scheduler", "dpm++_2m"]
    flags += ["--image-idle-offload", "30", "--image-max-batch", "2", "--image-batch-invariant"]
    args = cli.build_parser().parse_args(["serve", *flags])
    cli.check_args(args)
    assert args.func(args) == 0
    config = seen["server"]
    assert (config.image_model, config.image_scheduler) == (sd_dir, "dpm++_2m")
    assert (config.image_idle_offload_s, config.image_max_batch) == (30.0, 2)
    assert config.image_batch_invariant is True
