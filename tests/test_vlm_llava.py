"""LLaVA on plait's runtime, exact against HF transformers on tiny random models saved with
their processors: a Llama language model behind a CLIP encoder (one feature layer, CLS row
dropped), a Qwen2 one behind SigLIP (two feature layers, every row kept) and a Mistral one
behind CLIP (BakLLaVA's pairing). Greedy ids and the logprobs of every output token (and
its top alternatives) equal transformers' ``generate`` for one image, several images,
images in two turns, a batch mixing text and images, and chunked prefill cutting an image;
each image runs through the encoder once."""

from __future__ import annotations

import asyncio
import copy

import numpy as np
import pytest
import torch
from common import GREEDY, assert_kv_all_free
from PIL import Image
from tiny_models import make_tiny_llava
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    CLIPVisionConfig,
    LlavaConfig,
    MistralConfig,
)

import plait
from plait.multimodal.image import load_image
from plait.multimodal.vision import process_prompt
from plait.runtime.chat_template import ChatTemplate
from plait.runtime.config import ModelConfig
from plait.runtime.errors import RequestError
from plait.runtime.models.llava import LlavaInputs, LlavaVision

N = 10  # new tokens per request
TOP = 3  # top logprobs compared per output token
ATOL = 1e-4


def picture(width: int, height: int, seed: int) -> Image.Image:
    """A deterministic noise picture."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def ask(*parts: str) -> str:
    """A llava-1.5-style user turn (``<image>`` where each image goes) and the answer cue."""
    return "USER: " + "".join(parts) + " ASSISTANT:"


@pytest.fixture(
    scope="module",
    params=[("llama", "clip"), ("qwen2", "siglip"), ("mistral", "clip")],
    ids="-".join,
)
def vlm_dir(request, tmp_path_factory) -> str:
    text, vision = request.param
    return make_tiny_llava(
        tmp_path_factory.mktemp(f"llava_{text}_{vision}"), text=text, vision=vision
    )


@pytest.fixture(scope="module")
def hf_model(vlm_dir):
    return AutoModelForImageTextToText.from_pretrained(vlm_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_run(vlm_dir, hf_model):
    """``hf_run(prompt, images) -> (ids, logprobs [N, vocab])``: transformers' greedy
    continuation and the log-softmax of its raw logits at each step (no EOS stop)."""
    processor = AutoProcessor.from_pretrained(vlm_dir)
    config = copy.deepcopy(hf_model.generation_config)
    config.eos_token_id = None  # like ignore_eos: N tokens, no EOS masking in the logits

    def run(prompt: str, images: list[Image.Image]) -> tuple[list[int], torch.Tensor]:
        inputs = processor(text=[prompt], images=images or None, return_tensors="pt")
        out = hf_model.generate(
            **inputs,
            generation_config=config,
            max_new_tokens=N,
            do_sample=False,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
        ids = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
        logprobs = torch.log_softmax(torch.cat(out.logits).float(), dim=-1)
        return ids, logprobs

    return run


@pytest.fixture(scope="module")
def engine(vlm_dir):
    with plait.Engine(model=vlm_dir, max_total_tokens=2048, max_running_requests=8) as eng:
        yield eng


def greedy(**extra) -> dict:
    return {**GREEDY, "max_new_tokens": N, **extra}


def generate(eng, prompts, images):
    """plait's greedy outputs with logprobs, and how many images the encoder ran on."""
    splicer = eng.scheduler.batcher.images
    before = splicer.num_encoded
    out = eng.generate(
        prompts, greedy(), image_data=images, return_logprob=True, top_logprobs_num=TOP
    )
    return out, splicer.num_encoded - before


def assert_equals_hf(out: dict, expected: tuple[list[int], torch.Tensor]) -> None:
    """Same ids; each token's logprob and its top alternatives equal transformers'."""
    ids, ref = expected
    assert out["output_ids"] == ids
    meta = out["meta_info"]
    assert [t for _, t, _ in meta["output_token_logprobs"]] == ids
    for j, ((lp, tok, _), top) in enumerate(
        zip(meta["output_token_logprobs"], meta["output_top_logprobs"], strict=True)
    ):
        assert lp == pytest.approx(ref[j, tok].item(), abs=ATOL)
        values, indices = ref[j].topk(TOP)
        assert [t for _, t, _ in top] == indices.tolist()
        assert [v for v, _, _ in top] == pytest.approx(values.tolist(), abs=ATOL)


# ---- the pieces against transformers' own ---------------------------------------------------


def test_the_language_model_config_is_the_text_config(vlm_dir):
    hf = AutoConfig.from_pretrained(vlm_dir)
    mc = ModelConfig.from_hf(hf)
    text = hf.text_config
    assert mc.architecture == "LlavaForConditionalGeneration" and mc.has_vision
    assert (mc.hidden_size, mc.num_layers, mc.num_kv_heads, mc.vocab_size) == (
        text.hidden_size,
        text.num_hidden_layers,
        text.num_key_value_heads,
        text.vocab_size,
    )
    assert mc.attention_bias == (text.model_type == "qwen2")  # Qwen2's q/k/v biases
    assert mc.sliding_window is None


