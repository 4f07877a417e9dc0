"""Qwen2-VL and Qwen2.5-VL on plait's runtime, exact against HF transformers on tiny random
models saved with their processors: greedy ids and logprobs (with top logprobs) equal
transformers' ``generate`` for one image, several images, images in two turns, a batch
mixing text and images, chunked prefill cutting images, and text alone. The language model
runs on plait's own code with M-RoPE (3-D positions of the image tokens, a delta for the
generated ones); the vision transformer is transformers' module."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers
from common import GREEDY, assert_kv_all_free
from PIL import Image
from tiny_models import make_tiny_qwen2_vl
from transformers import AutoModelForImageTextToText

import plait
from plait.multimodal.image import load_image
from plait.runtime.config import ModelConfig
from plait.runtime.errors import RequestError
from plait.runtime.models.qwen2_vl import Qwen2VLInputs, load_processor, mrope_positions
from plait.runtime.scheduler.mrope import mrope_positions as step_positions

N = 8  # new tokens per request
TOP = 3  # top logprobs compared per token
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


def picture(width: int, height: int, seed: int) -> Image.Image:
    """A deterministic noise picture."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def turn(role: str, *parts: str) -> str:
    return f"<|im_start|>{role}\n" + "".join(parts) + "<|im_end|>\n"


def ask(*parts: str) -> str:
    """A user turn (``IMAGE`` where each image goes) and the assistant's cue."""
    return turn("user", *parts) + "<|im_start|>assistant\n"


# Resized to at most 40x40 pixels in area, at least 16x16: 64x48 -> a 10x8 patch grid of 4x5
# merged tokens; 40x80 -> 6x14 patches, 3x7 tokens; 30x30 -> 8x8 patches, 4x4 tokens.
WIDE, TALL, SQUARE = picture(64, 48, 1), picture(40, 80, 2), picture(30, 30, 3)


@pytest.fixture(scope="module", params=["2", "2.5"])
def vlm_dir(request, tmp_path_factory) -> str:
    return make_tiny_qwen2_vl(tmp_path_factory.mktemp("tiny_qwen2_vl"), request.param)


