"""What a vision-language model reuses, on a tiny random Idefics3: the prefix cache keys
image placeholders by the image's content hash (the same image in the same place shares
the prefix, another image diverges at its first placeholder, a multi-turn chat reuses the
whole earlier conversation), and the vision-embedding cache runs the encoder once per
distinct image within its byte budget."""

from __future__ import annotations

import pytest
from common import GREEDY, assert_kv_all_free
from pictures import SQUARE, TALL, WIDE, ask, picture, png

import plait
from plait.multimodal.image import load_image

N = 8


@pytest.fixture(scope="module")
def vlm_dir(idefics3_dir) -> str:
    return idefics3_dir


@pytest.fixture(scope="module")
def hf_greedy(idefics3_hf_greedy):
    return lambda prompt, images: idefics3_hf_greedy(prompt, images, N)


def greedy(**extra) -> dict:
    return {**GREEDY, "max_new_tokens": N, **extra}


def prompt_ids(eng: plait.Engine, text: str, images: list) -> list[int]:
    """The prompt's ids with its placeholders expanded, as the engine computes them."""
    return eng.image_inputs(text, [load_image(im) for im in images]).input_ids


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def check_all_free(eng: plait.Engine) -> None:
    eng._call(eng.scheduler.cache.check_integrity)  # on the loop thread
    assert_kv_all_free(eng)
    assert eng.get_stats()["mm_cache_bytes"] == 0  # the flush dropped the embeddings too


def test_the_same_image_shares_its_prefix_and_another_image_diverges_at_it(vlm_dir):
    prompt = ask("Please look closely at this:", "<image>", "What is in the picture?")
    with plait.Engine(model=vlm_dir, max_total_tokens=2048) as eng:
        first = eng.generate(prompt, greedy(), image_data=WIDE)
        assert eng.get_stats()["num_images_encoded"] == 1
        again = eng.generate(prompt, greedy(), image_data=png(WIDE))  # same pixels, as bytes
        n = again["meta_info"]["prompt_tokens"]
        assert again["meta_info"]["cached_tokens"] == n - 1
        assert again["output_ids"] == first["output_ids"]
        stats = eng.get_stats()
        # every placeholder came from the prefix cache: no encode, not even a lookup
        assert stats["num_images_encoded"] == 1 and stats["mm_cache_hits"] == 0

        other = eng.generate(prompt, greedy(), image_data=TALL)
        ids = prompt_ids(eng, prompt, [TALL])
        first_placeholder = ids.index(eng.image_inputs.image_token_id)
        # the text before the image is shared, the image span is not
        assert other["meta_info"]["cached_tokens"] == first_placeholder > 0
        assert eng.get_stats()["num_images_encoded"] == 2

        # a text-only prompt with the same opening shares it with the image requests
        text = eng.generate(ask("Please look closely at this: nothing."), greedy())
        assert text["meta_info"]["cached_tokens"] > 0
        check_all_free(eng)


def test_a_multi_turn_chat_reuses_the_whole_earlier_conversation(vlm_dir, hf_greedy):
    turn1 = ask("<image>", "What is in the picture?")
    with plait.Engine(model=vlm_dir, max_total_tokens=2048) as eng:
        out1 = eng.generate(turn1, greedy(), image_data=SQUARE)
        turn2 = turn1 + out1["text"] + "<end_of_utterance>\n" + ask("And the colours?")
        out2 = eng.generate(turn2, greedy(), image_data=SQUARE)
        # the first turn's prompt and answer (image included) are in the cache, up to
        # where re-tokenizing the answer's text may differ from the generated ids
        computed = prompt_ids(eng, turn1, [SQUARE]) + out1["output_ids"][:-1]
        ids2 = prompt_ids(eng, turn2, [SQUARE])
        expected = min(common_prefix(computed, ids2), len(ids2) - 1)
        assert out2["meta_info"]["cached_tokens"] == expected
        assert expected >= out1["meta_info"]["prompt_tokens"]  # the image span and beyond
        assert eng.get_stats()["num_images_encoded"] == 1
        assert out2["output_ids"] == hf_greedy(turn2, [SQUARE])
        check_all_free(eng)