def test_a_mistral_text_config_keeps_its_sliding_window():
    text = MistralConfig(hidden_size=64, num_attention_heads=4, sliding_window=128)
    config = LlavaConfig(text_config=text.to_dict(), vision_config=CLIPVisionConfig().to_dict())
    config.architectures = ["LlavaForConditionalGeneration"]
    mc = ModelConfig.from_hf(config)
    assert (mc.sliding_window, mc.hidden_size, mc.attention_bias) == (128, 64, False)


@pytest.mark.parametrize("strategy", ["default", "full"])
@pytest.mark.parametrize("layers", ["config", "first", "last"])
def test_vision_features_equal_get_image_features(hf_model, strategy, layers):
    """The encoder's rows equal ``get_image_features`` for any feature layer(s) and strategy."""
    configured = hf_model.config.vision_feature_layer  # the projector's width follows it
    if isinstance(configured, int):
        # (not layer 0: transformers' get_image_features then asks for no hidden states)
        chosen = {"config": configured, "first": 1, "last": -1}[layers]
    else:
        chosen = {"config": configured, "first": [0, 1], "last": [-2, -1]}[layers]
    inner = hf_model.model
    vision = LlavaVision(inner.vision_tower, inner.multi_modal_projector, chosen, strategy)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = inner.get_image_features(
            pixel_values=pixels,
            vision_feature_layer=chosen,
            vision_feature_select_strategy=strategy,
        ).pooler_output
    got = vision.encode([{"pixel_values": pixels[:1]}, {"pixel_values": pixels[1:]}])
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape and torch.allclose(g, e, atol=1e-6)


def test_the_processor_cuts_one_item_per_image(vlm_dir):
    """Side-by-side images: each item gets its own run of placeholders, as HF counts them."""
    inputs = LlavaInputs.from_pretrained(vlm_dir)
    loaded = [load_image(picture(40, 30, s)) for s in (1, 2)]
    processed = inputs(ask("<image><image>", "Two?"), loaded)
    first, second = processed.images
    assert first.num_tokens == second.num_tokens == 16  # 4x4 patches
    assert first.positions[-1] + 1 == second.positions[0]
    assert [processed.input_ids[i] for i in first.positions + second.positions] == [
        inputs.image_token_id
    ] * 32
    assert first.content_hash != second.content_hash
    # the processor itself refuses a count mismatch (whatever checked the prompt before)
    with pytest.raises(RequestError, match="number of images"):
        process_prompt(inputs, ask("<image><image>", "One?"), [picture(40, 30, 1)])


def test_a_processor_without_patch_size_is_refused_at_load(vlm_dir):
    processor = AutoProcessor.from_pretrained(vlm_dir)
    processor.patch_size = None  # an older processor_config.json
    with pytest.raises(ValueError, match="no patch_size"):
        LlavaInputs(processor)


def test_the_chat_template_gives_the_prompt_layout(vlm_dir):
    """The processor's template writes what ``ask`` writes, and plait cuts its roles."""
    processor = AutoProcessor.from_pretrained(vlm_dir)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]}]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert rendered == ask("<image>\n", "Hi?")
    template = ChatTemplate.from_tokenizer(AutoTokenizer.from_pretrained(vlm_dir))
    assert template.roles["user"] == ("USER: ", " ")
    assert template.roles["assistant"] == ("ASSISTANT:", "<|im_end|>")


# ---- exact against transformers ---------------------------------------------------------------


def test_one_image_equals_hf(engine, hf_run):
    image = picture(64, 48, 10)
    prompt = ask("<image>\n", "What is in the picture?")
    out, encoded = generate(engine, prompt, image)
    assert_equals_hf(out, hf_run(prompt, [image]))
    assert encoded == 1
    n = out["meta_info"]["prompt_tokens"]
    assert n > 16
    again, encoded = generate(engine, prompt, image)  # the same image: from the prefix cache
    # all but the last two prompt tokens (the last one's logprob is computed again)
    assert again["meta_info"]["cached_tokens"] == n - 2 and encoded == 0
    assert again["output_ids"] == out["output_ids"]
    assert_kv_all_free(engine)


def test_several_images_in_one_prompt_equal_hf(engine, hf_run):
    images = [picture(40, 80, 20), picture(30, 30, 21), picture(50, 20, 22)]
    prompt = ask("<image><image>\n", "and", "<image>", "Which is taller?")
    out, encoded = generate(engine, prompt, images)
    assert_equals_hf(out, hf_run(prompt, images))
    assert encoded == 3
    assert_kv_all_free(engine)


