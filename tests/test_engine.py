"""The engine on tiny random models: exact against HF transformers, and every
sampling, stopping, streaming and error behaviour of ``Engine.generate``."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from common import GREEDY, PROMPTS, assert_kv_all_free
from transformers import AutoModelForCausalLM, AutoTokenizer

import plait
from plait.runtime.errors import RequestError


def hf_greedy(model_dir: str, prompt: str, n: int) -> list[int]:
    tok = AutoTokenizer.from_pretrained(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = tok(prompt, return_tensors="pt").input_ids
    out = hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1] :].tolist()


# ---- exactness ---------------------------------------------------------------


@pytest.mark.parametrize(
    "arch,kwargs",
    [
        ("llama", {"tie_word_embeddings": True, "num_key_value_heads": 2}),
        ("llama", {"tie_word_embeddings": False, "num_key_value_heads": 4}),
        (
            "llama",
            {"num_key_value_heads": 1, "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
        ),
        (
            "llama",
            {
                "rope_scaling": {
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 64,
                }
            },
        ),
        ("qwen2", {"tie_word_embeddings": False, "num_key_value_heads": 2}),
        ("qwen2", {"tie_word_embeddings": True, "num_key_value_heads": 1}),
        ("mistral", {"num_key_value_heads": 2}),
    ],
    ids=[
        "llama-tied-gqa",
        "llama-untied-mha",
        "llama-mqa-linear-rope",
        "llama-llama3-rope",
        "qwen2-untied-gqa",
        "qwen2-tied-mqa",
        "mistral-gqa",
    ],
)
def test_greedy_batch_equals_hf(tiny_model_dir, arch, kwargs):
    model_dir = tiny_model_dir(arch, **kwargs)
    n = 24
    with plait.Engine(model=model_dir, max_total_tokens=2048) as eng:
        outs = eng.generate(PROMPTS, {**GREEDY, "max_new_tokens": n})
    for prompt, out in zip(PROMPTS, outs, strict=True):
        assert out["output_ids"] == hf_greedy(model_dir, prompt, n), prompt


@pytest.mark.parametrize(
    "arch,kwargs",
    [("llama", {"num_key_value_heads": 2}), ("mistral", {"sliding_window": 6})],
    ids=["llama-gqa", "mistral-window-6"],
)
def test_fused_cpu_kernels_equal_the_torch_path(tiny_model_dir, monkeypatch, arch, kwargs):
    """The default CPU path (fused glue ops, the `cpu` attention backend) against plain torch
    (PLAIT_CPU_KERNELS=0), over batches that mix decode rows with prefill chunks."""
    model_dir = tiny_model_dir(arch, **kwargs)
    params = {**GREEDY, "max_new_tokens": 16}
    logprobs = {"return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": 2}
    runs = {}
    for fused in (True, False):
        if not fused:
            monkeypatch.setenv("PLAIT_CPU_KERNELS", "0")
        with plait.Engine(model=model_dir, max_total_tokens=2048, chunked_prefill_size=5) as eng:
            assert eng.runner.model.ops.fused is fused
            assert eng.runner.attention_backend == ("cpu" if fused else "torch")
            runs[fused] = eng.generate(PROMPTS, params, **logprobs)
    for got, want in zip(runs[True], runs[False], strict=True):
        assert got["output_ids"] == want["output_ids"]
        for key in ("input_token_logprobs", "output_token_logprobs"):
            a, b = got["meta_info"][key], want["meta_info"][key]
            assert [t for _, t, _ in a] == [t for _, t, _ in b]
            for (x, _, _), (y, _, _) in zip(a, b):
                assert (x is None and y is None) or x == pytest.approx(y, abs=1e-5)


def test_chunked_prefill_gives_same_tokens(llama_dir, engine):
    prompt = " ".join(PROMPTS * 6)
    params = {**GREEDY, "max_new_tokens": 12}
    expected = engine.generate(prompt, params)["output_ids"]
    with plait.Engine(model=llama_dir, max_total_tokens=2048, chunked_prefill_size=7) as eng:
        assert eng.generate(prompt, params)["output_ids"] == expected


def test_input_ids_and_prompt_agree(engine):
    ids = engine.tokenizer.encode(PROMPTS[1])
    a = engine.generate(PROMPTS[1], {**GREEDY, "max_new_tokens": 8})
    b = engine.generate(input_ids=ids, sampling_params={**GREEDY, "max_new_tokens": 8})
    assert a["output_ids"] == b["output_ids"] and a["text"] == b["text"]


# ---- logprobs ----------------------------------------------------------------


def test_logprobs_equal_hf_log_softmax(llama_dir, engine):
    prompt = PROMPTS[1]
    out = engine.generate(
        prompt, {**GREEDY, "max_new_tokens": 6}, return_logprob=True, logprob_start_len=0
    )
    ids = engine.tokenizer.encode(prompt)
    full = ids + out["output_ids"]
    hf = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([full])).logits[0].float(), -1)
    meta = out["meta_info"]
    inp, outp = meta["input_token_logprobs"], meta["output_token_logprobs"]
    assert [t for _, t, _ in inp] == ids and [t for _, t, _ in outp] == out["output_ids"]
    assert inp[0][0] is None  # the first token has no context
    for i in range(1, len(ids)):
        assert inp[i][0] == pytest.approx(ref[i - 1, ids[i]].item(), abs=1e-4)
    for j, (lp, tok, _) in enumerate(outp):
        assert lp == pytest.approx(ref[len(ids) - 1 + j, tok].item(), abs=1e-4)


def test_logprob_start_len_and_top_logprobs(engine):
    ids = engine.tokenizer.encode(PROMPTS[3])
    out = engine.generate(
        input_ids=ids,
        sampling_params={**GREEDY, "max_new_tokens": 3},
        return_logprob=True,
        logprob_start_len=3,
        top_logprobs_num=4,
        return_text_in_logprobs=True,
    )
    meta = out["meta_info"]
    assert [t for _, t, _ in meta["input_token_logprobs"]] == ids[3:]
    assert len(meta["input_top_logprobs"]) == len(ids) - 3
    for (lp, tok, text), top in zip(
        meta["output_token_logprobs"], meta["output_top_logprobs"], strict=True
    ):
        assert text == engine.tokenizer.decode([tok])
        assert len(top) == 4
        values = [v for v, _, _ in top]
        assert values == sorted(values, reverse=True)
        assert top[0][1] == tok and top[0][0] == pytest.approx(lp)  # greedy picks the top one


def test_default_logprob_start_is_last_prompt_token(engine):
    ids = engine.tokenizer.encode(PROMPTS[0])
    meta = engine.generate(
        input_ids=ids, sampling_params={**GREEDY, "max_new_tokens": 2}, return_logprob=True
    )["meta_info"]
    assert [t for _, t, _ in meta["input_token_logprobs"]] == ids[-1:]
    assert len(meta["output_token_logprobs"]) == 2


# ---- stopping ----------------------------------------------------------------


def test_max_new_tokens_finishes_with_length(engine):
    out = engine.generate(PROMPTS[0], {**GREEDY, "max_new_tokens": 5})
    assert len(out["output_ids"]) == 5
    assert out["meta_info"]["completion_tokens"] == 5
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 5}
    assert out["meta_info"]["prompt_tokens"] == len(engine.tokenizer.encode(PROMPTS[0]))


def test_stop_token_ids(engine):
    ref = engine.generate(PROMPTS[1], {**GREEDY, "max_new_tokens": 10})["output_ids"]
    stop = ref[3]
    first = ref.index(stop)
    out = engine.generate(PROMPTS[1], {**GREEDY, "max_new_tokens": 10, "stop_token_ids": [stop]})
    assert out["output_ids"] == ref[: first + 1]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert out["text"] == engine.tokenizer.decode(ref[:first])  # the stop token's text is cut


def test_min_new_tokens_delays_stop_tokens(engine):
    ref = engine.generate(PROMPTS[1], {**GREEDY, "max_new_tokens": 10})["output_ids"]
    stop = ref[0]
    out = engine.generate(
        PROMPTS[1], {**GREEDY, "max_new_tokens": 10, "min_new_tokens": 4, "stop_token_ids": [stop]}
    )
    assert len(out["output_ids"]) >= 4
    assert stop not in out["output_ids"][:4]


def _ascii_boundary(engine) -> tuple[str, list[int], str, int]:
    """A greedy output and a token boundary with a printable ASCII character on each side."""
    decode = engine.tokenizer.decode
    for prompt in PROMPTS:
        ids = engine.generate(prompt, {**GREEDY, "max_new_tokens": 16})["output_ids"]
        for k in range(1, len(ids) - 1):
            before, after = decode(ids[:k]), decode(ids[: k + 1])
            if before and len(after) > len(before) and (before[-1] + after[len(before)]).isalnum():
                return prompt, ids, before[-1] + after[len(before)], k
    raise AssertionError("no ASCII token boundary in the greedy outputs")


def test_stop_string_spanning_tokens_is_cut(engine):
    prompt, ids, stop, _ = _ascii_boundary(engine)
    decode = engine.tokenizer.decode
    text = decode(ids)
    cut = text.find(stop)
    ends = next(m for m in range(1, len(ids) + 1) if stop in decode(ids[:m]))
    assert decode(ids[: ends - 1]).endswith(stop[0])  # it really spans two tokens
    out = engine.generate(prompt, {**GREEDY, "max_new_tokens": 16, "stop": [stop]})
    assert out["text"] == text[:cut]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert out["output_ids"] == ids[:ends]


def test_max_new_tokens_zero_only_prefills(engine):
    out = engine.generate(PROMPTS[0], {"max_new_tokens": 0})
    assert out["output_ids"] == [] and out["text"] == ""
    assert out["meta_info"]["finish_reason"]["type"] == "length"
    assert_kv_all_free(engine)


# ---- sampling ----------------------------------------------------------------


def test_top_k_one_is_greedy(engine):
    greedy = engine.generate(PROMPTS[1], {**GREEDY, "max_new_tokens": 12})["output_ids"]
    topk1 = engine.generate(
        PROMPTS[1],
        {"temperature": 1.0, "top_k": 1, "ignore_eos": True, "max_new_tokens": 12, "seed": 3},
    )["output_ids"]
    assert topk1 == greedy


def test_seed_reproducible_and_independent_of_batch(engine):
    params = {"temperature": 1.0, "ignore_eos": True, "max_new_tokens": 16, "seed": 1234}
    alone = engine.generate(PROMPTS[0], params)["output_ids"]
    again = engine.generate(PROMPTS[0], params)["output_ids"]
    batched = engine.generate(
        [PROMPTS[1], PROMPTS[0], PROMPTS[2]],
        [{**params, "seed": 9}, params, {**params, "seed": 10}],
    )[1]["output_ids"]
    other = engine.generate(PROMPTS[0], {**params, "seed": 4321})["output_ids"]
    assert alone == again == batched
    assert other != alone


def test_n_samples(engine):
    params = {"temperature": 1.0, "ignore_eos": True, "max_new_tokens": 12, "n": 3, "seed": 5}
    outs = engine.generate(PROMPTS[0], params)
    assert len(outs) == 3
    assert len({tuple(o["output_ids"]) for o in outs}) > 1  # different samples
    assert [o["output_ids"] for o in engine.generate(PROMPTS[0], params)] == [
        o["output_ids"] for o in outs
    ]
    assert len({o["meta_info"]["id"] for o in outs}) == 3


def test_penalties_change_greedy_output(engine):
    base = engine.generate(PROMPTS[3], {**GREEDY, "max_new_tokens": 16})["output_ids"]
    pen = engine.generate(PROMPTS[3], {**GREEDY, "max_new_tokens": 16, "repetition_penalty": 3.0})
    assert pen["output_ids"] != base


# ---- streaming, async, concurrency -----------------------------------------------


@pytest.mark.parametrize("prompt", [PROMPTS[0], "Emoji 🙂 and 日本語 text"])
def test_stream_concatenates_to_full_text(engine, prompt):
    params = {**GREEDY, "max_new_tokens": 20}
    full = engine.generate(prompt, params)
    chunks = list(engine.generate(prompt, params, stream=True))
    assert "".join(c["text"] for c in chunks) == full["text"]
    assert [t for c in chunks for t in c["output_ids"]] == full["output_ids"]
    assert chunks[-1]["meta_info"]["finish_reason"] == full["meta_info"]["finish_reason"]
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])
    # No piece ends inside a character that a later token completes.
    assert sum(c["text"].count("\ufffd") for c in chunks) == full["text"].count("\ufffd")


def test_stream_never_shows_stop_string(engine):
    prompt, ids, stop, _ = _ascii_boundary(engine)
    ref = engine.tokenizer.decode(ids)
    params = {**GREEDY, "max_new_tokens": 16, "stop": [stop]}
    full = engine.generate(prompt, params)["text"]
    pieces = [c["text"] for c in engine.generate(prompt, params, stream=True)]
    assert "".join(pieces) == full == ref[: ref.find(stop)]


def test_closing_a_stream_early_aborts_and_frees_kv(engine):
    it = engine.generate(PROMPTS[0], {**GREEDY, "max_new_tokens": 200}, stream=True)
    next(it)
    it.close()
    engine.get_stats()  # processed after the abort message
    assert_kv_all_free(engine)


def test_async_generate_matches_sync(engine):
    params = {**GREEDY, "max_new_tokens": 10}
    sync = engine.generate(PROMPTS[:2], params)

    async def run():
        outs = await asyncio.gather(*(engine.async_generate(p, params) for p in PROMPTS[:2]))
        stream = await engine.async_generate(PROMPTS[0], params, stream=True)
        pieces = [c["text"] async for c in stream]
        return outs, pieces

    outs, pieces = asyncio.run(run())
    assert [o["output_ids"] for o in outs] == [o["output_ids"] for o in sync]
    assert "".join(pieces) == sync[0]["text"]


def test_concurrent_threads(engine):
    params = {**GREEDY, "max_new_tokens": 8}
    expected = [engine.generate(p, params)["output_ids"] for p in PROMPTS]
    results: dict[int, list[int]] = {}

    def worker(i: int) -> None:
        results[i] = engine.generate(PROMPTS[i % len(PROMPTS)], params)["output_ids"]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(results[i] == expected[i % len(PROMPTS)] for i in range(16))
    assert_kv_all_free(engine)


def test_more_requests_than_running_slots_all_finish(llama_dir):
    with plait.Engine(model=llama_dir, max_total_tokens=256, max_running_requests=2) as eng:
        outs = eng.generate(
            [f"{p} {i}" for i, p in enumerate(PROMPTS * 3)], {**GREEDY, "max_new_tokens": 40}
        )
        assert all(len(o["output_ids"]) == 40 for o in outs)
        assert_kv_all_free(eng)


def test_abort_by_rid(engine):
    it = engine.generate(PROMPTS[0], {**GREEDY, "max_new_tokens": 300}, stream=True, rid="to-abort")
    first = next(it)
    engine.abort("to-abort")
    rest = list(it)
    assert first["meta_info"]["id"] == "to-abort"
    assert rest[-1]["meta_info"]["finish_reason"]["type"] == "abort"
    assert_kv_all_free(engine)


# ---- bad input -----------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"prompt": "x", "sampling_params": {"temprature": 0.5}}, "sampling_params.temprature"),
        ({"prompt": "x", "sampling_params": {"top_p": 2.0}}, "sampling_params.top_p"),
        ({"prompt": "x", "input_ids": [1, 2]}, "prompt"),
        ({"input_ids": []}, "input_ids"),
        ({"input_ids": [3, 10**6]}, "input_ids"),
        ({"input_ids": [5] * 600}, "input_ids"),
        ({"prompt": ["a", "b"], "sampling_params": {"n": 2}, "stream": True}, "stream"),
    ],
)
def test_bad_requests_raise_and_engine_keeps_serving(engine, kwargs, field):
    with pytest.raises(RequestError) as err:
        result = engine.generate(**kwargs)
        if kwargs.get("stream"):
            list(result)
    assert err.value.field == field
    assert len(engine.generate(PROMPTS[0], {**GREEDY, "max_new_tokens": 3})["output_ids"]) == 3


def test_max_new_tokens_is_clamped_to_the_context(engine):
    ids = engine.tokenizer.encode(PROMPTS[0])
    out = engine.generate(input_ids=ids, sampling_params={**GREEDY, "max_new_tokens": 10**5})
    assert len(ids) + len(out["output_ids"]) == engine.context_len
    assert out["meta_info"]["finish_reason"]["type"] == "length"


def test_kv_pool_too_small_for_request(llama_dir):
    with (
        plait.Engine(model=llama_dir, max_total_tokens=16) as eng,
        pytest.raises(RequestError, match="KV slots"),
    ):
        eng.generate("hello world", {"max_new_tokens": 32})


def test_unknown_engine_option():
    with pytest.raises(TypeError, match="kv_cache_gigabytes"):
        plait.Engine(model="smollm2", kv_cache_gigabytes=1)


def test_generate_after_shutdown_raises(llama_dir):
    eng = plait.Engine(model=llama_dir, max_total_tokens=256)
    eng.shutdown()
    with pytest.raises(plait.runtime.engine.EngineShutdownError):
        eng.generate("hi")


def test_apply_chat_template_uses_the_tokenizers_template(engine, llama_dir):
    messages = [{"role": "user", "content": "Hi!"}]
    tok = AutoTokenizer.from_pretrained(llama_dir)
    expected = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert engine.apply_chat_template(messages) == expected
    assert expected.endswith("<|im_start|>assistant\n")


# ---- robustness ------------------------------------------------------------------


def test_a_caller_whose_event_loop_closed_does_not_kill_the_engine(engine):
    """An aborted async request's last result goes to a loop that is gone."""

    async def start_and_cancel():
        task = asyncio.ensure_future(
            engine.async_generate("Hello", {"max_new_tokens": 400, "ignore_eos": True})
        )
        await asyncio.sleep(0.05)
        task.cancel()

    asyncio.run(start_and_cancel())
    assert engine._thread.is_alive()
    out = engine.generate("Hello", {**GREEDY, "max_new_tokens": 3})
    assert len(out["output_ids"]) == 3
    assert_kv_all_free(engine)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"prompt": ["a", "b"], "rid": ["only-one"]}, "rid"),
        ({"prompt": ["a", "b"], "rid": ["x", "x"]}, "rid"),
        ({"prompt": "a", "return_logprob": True, "top_logprobs_num": 10**6}, "top_logprobs_num"),
        ({"prompt": "a", "sampling_params": {"n": 10**6}}, "sampling_params.n"),
        ({"prompt": "a", "sampling_params": {"temperature": float("inf")}}, "temperature"),
    ],
)
def test_request_shape_errors_name_the_field(engine, kwargs, field):
    with pytest.raises(RequestError) as info:
        engine.generate(**kwargs)
    assert field in info.value.field
    assert engine.generate("a", {**GREEDY, "max_new_tokens": 1})["output_ids"]


