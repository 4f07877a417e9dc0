"""One request never hurts another: bad values are refused or made safe, a failure
in one request's sampling or grammar finishes that request alone, rids name one
request at a time, and every budget (tokens, top logprobs, compile time) holds."""

from __future__ import annotations

import asyncio
import json
import re
import time

import pytest
from common import GREEDY, PROMPTS, assert_kv_all_free, wait_idle

import plait
from plait.runtime.constrained import GrammarError
from plait.runtime.errors import RequestError
from plait.runtime.kv_pool import SlotAllocator
from plait.runtime.request import Req
from plait.runtime.sampler import Sampler


def _long_stream(engine, rid: str | None = None):
    """A greedy stream that runs long enough to share batches with other requests."""
    stream = engine.generate(PROMPTS[1], {**GREEDY, "max_new_tokens": 40}, stream=True, rid=rid)
    first = next(stream)
    return stream, first


def _finish(stream, first) -> dict:
    pieces = [first, *stream]
    return {
        "text": "".join(p["text"] for p in pieces),
        "finish_reason": pieces[-1]["meta_info"]["finish_reason"],
        "n": sum(len(p["output_ids"]) for p in pieces),
    }


# ---- sampling values ------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": 1e-45},  # 1 / temperature overflows
        {"temperature": 1.0, "top_p": 1e-300},  # top_p is 0.0 in float32
    ],
)
def test_tiny_temperature_or_top_p_samples_greedily_and_the_batch_goes_on(engine, params):
    greedy = engine.generate(PROMPTS[0], {**GREEDY, "max_new_tokens": 8})
    stream, first = _long_stream(engine)
    out = engine.generate(PROMPTS[0], {"ignore_eos": True, "max_new_tokens": 8, **params})
    other = _finish(stream, first)
    assert out["output_ids"] == greedy["output_ids"]
    assert out["meta_info"]["finish_reason"]["type"] == "length"
    assert other["finish_reason"]["type"] == "length" and other["n"] == 40


@pytest.mark.parametrize(
    "params,field",
    [
        ({"repetition_penalty": 1e-300}, "sampling_params.repetition_penalty"),
        ({"repetition_penalty": 11.0}, "sampling_params.repetition_penalty"),
        ({"logit_bias": {"5": 1e300}}, "sampling_params.logit_bias.5"),
        ({"logit_bias": {"-1": 1.0}}, "sampling_params.logit_bias"),
        ({"logit_bias": {"x": 1.0}}, "sampling_params.logit_bias"),
        ({"structural_tag": "{}"}, "sampling_params.structural_tag"),
        ({"stop_regex": "("}, "sampling_params.stop_regex"),
        ({"stop_regex": "a*"}, "sampling_params.stop_regex"),
        ({"stream_interval": 0}, "sampling_params.stream_interval"),
    ],
)
def test_sampling_values_that_would_overflow_are_refused_by_name(engine, params, field):
    with pytest.raises(RequestError) as err:
        engine.generate(PROMPTS[0], {"max_new_tokens": 4, **params})
    assert err.value.field == field


def test_a_request_whose_sampling_fails_finishes_alone(engine, monkeypatch):
    """Beyond validation: whatever one request's row raises in the sampler, only that
    request finishes (with the error), and the others' tokens are unchanged."""
    expected = engine.generate(PROMPTS, {**GREEDY, "max_new_tokens": 12})
    real = Sampler.__call__

    def faulty(self, logits, rows, need_logprobs):
        if any(r.params.seed == 666 for r in rows):
            raise RuntimeError("this row's logits processor broke")
        return real(self, logits, rows, need_logprobs)

    monkeypatch.setattr(Sampler, "__call__", faulty)
    bad = {"max_new_tokens": 12, "seed": 666, "temperature": 0.7}
    outs = engine.generate(
        [*PROMPTS, PROMPTS[0]], [*[{**GREEDY, "max_new_tokens": 12}] * len(PROMPTS), bad]
    )
    assert [o["output_ids"] for o in outs[:-1]] == [e["output_ids"] for e in expected]
    reason = outs[-1]["meta_info"]["finish_reason"]
    assert reason["type"] == "abort"
    assert "sampling failed" in reason["message"] and "logits processor broke" in reason["message"]
    assert_kv_all_free(engine)


def test_a_request_whose_grammar_fails_mid_decoding_finishes_alone(engine, monkeypatch):
    real_set_grammar = Req.set_grammar

    def set_grammar(self, grammar):
        real_set_grammar(self, grammar)
        if self.rid == "broken-grammar":
            calls = {"n": 0}
            fill = self.matcher.fill_mask

            def fill_then_fail(bitmask, row):
                calls["n"] += 1
                if calls["n"] > 2:
                    raise RuntimeError("matcher state corrupted")
                fill(bitmask, row)

            self.matcher.fill_mask = fill_then_fail

    monkeypatch.setattr(Req, "set_grammar", set_grammar)
    stream, first = _long_stream(engine)
    good = engine.generate(
        PROMPTS[0], {**GREEDY, "max_new_tokens": 20, "regex": "[a-z ]{20}"}, rid="fine-grammar"
    )
    bad = engine.generate(
        PROMPTS[0], {**GREEDY, "max_new_tokens": 20, "regex": "[a-z ]{20}"}, rid="broken-grammar"
    )
    other = _finish(stream, first)
    assert re.fullmatch("[a-z ]{20}", good["text"])
    reason = bad["meta_info"]["finish_reason"]
    assert reason["type"] == "abort" and "grammar failed" in reason["message"]
    assert "matcher state corrupted" in reason["message"]
    assert other["finish_reason"]["type"] == "length" and other["n"] == 40
    assert_kv_all_free(engine)