@pytest.fixture(scope="module")
def hf(vlm_dir):
    """``hf(prompt, images) -> (ids, logprob rows)``: transformers' greedy continuation
    and the log-softmax of its logits at each step."""
    processor = load_processor(vlm_dir)
    model = AutoModelForImageTextToText.from_pretrained(vlm_dir, dtype=torch.float32).eval()

    def run(prompt: str, images: list[Image.Image]) -> tuple[list[int], torch.Tensor]:
        inputs = processor(text=[prompt], images=images or None, return_tensors="pt")
        out = model.generate(
            **inputs,
            max_new_tokens=N,
            min_new_tokens=N,
            do_sample=False,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
        ids = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
        return ids, torch.log_softmax(torch.cat(out.logits).float(), dim=-1)

    run.model = model
    run.processor = processor
    return run


@pytest.fixture(scope="module")
def engine(vlm_dir):
    with plait.Engine(model=vlm_dir, max_total_tokens=2048, max_running_requests=8) as eng:
        yield eng


def generate(eng, prompts, image_data):
    params = {**GREEDY, "max_new_tokens": N}
    return eng.generate(
        prompts, params, image_data=image_data, return_logprob=True, top_logprobs_num=TOP
    )


def assert_equals_hf(out: dict, expected: tuple[list[int], torch.Tensor]) -> None:
    """Same ids; each token's logprob and the top logprobs equal transformers' (1e-4)."""
    ids, rows = expected
    assert out["output_ids"] == ids
    meta = out["meta_info"]
    got = torch.tensor([lp for lp, _, _ in meta["output_token_logprobs"]])
    torch.testing.assert_close(got, rows[torch.arange(N), torch.tensor(ids)], atol=1e-4, rtol=0)
    for step, top in enumerate(meta["output_top_logprobs"]):
        values, tokens = rows[step].topk(TOP)
        assert [t for _, t, _ in top] == tokens.tolist()
        torch.testing.assert_close(torch.tensor([v for v, _, _ in top]), values, atol=1e-4, rtol=0)


# ---- exact against transformers --------------------------------------------------------------


def test_one_image_equals_hf(engine, hf):
    prompt = ask(IMAGE, "What is in the picture?")
    out = generate(engine, prompt, WIDE)
    assert_equals_hf(out, hf(prompt, [WIDE]))
    assert out["meta_info"]["prompt_tokens"] > 20  # the 20 placeholders of a 4x5 grid


def test_several_images_in_one_prompt_equal_hf(engine, hf):
    prompt = ask(IMAGE, "and", IMAGE, "and", IMAGE, "Which is taller?")
    out = generate(engine, prompt, [TALL, SQUARE, WIDE])
    assert_equals_hf(out, hf(prompt, [TALL, SQUARE, WIDE]))


def test_input_logprobs_over_the_images_equal_hf(engine, hf):
    """Every prompt position's logprob, image placeholders included (HF: one forward)."""
    prompt = ask("Look:", IMAGE, "and", IMAGE, "Which is wider?")
    out = engine.generate(
        prompt,
        {**GREEDY, "max_new_tokens": 1},
        image_data=[WIDE, TALL],
        return_logprob=True,
        logprob_start_len=0,
    )
    inputs = hf.processor(text=[prompt], images=[WIDE, TALL], return_tensors="pt")
    with torch.no_grad():
        rows = torch.log_softmax(hf.model(**inputs).logits[0].float(), dim=-1)
    ids = inputs["input_ids"][0].tolist()
    got = out["meta_info"]["input_token_logprobs"]
    assert [t for _, t, _ in got] == ids and got[0][0] is None
    expected = rows[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    torch.testing.assert_close(
        torch.tensor([lp for lp, _, _ in got[1:]]), expected, atol=1e-4, rtol=0
    )


def test_images_in_two_turns_equal_hf(engine, hf):
    prompt = (
        turn("user", IMAGE, "What is this?")
        + turn("assistant", "A picture.")
        + ask("And this one?", IMAGE)
    )
    out = generate(engine, prompt, [SQUARE, TALL])
    assert_equals_hf(out, hf(prompt, [SQUARE, TALL]))


def test_text_only_prompts_equal_hf(engine, hf):
    prompts = [ask("Hello, how are you today?"), ask("What is the capital of France?")]
    for prompt, out in zip(prompts, generate(engine, prompts, None), strict=True):
        assert_equals_hf(out, hf(prompt, []))
    assert_kv_all_free(engine)


def test_a_batch_mixing_text_and_images_equals_hf(engine, hf):
    prompts = [
        ask("Hello, how are you today?"),
        ask(IMAGE, "Describe it."),
        ask("First", IMAGE, "then", IMAGE, "compare."),
    ]
    images = [None, picture(50, 30, 4), [picture(20, 60, 5), picture(33, 33, 6)]]
    calls = []  # the vision transformer's passes
    hook = engine.runner.vision.visual.register_forward_hook(lambda *args: calls.append(1))
    try:
        outs = generate(engine, prompts, images)
    finally:
        hook.remove()
    assert len(calls) == 1  # the three images of the step (two prompts) in one pass
    expected = [[], [images[1]], images[2]]
    for prompt, imgs, out in zip(prompts, expected, outs, strict=True):
        assert_equals_hf(out, hf(prompt, imgs))
    assert_kv_all_free(engine)


def test_n_2_shares_one_encoding_and_equals_hf(engine, hf):
    prompt = ask(IMAGE, "Twice?")
    image = picture(44, 36, 7)
    encoded = engine.scheduler.batcher.images.num_encoded
    params = {**GREEDY, "max_new_tokens": N, "n": 2}
    outs = engine.generate(
        prompt, params, image_data=image, return_logprob=True, top_logprobs_num=TOP
    )
    assert engine.scheduler.batcher.images.num_encoded == encoded + 1
    expected = hf(prompt, [image])
    for out in outs:
        assert_equals_hf(out, expected)


@pytest.mark.parametrize("chunk", [5, 16])
def test_chunked_prefill_cutting_images_equals_hf(vlm_dir, hf, chunk):
    prompts = [
        ask(IMAGE, "What is in the picture?"),
        ask("Look:", IMAGE, "and", IMAGE, "?"),
        ask("No picture here."),
    ]
    images = [WIDE, [TALL, SQUARE], None]
    with plait.Engine(
        model=vlm_dir, max_total_tokens=2048, chunked_prefill_size=chunk, disable_radix_cache=True
    ) as eng:
        outs = generate(eng, prompts, images)
        assert eng.get_stats()["num_forward_passes"] > 70 // chunk  # the prompts took chunks
        assert_kv_all_free(eng)
    for prompt, imgs, out in zip(prompts, [[WIDE], [TALL, SQUARE], []], outs, strict=True):
        assert_equals_hf(out, hf(prompt, imgs))


def test_the_same_image_again_reuses_its_prefix(engine, hf):
    prompt = ask(IMAGE, "Once more?")
    first = generate(engine, prompt, SQUARE)
    again = generate(engine, prompt, SQUARE)
    n = again["meta_info"]["prompt_tokens"]
    # all but the last two tokens (return_logprob scores the last prompt token again)
    assert again["meta_info"]["cached_tokens"] == n - 2
    assert_equals_hf(again, hf(prompt, [SQUARE]))
    assert again["output_ids"] == first["output_ids"]
    assert_kv_all_free(engine)


def test_placeholders_must_match_the_images(engine):
    with pytest.raises(RequestError, match="1 '<.vision_start.><.image_pad.><.vision_end.>' pl"):
        generate(engine, ask(IMAGE, "two?"), [WIDE, TALL])
    with pytest.raises(RequestError, match="0 '<.vision_start.>"):
        generate(engine, ask("<|image_pad|>", "bare pad?"), [WIDE])
    assert_kv_all_free(engine)
    assert engine.chat_template.image_token == IMAGE  # what the DSL writes per image


# ---- the positions ---------------------------------------------------------------------------


def test_prompt_positions_equal_transformers_rope_index(hf):
    prompt = ask("a", IMAGE, "b c", IMAGE, IMAGE, "d")
    images = [WIDE, TALL, SQUARE]
    processed = Qwen2VLInputs(hf.processor)(prompt, [load_image(im) for im in images])
    inputs = hf.processor(text=[prompt], images=images, return_tensors="pt")
    assert processed.input_ids == inputs["input_ids"][0].tolist()
    positions, delta = hf.model.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], inputs["image_grid_thw"]
    )
    assert torch.equal(processed.mrope_positions, positions[:, 0])
    assert processed.mrope_delta == delta.item() < 0
    assert [item.meta["grid"] for item in processed.images] == [(1, 4, 5), (1, 7, 3), (1, 4, 4)]