def test_images_in_two_turns_equal_hf(engine, hf_run):
    """A second user turn with another image, after the answer to the first (the first
    image stays in the prompt)."""
    first, second = picture(48, 48, 30), picture(36, 60, 31)
    turn1 = ask("<image>\n", "Describe it.")
    out1, encoded1 = generate(engine, turn1, first)
    assert_equals_hf(out1, hf_run(turn1, [first]))
    answer = engine.tokenizer.decode(out1["output_ids"])
    turn2 = turn1 + answer + "<|im_end|>" + ask("<image>\n", "And this one?")
    out2, encoded2 = generate(engine, turn2, [first, second])
    assert_equals_hf(out2, hf_run(turn2, [first, second]))
    # The prefix cache holds turn 1, first image included: only the new image is encoded.
    assert encoded1 == 1 and encoded2 == 1
    items = engine.image_inputs(turn2, [load_image(first), load_image(second)]).images
    assert out2["meta_info"]["cached_tokens"] > items[0].positions[-1]
    assert_kv_all_free(engine)


def test_a_batch_mixing_text_and_images_equals_hf(engine, hf_run):
    wide, tall, square = picture(64, 40, 40), picture(20, 70, 41), picture(33, 33, 42)
    prompts = [
        ask("Hello, how are you today?"),
        ask("<image>\n", "Describe it."),
        ask("First", "<image>", "then", "<image>", "compare."),
        ask("What is the capital of France?"),
    ]
    images = [None, wide, [square, tall], None]
    outs, encoded = generate(engine, prompts, images)
    expected = [[], [wide], [square, tall], []]
    for prompt, imgs, out in zip(prompts, expected, outs, strict=True):
        assert_equals_hf(out, hf_run(prompt, imgs))
    assert encoded == 3
    assert_kv_all_free(engine)


def test_the_same_image_after_other_text_comes_from_the_embedding_cache(engine, hf_run):
    """No shared prefix reaches the image, yet its encoder rows are reused."""
    image = picture(50, 50, 46)
    _, encoded1 = generate(engine, ask("<image>\n", "What is it?"), image)
    hits = engine.get_stats()["mm_cache_hits"]
    prompt = ask("Look at this:", "<image>\n", "What colour is it?")
    out, encoded2 = generate(engine, prompt, image)
    assert (encoded1, encoded2) == (1, 0)
    assert engine.get_stats()["mm_cache_hits"] == hits + 1
    (item,) = engine.image_inputs(prompt, [load_image(image)]).images
    assert out["meta_info"]["cached_tokens"] < item.offset  # the shared prefix ends before it
    assert_equals_hf(out, hf_run(prompt, [image]))
    assert_kv_all_free(engine)


def test_n_2_encodes_the_shared_image_once(engine, hf_run):
    """Both samples of an n=2 prompt share its image items: one encoder pass."""
    image = picture(44, 52, 45)
    prompt = ask("<image>\n", "Once more?")
    before = engine.scheduler.batcher.images.num_encoded
    outs = asyncio.run(engine.async_generate(prompt, greedy(n=2), image_data=image))
    assert engine.scheduler.batcher.images.num_encoded == before + 1
    expected, _ = hf_run(prompt, [image])
    assert [out["output_ids"] for out in outs] == [expected, expected]
    assert_kv_all_free(engine)


@pytest.mark.parametrize("chunk", [5, 11])
def test_chunked_prefill_cutting_images_equals_hf(vlm_dir, hf_run, chunk):
    """Chunks of 5 or 11 tokens cut the 16-token image spans; every image is still encoded
    once and its rows sliced to each chunk."""
    a, b, c = picture(64, 48, 50), picture(40, 80, 51), picture(30, 30, 52)
    prompts = [ask("<image>\n", "What is in the picture?"), ask("<image>", "and", "<image>", "?")]
    images = [a, [b, c]]
    with plait.Engine(
        model=vlm_dir, max_total_tokens=2048, chunked_prefill_size=chunk, disable_radix_cache=True
    ) as eng:
        outs, encoded = generate(eng, prompts, images)
        assert eng.get_stats()["num_forward_passes"] > 50 // chunk  # the prompts took chunks
        assert encoded == 3
        assert_kv_all_free(eng)
    assert_equals_hf(outs[0], hf_run(prompts[0], [a]))
    assert_equals_hf(outs[1], hf_run(prompts[1], [b, c]))


# ---- bad input -----------------------------------------------------------------------------------


def test_placeholders_must_match_the_images(engine):
    image = picture(32, 32, 60)
    with pytest.raises(RequestError, match="1 '<image>' placeholders for 2 images") as err:
        engine.generate(ask("<image>", "two?"), greedy(), image_data=[image, image])
    assert err.value.field == "images"
    with pytest.raises(RequestError, match="2 '<image>' placeholders for 1 images"):
        engine.generate(ask("<image><image>", "one?"), greedy(), image_data=image)
    with pytest.raises(RequestError, match="placeholders for 0 images"):
        engine.generate(ask("<image>", "none?"), greedy())
    with pytest.raises(RequestError, match=r"images\[1\]"):
        engine.generate([ask("a"), ask("b")], greedy(), image_data=[None, image])
    assert_kv_all_free(engine)
