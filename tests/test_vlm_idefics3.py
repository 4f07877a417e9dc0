"""Idefics3 / SmolVLM on plait's runtime, exact against HF transformers on a tiny random
model saved with its processor: images through ``Engine.generate(image_data=...)``, the
language model on plait's own code, image embeddings spliced at the placeholders (also
when chunked prefill cuts an image), and image requests kept apart in the prefix cache."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import torch
from common import GREEDY, assert_kv_all_free
from pictures import SQUARE, TALL, WIDE, ask, bomb_png, picture, png

import plait
from plait.multimodal.vision import ImageItem
from plait.runtime.errors import RequestError
from plait.runtime.inputs import TEXT_ONLY, image_data_lists
from plait.runtime.scheduler.images import ImageSplicer

N = 12  # new tokens per request


@pytest.fixture(scope="module")
def vlm_dir(idefics3_dir) -> str:
    return idefics3_dir


@pytest.fixture(scope="module")
def hf_greedy(idefics3_hf_greedy):
    """``hf_greedy(prompt, images) -> ids``: transformers' greedy continuation."""
    return lambda prompt, images: idefics3_hf_greedy(prompt, images, N)


@pytest.fixture(scope="module")
def engine(vlm_dir):
    with plait.Engine(model=vlm_dir, max_total_tokens=2048, max_running_requests=8) as eng:
        yield eng


def greedy(**extra) -> dict:
    return {**GREEDY, "max_new_tokens": N, **extra}


# ---- exact against transformers --------------------------------------------------------------


def test_one_image_equals_hf(engine, hf_greedy):
    prompt = ask("<image>", "What is in the picture?")
    out = engine.generate(prompt, greedy(), image_data=WIDE)
    assert out["output_ids"] == hf_greedy(prompt, [WIDE])
    # the prompt holds the expanded placeholders: 2x2 tiles + global view, 4 tokens each
    assert out["meta_info"]["prompt_tokens"] > 5 * 4


def test_two_images_in_one_prompt_equal_hf(engine, hf_greedy):
    prompt = ask("<image>", "and", "<image>", "Which is taller?")
    out = engine.generate(prompt, greedy(), image_data=[png(TALL), SQUARE])
    assert out["output_ids"] == hf_greedy(prompt, [TALL, SQUARE])


def test_logprobs_over_the_prompt_and_output_equal_hf(engine, idefics3_hf_logprobs):
    prompt = ask("Look:", "<image>", "and", "<image>", "Which is wider?")
    out = engine.generate(
        prompt,
        greedy(),
        image_data=[WIDE, TALL],
        return_logprob=True,
        logprob_start_len=0,
        top_logprobs_num=3,
    )
    ids, ref = idefics3_hf_logprobs(prompt, [WIDE, TALL], out["output_ids"])
    meta = out["meta_info"]
    inp, outp = meta["input_token_logprobs"], meta["output_token_logprobs"]
    assert [t for _, t, _ in inp] == ids and [t for _, t, _ in outp] == out["output_ids"]
    for i in range(1, len(ids)):  # image placeholders included
        assert inp[i][0] == pytest.approx(ref[i - 1, ids[i]].item(), abs=1e-4)
    for j, (lp, tok, _) in enumerate(outp):
        assert lp == pytest.approx(ref[len(ids) - 1 + j, tok].item(), abs=1e-4)
        top = meta["output_top_logprobs"][j]
        assert [t for _, t, _ in top] == ref[len(ids) - 1 + j].topk(3).indices.tolist()


def test_images_in_two_turns_equal_hf(engine, hf_greedy):
    """A second user turn shows another image; the first turn's image stays in the prompt."""
    first = ask("<image>", "What is this?")
    answer = engine.generate(first, greedy(), image_data=WIDE)["text"]
    second = first + answer + "<end_of_utterance>\n" + ask("<image>", "And this one?")
    out = engine.generate(second, greedy(), image_data=[WIDE, SQUARE])
    assert out["output_ids"] == hf_greedy(second, [WIDE, SQUARE])
    assert out["meta_info"]["cached_tokens"] > 0  # the first turn came from the cache