def test_mrope_positions_of_a_prompt():
    """Text counts up; an image of a 2x3 grid sits at (start, start + row, start + col)
    and the text after it resumes at start + 3."""
    positions, delta = mrope_positions(10, [(2, (1, 2, 3))])
    assert positions.tolist() == [
        [0, 1, 2, 2, 2, 2, 2, 2, 5, 6],
        [0, 1, 2, 2, 2, 3, 3, 3, 5, 6],
        [0, 1, 2, 3, 4, 2, 3, 4, 5, 6],
    ]
    assert delta == 7 - 10


def test_a_step_takes_the_columns_of_its_chunk():
    """A chunk takes its slice of the prompt's table; generated tokens and text-only
    requests sit at index + delta on all three axes; no table in the step: None."""
    table = torch.arange(15).reshape(3, 5)
    image = SimpleNamespace(mrope_positions=table, mrope_delta=-2)
    text = SimpleNamespace(mrope_positions=None, mrope_delta=0)
    plan = [
        SimpleNamespace(req=image, start=3, extend=4),  # prompt columns 3, 4 then generated
        SimpleNamespace(req=text, start=6, extend=1),
    ]
    positions = torch.tensor([3, 4, 5, 6, 6])
    assert step_positions(plan, positions).tolist() == [
        [3, 4, 3, 4, 6],
        [8, 9, 3, 4, 6],
        [13, 14, 3, 4, 6],
    ]
    assert step_positions(plan[1:], positions[4:]) is None


def test_the_language_model_config_of_real_shaped_checkpoints():
    """A Qwen2-VL config in transformers 4's layout (``rope_scaling`` of type mrope at the
    top) and a Qwen2.5-VL config giving no sections (transformers' default applies)."""
    qwen2_vl = transformers.Qwen2VLConfig(
        architectures=["Qwen2VLForConditionalGeneration"],
        hidden_size=1536,
        num_attention_heads=12,
        num_key_value_heads=2,
        rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
        rope_theta=1000000.0,
    )
    cfg = ModelConfig.from_hf(qwen2_vl)
    assert (cfg.head_dim, cfg.num_kv_heads, cfg.attention_bias) == (128, 2, True)
    assert (cfg.mrope_section, cfg.rope_scaling, cfg.rope_theta) == ((16, 24, 24), None, 1e6)
    qwen2_5_vl = transformers.Qwen2_5_VLConfig(architectures=["Qwen2_5_VLForConditionalGeneration"])
    assert ModelConfig.from_hf(qwen2_5_vl).mrope_section == (16, 24, 24)
