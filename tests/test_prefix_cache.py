"""The radix prefix cache under the engine: same tokens with and without it,
real reuse (cached_tokens), and every KV slot back after aborts and a flush."""

from __future__ import annotations

import random
import threading

import pytest
from common import GREEDY

import plait
from plait.runtime.inputs import GenerateInput

SHARED = (
    "You are a careful assistant. Answer each question with one short sentence. "
    "Question: what is the colour of the sky? Answer: blue. "
)
QUESTIONS = ["Question: what is two plus two?", "Question: name a fruit.", "Question: hello?"]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> str:
    return tiny_model_dir("llama", tie_word_embeddings=True, num_key_value_heads=2)


def run_workload(
    model_dir: str, prompts: list[str], **options
) -> tuple[list[list[int]], list[int]]:
    """Each prompt one after the other (so later ones can hit the cache), then all of
    them again as one batch; returns output ids and cached token counts."""
    with plait.Engine(model=model_dir, max_total_tokens=4096, **options) as eng:
        params = {**GREEDY, "max_new_tokens": 10}
        outs = [eng.generate(p, params) for p in prompts]
        outs += eng.generate(prompts, params)
        eng.scheduler.cache.check_integrity()
        return [o["output_ids"] for o in outs], [o["meta_info"]["cached_tokens"] for o in outs]


@pytest.mark.parametrize(
    "prompts",
    [
        [SHARED + q for q in QUESTIONS],
        [SHARED[:40], SHARED[:80], SHARED, SHARED + QUESTIONS[0]],  # prefixes of each other
        [SHARED + QUESTIONS[0], SHARED[:60]],  # a shorter prompt inside a cached one
    ],
    ids=["shared-prefix", "nested-prefixes", "prompt-inside-cached"],
)
@pytest.mark.parametrize("chunk", [2048, 7], ids=["whole-prefill", "chunk-7"])
def test_same_tokens_with_and_without_cache(model_dir, prompts, chunk):
    radix, cached = run_workload(model_dir, prompts, chunked_prefill_size=chunk)
    plain, uncached = run_workload(
        model_dir, prompts, chunked_prefill_size=chunk, disable_radix_cache=True
    )
    assert radix == plain
    assert sum(cached) > 0 and sum(uncached) == 0


def test_cached_tokens_counts_the_reused_prefix(model_dir):
    with plait.Engine(model=model_dir, max_total_tokens=4096) as eng:
        ids = eng.tokenizer.encode(SHARED + QUESTIONS[0])
        first = eng.generate(input_ids=ids, sampling_params={**GREEDY, "max_new_tokens": 4})
        again = eng.generate(input_ids=ids, sampling_params={**GREEDY, "max_new_tokens": 4})
        assert first["meta_info"]["cached_tokens"] == 0
        assert again["meta_info"]["cached_tokens"] == len(ids) - 1  # one token is always computed
        assert again["output_ids"] == first["output_ids"]
        assert eng.get_stats()["cache_hit_rate"] > 0


def test_max_new_tokens_zero_caches_the_prompt(model_dir):
    with plait.Engine(model=model_dir, max_total_tokens=4096) as eng:
        prefix = eng.tokenizer.encode(SHARED)
        eng.generate(input_ids=prefix, sampling_params={"max_new_tokens": 0})
        out = eng.generate(
            input_ids=prefix + [5, 6, 7], sampling_params={**GREEDY, "max_new_tokens": 3}
        )
        assert out["meta_info"]["cached_tokens"] == len(prefix)


def test_input_logprobs_are_not_taken_from_the_cache(model_dir):
    with plait.Engine(model=model_dir, max_total_tokens=4096) as eng:
        ids = eng.tokenizer.encode(SHARED)
        args = dict(
            sampling_params={**GREEDY, "max_new_tokens": 2},
            return_logprob=True,
            logprob_start_len=5,
        )
        cold = eng.generate(input_ids=ids, **args)
        warm = eng.generate(input_ids=ids, **args)
        assert warm["meta_info"]["cached_tokens"] == 4  # capped at logprob_start_len - 1
        cold_lp, warm_lp = (o["meta_info"]["input_token_logprobs"] for o in (cold, warm))
        assert [t for _, t, _ in warm_lp] == [t for _, t, _ in cold_lp] == ids[5:]
        assert [v for v, _, _ in warm_lp] == pytest.approx([v for v, _, _ in cold_lp], abs=1e-5)


def test_requests_sharing_an_uncached_prefix_compute_it_once(model_dir):
    with plait.Engine(model=model_dir, max_total_tokens=4096) as eng:
        outs = eng.generate([SHARED + q for q in QUESTIONS], {**GREEDY, "max_new_tokens": 3})
        cached = [o["meta_info"]["cached_tokens"] for o in outs]
        assert cached[0] == 0 and all(
            c >= len(eng.tokenizer.encode(SHARED)) - 2 for c in cached[1:]
        )


def test_random_aborts_at_every_stage_free_every_slot(model_dir):
    rng = random.Random(0)
    with plait.Engine(
        model=model_dir, max_total_tokens=1024, chunked_prefill_size=16, max_running_requests=4
    ) as eng:

        def client(i: int) -> None:
            prompt = SHARED * rng.randint(1, 3) + QUESTIONS[i % 3]
            params = {**GREEDY, "max_new_tokens": rng.randint(1, 40)}
            stream = eng.generate(prompt, params, stream=True, rid=f"r{i}")
            for k, _ in enumerate(stream):
                if k == rng.randint(0, 5):
                    stream.close()  # mid-decode
                    break

        threads = [threading.Thread(target=client, args=(i,)) for i in range(24)]
        for t in threads:
            t.start()
        for i in range(0, 24, 3):  # aborts that may land while queued or prefilling
            eng.abort(f"r{i}")
        for t in threads:
            t.join()
        stats = eng.get_stats()
        assert stats["num_running_reqs"] == stats["num_waiting_reqs"] == 0
        assert stats["kv_slots_used"] == stats["cache_tokens"]
        eng.scheduler.cache.check_integrity()
        assert eng.flush_cache()
        assert eng.get_stats()["kv_slots_used"] == 0


def test_lpm_admits_the_longest_cached_prefix_first(model_dir):
    for policy, expected_first in (("lpm", "cached"), ("fcfs", "other")):
        eng = plait.Engine(
            model=model_dir, max_total_tokens=4096, max_running_requests=1, schedule_policy=policy
        )
        eng.generate(SHARED, {"max_new_tokens": 0})  # cache the shared prefix
        inp = GenerateInput(
            prompt=["Something unrelated entirely", SHARED + QUESTIONS[0]],
            sampling_params={**GREEDY, "max_new_tokens": 2},
            rid=["other", "cached"],
        )
        reqs, _ = eng._make_requests(inp, sinks=None)
        eng.shutdown()  # stop the loop thread and drive the scheduler by hand
        for r in reqs:
            eng.scheduler.add(r)
        plan = eng.scheduler.batcher.plan()
        assert [p.req.rid for p in plan] == [expected_first], policy