def test_a_batch_mixing_text_and_images_equals_hf(engine, hf_greedy, tmp_path):
    path = tmp_path / "wide.png"
    WIDE.save(path)
    prompts = [
        ask("Hello, how are you today?"),
        ask("<image>", "Describe it."),
        ask("First", "<image>", "then", "<image>", "compare."),
    ]
    images = [None, str(path), [SQUARE, TALL]]
    outs = engine.generate(prompts, greedy(), image_data=images)
    expected = [[], [WIDE], [SQUARE, TALL]]
    for prompt, imgs, out in zip(prompts, expected, outs, strict=True):
        assert out["output_ids"] == hf_greedy(prompt, imgs), prompt


def test_async_generate_with_n_2_shares_one_encoding(engine, hf_greedy):
    """Both requests of an n=2 prompt see the image (encoded once, shared by the two)."""
    prompt = ask("<image>", "Once more?")
    fresh = picture(36, 36, 7)  # no earlier test showed it
    encoded = engine.get_stats()["num_images_encoded"]
    outs = asyncio.run(engine.async_generate(prompt, greedy(n=2), image_data=fresh))
    assert engine.get_stats()["num_images_encoded"] == encoded + 1
    expected = hf_greedy(prompt, [fresh])
    assert [out["output_ids"] for out in outs] == [expected, expected]


def test_different_images_give_different_continuations(engine):
    """The images reach the model: the same text about two pictures diverges."""
    prompt = ask("<image>", "What is in the picture?")
    a = engine.generate(prompt, greedy(), return_logprob=True, image_data=WIDE)
    b = engine.generate(prompt, greedy(), return_logprob=True, image_data=TALL)
    assert a["meta_info"]["output_token_logprobs"] != b["meta_info"]["output_token_logprobs"]


@pytest.mark.parametrize("chunk", [3, 7])
def test_chunked_prefill_cutting_images_gives_the_same_ids(vlm_dir, hf_greedy, chunk):
    prompts = [ask("<image>", "What is in the picture?"), ask("<image>", "and", "<image>", "?")]
    images = [WIDE, [TALL, SQUARE]]
    with plait.Engine(
        model=vlm_dir, max_total_tokens=2048, chunked_prefill_size=chunk, disable_radix_cache=True
    ) as eng:
        outs = eng.generate(prompts, greedy(), image_data=images)
        assert eng.get_stats()["num_forward_passes"] > 60 // chunk  # the prompts took chunks
    assert outs[0]["output_ids"] == hf_greedy(prompts[0], [WIDE])
    assert outs[1]["output_ids"] == hf_greedy(prompts[1], [TALL, SQUARE])


def test_a_step_takes_the_slice_of_an_image_it_covers():
    """The splicer writes an image's rows at its placeholders inside the step's range only
    (a chunk cutting the image takes a slice), and encodes each new image once."""
    calls = []

    def encode(pixels):
        calls.append(len(pixels))
        return [p["rows"] for p in pixels]

    splicer = ImageSplicer(lambda ids: ids.float()[:, None].repeat(1, 2), encode)
    image = ImageItem("a", [2, 3, 5, 6], {"rows": torch.arange(10.0, 14.0)[:, None].repeat(1, 2)})
    other = ImageItem("b", [0, 1], {"rows": torch.full((2, 2), -1.0)})
    plan = [
        SimpleNamespace(req=SimpleNamespace(image_items=[image]), start=3, extend=3),
        SimpleNamespace(req=SimpleNamespace(image_items=[other]), start=0, extend=2),
    ]
    ids = torch.tensor([7, 8, 9, 20, 21])
    embeds = splicer.input_embeds(plan, ids)
    assert embeds[:, 0].tolist() == [11.0, 8.0, 12.0, -1.0, -1.0]
    assert calls == [2] and image.pixels is None and splicer.num_encoded == 2
    plan[0].start, plan[0].extend = 6, 1
    assert splicer.input_embeds(plan[:1], torch.tensor([5]))[:, 0].tolist() == [13.0]
    assert calls == [2]  # already encoded
    plan[0].start = 7  # decoding: no placeholder left
    assert splicer.input_embeds(plan[:1], torch.tensor([5])) is None


