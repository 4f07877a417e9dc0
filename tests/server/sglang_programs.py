"""Run SGLang's own frontend program tests (``sglang.test.test_programs``) through
``sglang.RuntimeEndpoint`` against a plait server, in a process of their own
(importing ``sglang`` patches transformers and sets cache variables, which must not
leak into other tests).

    python tests/server/sglang_programs.py            # starts `plait serve` (default model)
    python tests/server/sglang_programs.py --url http://127.0.0.1:30000 --tokenizer DIR

prints one JSON line per program ({"name", "ok", "error", "seconds"}) and then
"SGLang program tests passed: P/T". A server it starts has the flags SGLang's own
suite (test_srt_backend.py) gives its server: ``--incremental-streaming-output``
(which test_stream_logprobs relies on) and profiling on.

Needs ``pip install --no-deps sglang`` plus ``pybase64 msgspec pyzmq aiohttp``, which
its ``sglang.lang`` imports pull in.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import types
import warnings

# SGLang's program tests that run on its RuntimeEndpoint (SGLang's CI runs them on
# one server). test_completion_speculative and test_chat_completion_speculative need
# SGLang's OpenAI backend (API speculative execution, token_usage) and are left out.
PROGRAMS = (
    "few_shot_qa",
    "mt_bench",
    "select",
    "decode_int",
    "decode_json_regex",
    "decode_json",
    "expert_answer",
    "tool_use",
    "react",
    "parallel_decoding",
    "parallel_encoding",
    "image_qa",
    "stream",
    "stream_logprobs",
    "regex",
    "dtype_gen",
    "gen_min_new_tokens",
)
# A program that checks what the model answers (a capital, a number, a name), not what
# the server does: a 135M model may answer wrong.
CHECKS_ANSWERS = frozenset(
    {"few_shot_qa", "decode_int", "expert_answer", "react", "parallel_encoding"}
)
PROGRAM_TIMEOUT_S = 300


def _tokenizer_module(tokenizer_dir: str) -> types.ModuleType:
    """test_gen_min_new_tokens counts tokens with SGLang's ``get_tokenizer(model
    path)``, whose module imports torchvision, and the server shows a model name, not
    a path: give it the served model's own tokenizer instead."""
    from transformers import AutoTokenizer

    module = types.ModuleType("sglang.srt.utils.hf_transformers_utils")
    module.get_tokenizer = lambda *args, **kwargs: AutoTokenizer.from_pretrained(tokenizer_dir)
    return module


def _example_image(directory: str) -> None:
    """test_image_qa reads example_image.png from the working directory."""
    from PIL import Image

    Image.new("RGB", (64, 48), (200, 180, 40)).save(os.path.join(directory, "example_image.png"))


def run_program(name: str, test_programs: types.ModuleType) -> dict:
    fn = getattr(test_programs, f"test_{name}")
    args = (False,) if name == "select" else ()  # SGLang's CI: select(check_answer=False)
    result: dict = {"name": name, "ok": False, "error": None}
    start = time.monotonic()

    def target() -> None:
        # SGLang's interpreter reports a failed request as a warning (with the server's
        # error body) and the program then fails on a missing value: keep the warning.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                fn(*args)
                result["ok"] = True
            except BaseException as e:
                reports = [
                    str(w.message).strip().splitlines()[-1]
                    for w in caught
                    if "Error in stream_executor" in str(w.message)
                ]
                message = reports[-1] if reports else str(e)
                result["error"] = f"{type(e).__name__}: {message}"[:2000]

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(PROGRAM_TIMEOUT_S)
    if thread.is_alive():
        result["error"] = f"timed out after {PROGRAM_TIMEOUT_S} s"
    result["seconds"] = round(time.monotonic() - start, 1)
    result["checks_answers"] = name in CHECKS_ANSWERS
    return result


def check_endpoint(url: str) -> dict:
    """The other routes RuntimeEndpoint calls: /server_info, /flush_cache,
    /start_profile, /stop_profile, and /generate with max_new_tokens 0 (cache_prefix)."""
    import requests
    import sglang as sgl

    backend = sgl.global_config.default_backend
    result: dict = {"name": "runtime_endpoint", "ok": False, "error": None}
    try:
        info = sgl.get_server_info()
        sgl.flush_cache()
        backend.start_profile()
        prefix = "The following are questions with answers about capitals. " * 6
        backend.cache_prefix(prefix)
        body = {"text": prefix + "Q:", "sampling_params": {"max_new_tokens": 1}}
        out = requests.post(url + "/generate", json=body, timeout=120).json()
        backend.stop_profile()
        result.update(
            ok=True,
            model_name=backend.get_model_name(),
            device=info["device"],
            dtype=info["dtype"],
            cached_tokens=out["meta_info"]["cached_tokens"],
        )
    except Exception as e:
        result["error"] = f"{type(e).__name__}: {e}"[:2000]
    return result


def run_all(url: str, tokenizer_dir: str, names: list[str], endpoint: bool) -> list[dict]:
    sys.modules["sglang.srt.utils.hf_transformers_utils"] = _tokenizer_module(tokenizer_dir)
    import sglang as sgl
    from sglang.test import test_programs

    # SmolLM2 speaks ChatML; SGLang's frontend matches templates by model path, and a
    # plait server shows a model name, so name the template as a client would.
    backend = sgl.RuntimeEndpoint(url, chat_template_name="chatml")
    # test_gen_min_new_tokens reads the model name through ``default_backend.endpoint``,
    # which only sgl.Runtime (a server SGLang launches itself) has.
    backend.endpoint = backend
    sgl.set_default_backend(backend)
    workdir = tempfile.mkdtemp(prefix="sglang-programs-")
    _example_image(workdir)
    os.chdir(workdir)
    results = []
    for name in names:
        result = run_program(name, test_programs)
        print(json.dumps(result), flush=True)
        results.append(result)
    if endpoint:  # not one of SGLang's programs: printed, not counted
        print(json.dumps(check_endpoint(url)), flush=True)
    return results


def _serve(port: int, profile_dir: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "plait", "serve", "--port", str(port)]
    cmd += ["--incremental-streaming-output", "--profile-dir", profile_dir]
    proc = subprocess.Popen(cmd)
    deadline = time.monotonic() + 600
    import urllib.request

    while True:
        if proc.poll() is not None:
            raise RuntimeError("plait serve exited early")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("plait serve did not come up") from None
            time.sleep(0.5)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running plait server (default: start one)")
    p.add_argument("--tokenizer", help="the served model's tokenizer directory")
    p.add_argument("--port", type=int, default=30123)
    p.add_argument(
        "--endpoint-calls", action="store_true", help="also check RuntimeEndpoint's other calls"
    )
    p.add_argument("programs", nargs="*", default=list(PROGRAMS))
    a = p.parse_args()
    tokenizer_dir = a.tokenizer
    if tokenizer_dir is None:
        from plait.runtime.loader import resolve_model

        tokenizer_dir = str(resolve_model("smollm2", progress=False).model_path)
    proc = None
    url = a.url
    if url is None:
        proc = _serve(a.port, tempfile.mkdtemp(prefix="plait-profiles-"))
        url = f"http://127.0.0.1:{a.port}"
    try:
        results = run_all(url, tokenizer_dir, a.programs, a.endpoint_calls)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    passed = sum(r["ok"] for r in results)
    print(f"SGLang program tests passed: {passed}/{len(results)}", flush=True)
    for r in results:
        if not r["ok"]:
            why = " (checks the model's answers)" if r["checks_answers"] else ""
            print(f"  failed {r['name']}{why}: {r['error'][:300]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