# ---- rids -----------------------------------------------------------------------


def test_a_rid_in_flight_is_refused_and_abort_reaches_only_its_request(engine):
    stream, first = _long_stream(engine, rid="mine")
    with pytest.raises(RequestError) as err:
        engine.generate(PROMPTS[0], {**GREEDY, "max_new_tokens": 2}, rid="mine")
    assert err.value.field == "rid" and "already in flight" in str(err.value)
    assert not engine.abort("someone-else")
    other = _finish(stream, first)  # untouched by the refused duplicate
    assert other["finish_reason"]["type"] == "length" and other["n"] == 40
    wait_idle(engine)
    assert not engine.abort("mine")  # finished: no longer in flight
    again = engine.generate(PROMPTS[0], {**GREEDY, "max_new_tokens": 2}, rid="mine")
    assert len(again["output_ids"]) == 2


def test_abort_by_the_rid_of_an_n_request_aborts_every_sample(engine):
    async def run():
        task = asyncio.ensure_future(
            engine.async_generate(
                PROMPTS[0], {"max_new_tokens": 300, "n": 2, "ignore_eos": True}, rid="pair"
            )
        )
        for _ in range(200):
            await asyncio.sleep(0.01)
            if engine.abort("pair"):
                break
        return await task

    outs = asyncio.run(run())
    assert [o["meta_info"]["finish_reason"]["type"] for o in outs] == ["abort", "abort"]
    assert_kv_all_free(engine)


# ---- budgets --------------------------------------------------------------------


def test_top_logprobs_num_is_capped(engine):
    with pytest.raises(RequestError) as err:
        engine.generate(PROMPTS[0], {"max_new_tokens": 1}, return_logprob=True, top_logprobs_num=21)
    assert err.value.field == "top_logprobs_num" and "20" in str(err.value)
    out = engine.generate(
        PROMPTS[0], {"max_new_tokens": 1}, return_logprob=True, top_logprobs_num=20
    )
    assert len(out["meta_info"]["output_top_logprobs"][0]) == 20


def test_jump_forward_stops_at_the_token_budget(engine):
    """A grammar forcing 100k characters: only what max_new_tokens allows is tokenized
    and appended."""
    start = time.perf_counter()
    out = engine.generate(PROMPTS[0], {"max_new_tokens": 5, "regex": "(ab){50000}"})
    assert out["text"].startswith("abab") and len(out["output_ids"]) == 5
    assert out["meta_info"]["forced_tokens"] <= 5
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 5}
    assert time.perf_counter() - start < 5


def test_max_new_tokens_past_the_context_is_capped_and_said_so(engine):
    ids = engine.tokenizer.encode(PROMPTS[0])
    out = engine.generate(input_ids=ids, sampling_params={**GREEDY, "max_new_tokens": 10**5})
    assert out["meta_info"]["capped_max_new_tokens"] == engine.context_len - len(ids)
    within = engine.generate(input_ids=ids, sampling_params={**GREEDY, "max_new_tokens": 3})
    assert "capped_max_new_tokens" not in within["meta_info"]


# ---- grammars that cannot run ------------------------------------------------------


@pytest.mark.parametrize(
    "constraint",
    [
        {"json_schema": {"$ref": "#"}},  # refers only to itself
        {"json_schema": {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}},
    ],
)
def test_a_grammar_with_no_output_is_refused_before_it_runs(engine, constraint):
    with pytest.raises(GrammarError) as err:
        engine.generate(PROMPTS[0], {"max_new_tokens": 4, **constraint})
    assert err.value.field == "json_schema" and "no backend compiles it" in str(err.value)
    assert len(engine.generate(PROMPTS[0], {**GREEDY, "max_new_tokens": 2})["output_ids"]) == 2


def test_a_compile_past_its_deadline_is_refused_and_stopped(llama_dir):
    enum = {"enum": [f"value{i}" for i in range(100_000)]}
    with plait.Engine(model=llama_dir, max_total_tokens=1024, grammar_compile_timeout_s=0.2) as eng:
        start = time.perf_counter()
        with pytest.raises(GrammarError, match="deadline") as err:
            eng.generate(PROMPTS[0], {"max_new_tokens": 4, "json_schema": json.dumps(enum)})
        assert time.perf_counter() - start < 30
        assert err.value.field == "json_schema"
        assert len(eng.generate(PROMPTS[0], {**GREEDY, "max_new_tokens": 2})["output_ids"]) == 2


# ---- the event loop -----------------------------------------------------------------