# ---- bad input ---------------------------------------------------------------------------------


def test_placeholders_must_match_the_images(engine):
    with pytest.raises(RequestError, match="1 '<image>' placeholders for 2 images") as err:
        engine.generate(ask("<image>", "two?"), greedy(), image_data=[WIDE, TALL])
    assert err.value.field == "images"
    with pytest.raises(RequestError, match="placeholders for 0 images"):
        engine.generate(ask("<image>", "none?"), greedy())
    with pytest.raises(RequestError, match=r"images\[1\]"):
        engine.generate([ask("a"), ask("b")], greedy(), image_data=[None, WIDE])
    assert_kv_all_free(engine)


def test_unreadable_images_and_token_ids_are_refused(engine):
    with pytest.raises(RequestError, match="not a readable image") as err:
        engine.generate(ask("<image>"), greedy(), image_data=b"not an image")
    assert err.value.field == "images[0]"
    with pytest.raises(RequestError, match="images need the prompt as text") as err:
        engine.generate(input_ids=[1, 2, 3], sampling_params=greedy(), image_data=WIDE)
    assert err.value.field == "input_ids"
    assert_kv_all_free(engine)


def test_images_on_a_text_model_are_refused(tiny_model_dir):
    with (
        plait.Engine(model=tiny_model_dir("llama"), max_total_tokens=256) as eng,
        pytest.raises(RequestError) as err,
    ):
        eng.generate("Look:", greedy(), image_data=WIDE)
    assert err.value.field == "images"
    assert err.value.reason == TEXT_ONLY


def test_image_data_takes_sglang_shapes():
    assert image_data_lists(None, "a", None) is None
    assert image_data_lists("x.png", "a", None) == [["x.png"]]
    assert image_data_lists(["x", "y"], "a", None) == [["x", "y"]]
    assert image_data_lists(["x", None, ["y", "z"]], ["a", "b", "c"], None) == [
        ["x"],
        [],
        ["y", "z"],
    ]
    assert image_data_lists("x", None, [1, 2]) == [["x"]]
    with pytest.raises(RequestError, match="one entry per prompt"):
        image_data_lists("x", ["a", "b"], None)


def test_broken_images_are_refused_and_nothing_leaks(engine, vlm_dir):
    """Truncated bytes, a decompression bomb, an odd mode and image tokens past the
    context: each a RequestError naming the image; the engine keeps serving."""
    truncated = png(WIDE)[:200]
    with pytest.raises(RequestError, match="truncated|not a readable image") as err:
        engine.generate(ask("<image>"), greedy(), image_data=[truncated])
    assert err.value.field == "images[0]"

    with pytest.raises(RequestError, match="decompression bomb") as err:
        engine.generate(
            ask("a", "<image>", "b", "<image>"), greedy(), image_data=[WIDE, bomb_png()]
        )
    assert err.value.field == "images[1]"

    cmyk = WIDE.convert("CMYK")  # converted to RGB like transformers does: still one image
    out = engine.generate(ask("<image>", "?"), greedy(), image_data=cmyk)
    assert out["meta_info"]["completion_tokens"] == N

    with plait.Engine(model=vlm_dir, max_total_tokens=2048, context_length=48) as small:
        with pytest.raises(RequestError, match="context") as err:
            small.generate(ask("<image>", "?"), greedy(), image_data=WIDE)  # 5 views x 4
        assert err.value.field in ("input_ids", "prompt", "text")
        assert_kv_all_free(small)
    assert engine.generate(ask("<image>", "?"), greedy(), image_data=SQUARE)["output_ids"]
    assert_kv_all_free(engine)
