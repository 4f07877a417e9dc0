"""SGLang's own frontend against ``plait serve`` with the default model: SGLang's
program tests (``sglang.test.test_programs``: few-shot QA, chat, select, typed and
regex generation, JSON, tool use, ReAct, fork/join, streaming with logprobs, min
tokens, an image on a text model) run through ``sglang.RuntimeEndpoint``, and the
other routes that client calls (server info, flush, profiling, prefix caching).

The programs run in a process of their own (tests/server/sglang_programs.py):
importing ``sglang`` patches transformers and sets cache variables. The server gets
the flags SGLang's own suite gives its server (``--incremental-streaming-output``).
Programs that check the model's answers (a capital, a number of hours, a name) are
expected failures when a 135M model answers wrong; a failure of any other kind is a
failure. Skipped when ``sglang`` is not importable: ``pip install --no-deps
sglang==0.5.23 && pip install pybase64 msgspec pyzmq aiohttp``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import pytest
from http_server import free_port
from sglang_programs import PROGRAMS

pytestmark = pytest.mark.default_model

DRIVER = os.path.join(os.path.dirname(__file__), "sglang_programs.py")


def _sglang_importable() -> str | None:
    """Why ``sglang``'s frontend cannot be imported here, or None."""
    probe = "import sglang, sglang.test.test_programs"
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    return None if r.returncode == 0 else (r.stderr.strip().splitlines() or ["?"])[-1]


@pytest.fixture(scope="module")
def server(default_model_source, tmp_path_factory):
    why = _sglang_importable()
    if why is not None:
        pytest.skip(f"sglang's frontend is not importable ({why})")
    profile_dir = tmp_path_factory.mktemp("profiles")
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    port = free_port()
    cmd = [sys.executable, "-m", "plait", "serve", "--port", str(port)]
    cmd += ["--incremental-streaming-output", "--profile-dir", str(profile_dir)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "plait serve did not come up"
            time.sleep(0.5)
        yield url, profile_dir
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def results(server, default_model_source) -> dict:
    url, _ = server
    cmd = [sys.executable, DRIVER, "--url", url]
    cmd += ["--tokenizer", str(default_model_source.model_path), "--endpoint-calls"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=3000)
    assert r.returncode == 0, r.stderr[-3000:]
    out = {}
    for line in r.stdout.splitlines():
        if line.startswith("{"):
            result = json.loads(line)
            out[result["name"]] = result
    print(r.stdout)  # with -s: the summary line, "SGLang program tests passed: P/T"
    return out


@pytest.mark.parametrize("name", [p for p in PROGRAMS if p != "image_qa"])
def test_sglang_program(results, name):
    result = results[name]
    if result["ok"]:
        return
    if result["checks_answers"] and result["error"].startswith("AssertionError"):
        pytest.xfail(f"checks the model's answer, which a 135M model got wrong: {result['error']}")
    pytest.fail(result["error"])


def test_sglang_image_program_on_a_text_model_is_a_clear_error(results):
    result = results["image_qa"]
    assert not result["ok"]
    error = result["error"]
    assert "image_data" in error and "'smollm2' is text-only" in error, error


def test_runtime_endpoint_routes(results, server):
    """What RuntimeEndpoint calls besides /generate: /get_model_info (at construction),
    /server_info, /flush_cache, /start_profile and /stop_profile (a trace lands in the
    profile directory), and /generate with max_new_tokens 0 (cache_prefix)."""
    _, profile_dir = server
    result = results["runtime_endpoint"]
    assert result["ok"], result["error"]
    assert result["model_name"] == "smollm2"
    assert result["device"] == "cpu" and result["dtype"] == "float32"
    assert result["cached_tokens"] > 0  # the prefix cache_prefix stored was found again
    (trace,) = profile_dir.glob("*.trace.json")
    assert json.loads(trace.read_text())["traceEvents"]
