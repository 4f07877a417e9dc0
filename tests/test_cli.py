"""The ``plait`` command: arguments checked before any loading, one-line errors with
exit status 2, help without markup and with defaults, INFO logging by default."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time

import pytest

from plait.runtime import cli


def plait(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    return subprocess.run(
        [sys.executable, "-m", "plait", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "hi", "--temperature", "-1"], "plait: error: --temperature=-1.0: must be"),
        (["generate", "hi", "--model", "/no/such/model"], "plait: error: --model: model path"),
        (["generate", "hi", "--model", "smollm3"], "plait: error: --model: unknown model alias"),
        (["serve", "--port", "70000"], "plait: error: --port=70000: must be in 0..65535"),
        (["serve", "--kv-cache-memory-gb", "0"], "plait: error: --kv-cache-memory-gb=0.0: must"),
        (["bench", "engine", "--threads", "0"], "plait: error: --threads=0: must be >= 1"),
    ],
    ids=["temperature", "missing-path", "alias", "port", "kv-budget", "threads"],
)
def test_a_bad_argument_is_one_line_and_exit_2_before_any_loading(args, message):
    started = time.perf_counter()
    proc = plait(*args)
    elapsed = time.perf_counter() - started
    assert proc.returncode == 2
    assert proc.stderr.startswith(message), proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stdout == ""
    assert elapsed < 10  # a model load alone takes longer; torch is not even imported


def test_arguments_are_checked_without_importing_torch(monkeypatch):
    args = cli.build_parser().parse_args(["generate", "hi", "--top-p", "0"])
    with pytest.raises(cli.UsageError, match="--top-p=0.0"):
        cli.check_args(args)
    code = (
        "import sys; from plait.runtime import cli\n"
        "a = cli.build_parser().parse_args(['serve', '--max-running-requests', '4'])\n"
        "cli.check_args(a)\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_an_error_while_running_is_one_line_and_a_traceback_only_in_debug(tmp_path, tiny_model_dir):
    broken = tmp_path / "broken"
    broken.mkdir()
    source = tiny_model_dir("llama")
    for name in os.listdir(source):
        (broken / name).write_bytes(pathlib.Path(source, name).read_bytes())
    (broken / "model.safetensors").write_bytes(b"not safetensors")  # passes the early check

    proc = plait("generate", "hi", "--model", str(broken), "--log-level", "warning")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"plait: error: cannot load the weights of model {str(broken)!r}")

    proc = plait("--log-level", "debug", "generate", "hi", "--model", str(broken))
    assert proc.returncode == 2
    assert "Traceback (most recent call last)" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("plait: error: ")


def test_help_has_no_markup_and_shows_defaults():
    top = plait("--help")
    assert top.returncode == 0
    assert "``" not in top.stdout and "plait generate" in top.stdout
    serve = " ".join(plait("serve", "--help").stdout.split())  # unwrapped
    assert "``" not in serve
    for default in (
        "(default: 30000)",
        "(default: 127.0.0.1)",
        "(default: smollm2)",
        "(default: lpm)",
    ):
        assert default in serve, default
    generate = " ".join(plait("generate", "--help").stdout.split())
    assert "(default: 128)" in generate and "(default: 0.0)" in generate


def test_default_logging_says_what_the_engine_does_and_hides_transformers_bars(tiny_model_dir):
    proc = plait("generate", "Hello", "--model", tiny_model_dir("llama"), "--max-new-tokens", "2")
    assert proc.returncode == 0, proc.stderr
    assert "INFO plait.runtime.engine: engine ready in" in proc.stderr
    assert "KV cache" in proc.stderr
    assert "Loading weights" not in proc.stderr and "%|" not in proc.stderr

    quiet = plait(
        "generate", "Hello", "--model", tiny_model_dir("llama"), "--max-new-tokens", "2",
        "--log-level", "warning",
    )  # fmt: skip
    assert quiet.returncode == 0 and quiet.stdout == proc.stdout
    assert quiet.stderr == ""