def test_one_rid_for_a_batch_gives_each_prompt_its_own(engine):
    outs = engine.generate(["a", "b"], {**GREEDY, "max_new_tokens": 1}, rid="job")
    assert [o["meta_info"]["id"] for o in outs] == ["job-0", "job-1"]


def test_extra_key_keeps_cached_prefixes_apart(engine):
    """Requests share cached prefixes only within one extra_key (a tenant's namespace);
    the key changes nothing else."""
    prompt = "A prefix that only its own tenant may reuse: " + PROMPTS[2]
    params = {**GREEDY, "max_new_tokens": 4}
    first = engine.generate(prompt, params, extra_key="tenant-a")
    n = first["meta_info"]["prompt_tokens"]
    same = engine.generate(prompt, params, extra_key="tenant-a")
    assert same["meta_info"]["cached_tokens"] == n - 1
    assert same["output_ids"] == first["output_ids"]
    assert engine.generate(prompt, params, extra_key="tenant-b")["meta_info"]["cached_tokens"] == 0
    assert engine.generate(prompt, params)["meta_info"]["cached_tokens"] == 0  # no key: its own
    outs = engine.generate([prompt, prompt], params, extra_key=["tenant-a", "tenant-c"])
    assert [o["meta_info"]["cached_tokens"] for o in outs] == [n - 1, 0]
    with pytest.raises(RequestError, match="one per prompt") as err:
        engine.generate([prompt, prompt], params, extra_key=["tenant-a"])
    assert err.value.field == "extra_key"
    assert_kv_all_free(engine)