def test_one_image_used_by_eight_requests_is_encoded_once(vlm_dir):
    """Different text before the image: the prefix cache cannot cover the image, the
    embedding cache does (also within one batch)."""
    prompts = [ask(f"Question {i}:", "<image>", "Describe it.") for i in range(8)]
    with plait.Engine(model=vlm_dir, max_total_tokens=4096) as eng:
        solo = [eng.generate(p, greedy(), image_data=WIDE)["output_ids"] for p in prompts[:2]]
        assert eng.get_stats()["num_images_encoded"] == 1
        outs = eng.generate(prompts, greedy(), image_data=[WIDE] * 8)
        stats = eng.get_stats()
        assert stats["num_images_encoded"] == 1
        assert stats["mm_cache_misses"] == 1 and stats["mm_cache_hits"] >= 7
        assert [o["output_ids"] for o in outs[:2]] == solo
        check_all_free(eng)


def test_the_embedding_cache_keeps_its_byte_bound(vlm_dir):
    """A budget that holds about two images: older ones are evicted, the bound holds, and
    an evicted image is encoded again when it comes back."""
    images = [picture(30, 30, 10 + i) for i in range(4)]  # unsplit: one view each
    with plait.Engine(model=vlm_dir, max_total_tokens=4096) as eng:
        eng.generate(ask("<image>", "?"), greedy(max_new_tokens=1), image_data=images[0])
        one = eng.get_stats()["mm_cache_bytes"]
    budget_gb = 2.5 * one / 2**30
    with plait.Engine(model=vlm_dir, max_total_tokens=4096, mm_cache_memory_gb=budget_gb) as eng:
        for i, image in enumerate(images):
            eng.generate(ask(f"{i}:", "<image>", "?"), greedy(), image_data=image)
            stats = eng.get_stats()
            assert stats["mm_cache_bytes"] <= stats["mm_cache_capacity_bytes"]
        assert stats["mm_cache_entries"] == 2 and stats["mm_cache_evictions"] == 2
        eng.generate(ask("again:", "<image>", "?"), greedy(), image_data=images[0])
        assert eng.get_stats()["num_images_encoded"] == 5  # evicted, so encoded again
        eng.generate(ask("and:", "<image>", "?"), greedy(), image_data=images[3])
        assert eng.get_stats()["num_images_encoded"] == 5  # still held
        check_all_free(eng)


def test_a_zero_budget_keeps_nothing_and_still_serves(vlm_dir, hf_greedy):
    prompt = ask("x", "<image>", "?")
    with plait.Engine(model=vlm_dir, max_total_tokens=2048, mm_cache_memory_gb=0) as eng:
        out = eng.generate(prompt, greedy(), image_data=TALL)
        eng.generate(ask("y", "<image>", "?"), greedy(), image_data=TALL)
        stats = eng.get_stats()
        assert stats["mm_cache_bytes"] == 0 and stats["num_images_encoded"] == 2
    assert out["output_ids"] == hf_greedy(prompt, [TALL])


def test_image_figures_reach_server_info_and_metrics(vlm_dir):
    from fastapi.testclient import TestClient
    from prometheus_client.parser import text_string_to_metric_families

    from plait.runtime.server import create_app

    with plait.Engine(model=vlm_dir, max_total_tokens=2048) as eng:
        eng.generate(ask("a", "<image>"), greedy(), image_data=WIDE)
        eng.generate(ask("b", "<image>"), greedy(), image_data=WIDE)
        with TestClient(create_app(eng)) as client:
            info = client.get("/get_server_info").json()["internal_states"][0]
            assert info["num_images_encoded"] == 1
            assert info["mm_cache_misses"] == 1 and info["mm_cache_hits"] == 1
            assert info["mm_cache_bytes"] > 0
            text = client.get("/metrics").text
        samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
        assert samples["plait_mm_cache_hits_total"] == 1
        assert samples["plait_mm_cache_misses_total"] == 1
        assert samples["plait_mm_cache_bytes"] == info["mm_cache_bytes"]
