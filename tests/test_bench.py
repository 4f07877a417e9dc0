"""The benchmark package ``plait.bench``: a registry of workloads that ``plait bench``
reads without importing any benchmark, modules that each export their names, help,
flags and ``main``, and the helpers they share."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys

import pytest

from plait.bench import WORKLOADS, load
from plait.bench.common import engine_options
from plait.runtime import cli

EVERY_WORKLOAD = [
    "engine",
    "few-shot",
    "multi-turn",
    "fork",
    "prefix",
    "grammar",
    "programs",
    "server",
    "kernels",
    "memory",
    "vision",
    "image-chat",
]


def test_the_registry_names_every_workload():
    assert list(WORKLOADS) == EVERY_WORKLOAD


def test_bench_help_lists_every_workload_with_its_help(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "300")  # one line per workload
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "--help"])
    assert exit_.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    for name, workload in WORKLOADS.items():
        assert any(line.split() == [name, *workload.help.split()] for line in lines), name


@pytest.mark.parametrize("name", EVERY_WORKLOAD)
def test_each_workload_module_exports_its_name_help_flags_and_main(name):
    module = importlib.import_module(WORKLOADS[name].module)
    assert load(name) is module
    assert module.WORKLOADS[name] == WORKLOADS[name].help
    assert callable(module.add_arguments) and callable(module.main)


def test_an_unknown_workload_is_named():
    with pytest.raises(ValueError, match="workload='nope': known: \\['engine'"):
        load("nope")


def test_generate_and_serve_import_no_benchmark_module():
    code = (
        "import sys\n"
        "from plait.runtime import cli\n"
        "for argv in (['generate', 'hi'], ['serve']):\n"
        "    cli.check_args(cli.build_parser().parse_args(argv))\n"
        "from plait.runtime.engine import Engine  # what _generate imports\n"
        "from plait.runtime.server import ServerConfig, serve  # what _serve imports\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('plait.bench.'))\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_importing_a_benchmark_imports_neither_torch_nor_the_engine():
    """Parsing ``plait bench WORKLOAD ...`` imports the workload's module for its flags;
    the module loads torch and the engine only when it runs."""
    code = (
        "import sys\n"
        "from plait.bench import WORKLOADS, load\n"
        "for name in WORKLOADS:\n"
        "    load(name)\n"
        "heavy = [m for m in ('torch', 'transformers', 'plait.runtime.engine') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (
            ["grammar", "--sections", "overhead,jump", "--threads", "2"],
            {"sections": "overhead,jump", "threads": 2, "quick": False, "seed": 0},
        ),
        (["prefix", "--threads", "2"], {"threads": 2, "size": ""}),
        (["multi-turn", "--size", "sessions=1,turns=8"], {"size": "sessions=1,turns=8"}),
        (["engine", "--quick", "--skip-hf"], {"quick": True, "skip_hf": True, "model": "smollm2"}),
        (["kernels", "--threads", "2"], {"threads": 2}),
        (
            ["vision", "--tiny", "--longest-edge", "128", "--cache-dir", "x"],
            {"tiny": True, "longest_edge": 128, "cache_dir": "x", "skip_hf": False},
        ),
        (
            ["image-chat", "--tiny", "--size", "64", "--conversation-tokens", "500"],
            {"tiny": True, "size": 64, "conversation_tokens": 500, "idle_offload_s": 2.0},
        ),
    ],
    ids=["grammar", "prefix", "multi-turn", "engine", "kernels", "vision", "image-chat"],
)
def test_the_command_lines_of_each_workload_parse(argv, expected):
    args = cli.build_parser().parse_args(["bench", *argv])
    assert args.command == "bench" and args.workload == argv[0]
    assert {key: getattr(args, key) for key in expected} == expected


def test_a_workload_takes_only_its_own_flags(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["bench", "engine", "--sections", "overhead"])
    assert "unrecognized arguments: --sections overhead" in capsys.readouterr().err


def test_a_workloads_help_shows_its_own_flags(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "300")
    with pytest.raises(SystemExit):
        cli.main(["bench", "grammar", "--help"])
    out = capsys.readouterr().out
    assert "--sections SECTIONS" in out and "--peer-python" in out and "--threads" in out


def test_engine_options_come_from_the_engine_flags():
    from plait.runtime.config import EngineConfig

    args = cli.build_parser().parse_args(
        ["bench", "engine", "--threads", "3", "--kv-cache-memory-gb", "0.5", "--dtype", "fp32"]
    )
    options = engine_options(args, 3, disable_radix_cache=True)
    assert options["num_threads"] == 3
    assert options["kv_cache_memory_gb"] == 0.5
    assert options["dtype"] == "fp32"
    assert options["device"] is None and options["max_total_tokens"] is None
    assert options["disable_radix_cache"] is True
    assert "log_level" not in options and "model" not in options
    EngineConfig(model=args.model, **options)  # every key is an Engine option


def test_matmul_params_counts_every_linear_weight_and_bias_but_not_the_embedding():
    import torch

    from plait.bench.engine import matmul_params

    model = torch.nn.Sequential(
        torch.nn.Embedding(100, 8),
        torch.nn.Linear(8, 16),  # 128 + 16
        torch.nn.Linear(16, 4, bias=False),  # 64
    )
    assert matmul_params(model) == 8 * 16 + 16 + 16 * 4


def test_bench_vision_runs_end_to_end_on_a_tiny_model(tmp_path):
    """``plait bench vision --tiny --quick`` builds its random model, runs both workloads
    on plait and the chat on HF, and prints every figure and a verdict per goal."""
    out = subprocess.run(
        [sys.executable, "-m", "plait", "bench", "vision", "--tiny", "--quick"]
        + ["--threads", "1", "--cache-dir", str(tmp_path)],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    ).stdout
    assert "random weights, a tiny Idefics3" in out
    assert "torch threads: 1; device: cpu; dtype: float32" in out
    number = r"(\d+\.\d+)"
    turns = re.findall(rf"^ +(\d) +{number} +(\d+) +{number} +{number}x$", out, re.M)
    assert [int(t[0]) for t in turns] == [1, 2, 3]  # --quick: 4 sessions x 3 turns
    cached = [int(t[2]) for t in turns]  # the conversation so far comes from the cache
    assert cached[0] < cached[1] < cached[2]
    later = re.search(rf"turns 2-3: plait {number} s, HF {number} s: {number}x .* (PASS|MISS)", out)
    plait_s, hf_s, ratio = map(float, later.groups()[:3])
    half = 0.0005  # the seconds are printed to 3 places, the ratio to 2
    assert (
        (hf_s - half) / (plait_s + half) - 0.005
        <= ratio
        <= (hf_s + half) / (plait_s - half) + 0.005
    )
    assert re.search(r"chat images encoded: \d+ for 2 distinct images .* (PASS|MISS)", out)
    ttft = re.search(rf"first {number} s; repeated image \(median of 3\) {number} s; ", out)
    assert all(float(x) > 0 for x in ttft.groups())
    assert float(re.search(rf"HF time to first token \(median of 4 .*: {number} s", out)[1]) > 0
    assert re.search(rf"repeated-image TTFT: {number}x better .* (PASS|MISS)", out)
    # The repeated image is encoded once; each distinct image once.
    assert "repeat images encoded: 1 for 1 image, 4 for 4 images (goal: once each) PASS" in out
    assert "chat images encoded: 2 for 2 distinct images (goal: once each) PASS" in out
    cache = re.search(r"vision-embedding cache \(whole plait run\): (\d+) hits, (\d+) misses", out)
    assert int(cache[2]) == 1 + 2 + 1 + 4  # warm-up, chat, repeat: each distinct image once
    peak = re.search(r"peak RSS: plait (\d+) MiB \(before HF loads\); whole run (\d+) MiB", out)
    assert 0 < int(peak.group(1)) <= int(peak.group(2))


def test_bench_image_chat_runs_end_to_end_on_tiny_models(tmp_path):
    """``plait bench image-chat --tiny --quick`` on a tiny LLM builds its random pipeline,
    times the image prompt warm, recomputed and on HF, the generator against the bare
    pipeline, batched against one-by-one requests, and reads the memory around the
    idle offload."""
    from tiny_models import make_tiny_model

    llm = make_tiny_model(tmp_path / "llm", max_position_embeddings=2048)
    out = subprocess.run(
        [sys.executable, "-m", "plait", "bench", "image-chat", "--tiny", "--quick"]
        + ["--threads", "1", "--conversation-tokens", "300", "--max-total-tokens", "4096"]
        + ["--model", llm, "--pipeline-dir", str(tmp_path / "pipeline")],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    ).stdout
    assert "a tiny StableDiffusionPipeline (--tiny)" in out
    assert "32x32 images (8x8x4 latents), 1 step, guidance 0" in out
    assert "torch threads: 1; device: cpu; dtype: float32" in out
    number = r"(\d+\.\d+)"

    # The image prompt: the conversation is cached by the previous turn, not after a flush.
    held = re.search(r"the prompt request holds (\d+) tokens and writes (\d+)", out)
    prompt_tokens, new_tokens = int(held[1]), int(held[2])
    assert prompt_tokens >= 300 and 0 < new_tokens <= 128
    warm = re.search(rf"cache warm \(previous turn\): {number} s, (\d+) cached tokens", out)
    assert 0 < int(warm[2]) < prompt_tokens
    cold = re.search(rf"recomputed \(cache flushed\): {number} s, (\d+) cached tokens", out)
    assert int(cold[2]) == 0
    assert "same answer: True" in out
    hf = re.search(rf"HF transformers, recomputed, {new_tokens} tokens greedy: {number} s", out)
    ratio = re.search(rf"HF / warm: {number}x \(goal >= 5x\) (PASS|MISS)", out)
    half = 0.0005  # seconds printed to 3 places, the ratio to 2
    warm_s, hf_s = float(warm[1]), float(hf[1])
    assert (hf_s - half) / (warm_s + half) - 0.005 <= float(ratio[1])
    assert float(ratio[1]) <= (hf_s + half) / (warm_s - half) + 0.005

    # The generator's images are the bare pipeline call's.
    assert re.search(
        rf"generate_arrays best {number} s, median {number} s; "
        rf"bare pipeline call best {number} s, median {number} s; "
        "outputs equal: True",
        out,
    )
    assert re.search(r"minor page faults per call .*: generator \d+, bare \d+", out)
    overhead = r"overhead: [+-]\d+\.\d% best of each, [+-]\d+\.\d% median \(goal <= 3%\)"
    assert re.search(overhead + " (PASS|MISS)", out)

    # 8 requests at once: fewer pipeline calls batched, 8 one by one; same images.
    batched = re.search(
        r"max_batch_images=8 \(batch_wait_s=0.05\): .* ([\d.]+) pipeline calls", out
    )
    assert 1 <= float(batched[1]) < 8
    assert re.search(r"max_batch_images=1: .* 8 pipeline calls", out)
    assert re.search(rf"throughput: {number}x \(goal >= 1.3x\) (PASS|MISS)", out)
    assert float(re.search(r"max \|difference\| (\S+) \(same seeds\)", out)[1]) < 1e-4

    memory = re.search(
        r"LLM loaded (\d+); LLM \+ generator after 8 images (\d+) \(peak so far (\d+)\); "
        r"after the generator's idle offload (\d+)",
        out,
    )
    llm_mib, both, peak, offloaded = map(int, memory.groups())
    assert 0 < llm_mib <= both <= peak and offloaded > 0
    assert re.search(
        r"idle offload \(idle_offload_s=2\): 1 offload\(s\), after \d+\.\d s idle", out
    )