def test_async_generate_tokenizes_off_the_event_loop(engine, monkeypatch):
    real_encode = engine.tokenizer.encode

    def slow_encode(*args, **kwargs):
        time.sleep(0.5)
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(engine.tokenizer, "encode", slow_encode)

    async def run():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        t = asyncio.ensure_future(ticker())
        out = await engine.async_generate(PROMPTS[0], {**GREEDY, "max_new_tokens": 2})
        t.cancel()
        return out, ticks

    out, ticks = asyncio.run(run())
    assert len(out["output_ids"]) == 2
    assert ticks >= 20  # the loop kept running during the 0.5 s of tokenizing


# ---- memory and counters ------------------------------------------------------------


def test_freed_slots_are_reused_first():
    alloc = SlotAllocator(100, "cpu")
    first = alloc.alloc(10)
    alloc.free(first)
    assert alloc.alloc(10).tolist() == first.tolist()


def test_a_steady_load_touches_only_the_slots_it_needs(llama_dir):
    """One request at a time: with slots reused last-freed-first the highest slot ever
    handed out stays near one request's need (first-freed-first walks the whole pool)."""
    with plait.Engine(model=llama_dir, max_total_tokens=4096, disable_radix_cache=True) as eng:
        highest = 0
        real_alloc = eng.scheduler.allocator.alloc

        def alloc(n):
            nonlocal highest
            slots = real_alloc(n)
            if slots.numel():
                highest = max(highest, int(slots.max()))
            return slots

        eng.scheduler.allocator.alloc = alloc
        for i in range(30):
            eng.generate(f"{PROMPTS[1]} {i}", {**GREEDY, "max_new_tokens": 40})
        assert highest <= 2 * (len(eng.tokenizer.encode(PROMPTS[1])) + 45)


def test_a_request_waiting_for_kv_counts_once_in_the_hit_rate(llama_dir):
    with plait.Engine(model=llama_dir, max_total_tokens=128, max_running_requests=4) as eng:
        prompts = [PROMPTS[0], PROMPTS[1]]
        outs = eng.generate(prompts, {**GREEDY, "max_new_tokens": 100})
        assert all(len(o["output_ids"]) == 100 for o in outs)
        stats = eng.get_stats()
        queried = sum(len(eng.tokenizer.encode(p)) - 1 for p in prompts)
        assert stats["cache_query_tokens"] == queried


# ---- SGLang's stopping and sampling extras ------------------------------------------


def test_stop_regex_cuts_at_the_first_match(engine):
    free = engine.generate(PROMPTS[1], {**GREEDY, "max_new_tokens": 30})["text"]
    word = re.search(r"[a-z]{3,}", free)
    assert word, free
    pattern = re.escape(word.group())
    out = engine.generate(PROMPTS[1], {**GREEDY, "max_new_tokens": 30, "stop_regex": pattern})
    assert out["text"] == free[: word.start()]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": word.group()}
    kept = engine.generate(
        PROMPTS[1],
        {**GREEDY, "max_new_tokens": 30, "stop_regex": [pattern], "no_stop_trim": True},
    )
    assert kept["text"] == free[: word.end()]


def test_no_stop_trim_keeps_a_stop_string(engine):
    free = engine.generate(PROMPTS[1], {**GREEDY, "max_new_tokens": 30})["text"]
    stop = free[5:9]
    cut = engine.generate(PROMPTS[1], {**GREEDY, "max_new_tokens": 30, "stop": stop})
    kept = engine.generate(
        PROMPTS[1], {**GREEDY, "max_new_tokens": 30, "stop": stop, "no_stop_trim": True}
    )
    assert kept["text"] == cut["text"] + stop


def test_logit_bias_forces_and_bans_tokens(engine):
    free = engine.generate(PROMPTS[0], {**GREEDY, "max_new_tokens": 4})["output_ids"]
    forced = engine.generate(PROMPTS[0], {**GREEDY, "max_new_tokens": 4, "logit_bias": {"42": 100}})
    assert forced["output_ids"] == [42] * 4
    banned = engine.generate(
        PROMPTS[0], {**GREEDY, "max_new_tokens": 4, "logit_bias": {str(free[0]): -100}}
    )
    assert banned["output_ids"][0] != free[0]


def test_sampling_seed_is_the_seed(engine):
    params = {"temperature": 1.0, "max_new_tokens": 8, "ignore_eos": True}
    a = engine.generate(PROMPTS[0], {**params, "seed": 7})
    b = engine.generate(PROMPTS[0], {**params, "sampling_seed": 7, "custom_params": {"x": 1}})
    assert a["output_ids"] == b["output_ids"]


def test_stream_interval_sends_a_piece_every_n_tokens(engine):
    pieces = list(
        engine.generate(
            PROMPTS[0], {**GREEDY, "max_new_tokens": 12, "stream_interval": 4}, stream=True
        )
    )
    assert [len(p["output_ids"]) for p in pieces] == [4, 4, 4]
    full = engine.generate(PROMPTS[0], {**GREEDY, "max_new_tokens": 12})
    assert "".join(p["text"] for p in pieces) == full["text"]
