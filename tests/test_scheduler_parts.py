"""The scheduler's parts on their own, without a model: admission and batch
building over a fake prefix cache, and output processing on fixed logits."""

from __future__ import annotations

import math

import pytest
import torch

from plait.radix import CacheStats, MatchResult, NullCache, TreeNode
from plait.runtime.detokenizer import IncrementalDetokenizer
from plait.runtime.kv_pool import SlotAllocator
from plait.runtime.request import Req
from plait.runtime.sampling_params import SamplingParams
from plait.runtime.scheduler.batching import Batcher
from plait.runtime.scheduler.grammar import GrammarSteps
from plait.runtime.scheduler.kv import KVBook
from plait.runtime.scheduler.output import OutputProcessor

CPU = torch.device("cpu")
VOCAB = 8
EOS = 7
CONTEXT = 64


def t(*xs: int) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.int64)


class LetterTokenizer:
    """Token i is the letter chr(ord('a') + i)."""

    def decode(self, ids, **_) -> str:
        return "".join(chr(ord("a") + i) for i in ids)


class FakeCache:
    """A PrefixCache that answers from a table of prompts -> cached slots and records
    every call made to it."""

    enabled = True

    def __init__(self, cached: dict[tuple[int, ...], list[int]] | None = None, evictable=0):
        self.cached = cached or {}
        self.evictable = evictable
        self.root = TreeNode([], t(), None)
        self.calls: list[tuple] = []
        self.stats = CacheStats()
        self.evictable_size = self.protected_size = self.total_size = 0

    def match_prefix(self, tokens, namespace=None, record=True) -> MatchResult:
        best: list[int] = []
        for prefix, slots in self.cached.items():
            if tuple(tokens[: len(prefix)]) == prefix and len(prefix) > len(best):
                best = slots
        return MatchResult(t(*best), self.root if not best else TreeNode([], t(), self.root))

    def record_query(self, node, query_tokens, hit_tokens) -> None:
        self.calls.append(("record", query_tokens, hit_tokens))

    def lock(self, node) -> None:
        self.calls.append(("lock",))

    def unlock(self, node) -> None:
        self.calls.append(("unlock",))

    def insert(self, tokens, slots, namespace=None) -> int:
        self.calls.append(("insert", list(tokens), slots.tolist()))
        return 0

    def insert_running(self, tokens, slots, node, namespace=None) -> MatchResult:
        self.calls.append(("insert_running", list(tokens), slots.tolist()))
        return MatchResult(t(), node)

    def evict(self, num_tokens: int) -> int:
        self.calls.append(("evict", num_tokens))
        return min(num_tokens, self.evictable)


def make_req(rid: str, ids: list[int], sent: list | None = None, **params) -> Req:
    p = SamplingParams(**{"temperature": 0.0, "max_new_tokens": 4, **params})
    return Req(
        rid,
        ids,
        p,
        sink=(sent if sent is not None else []).append,
        detokenizer=IncrementalDetokenizer(LetterTokenizer(), p.stop),
        generator=None,
    )


def setup(cache=None, slots=64, rows=4, chunk=64, policy="fcfs"):
    cache = cache if cache is not None else FakeCache()
    kv = KVBook(cache, SlotAllocator(slots, CPU), rows, CONTEXT, CPU)
    batcher = Batcher(
        kv, chunked_prefill_size=chunk, max_running_requests=rows, schedule_policy=policy
    )
    return cache, kv, batcher


def table_of(batch) -> dict[tuple[int, int], int]:
    return {
        (r, c): s
        for r, c, s in zip(
            batch.write_rows.tolist(), batch.write_cols.tolist(), batch.write_slots.tolist()
        )
    }


# ---- admission and batch building ------------------------------------------------


def test_admission_lends_the_cached_prefix_and_computes_the_rest():
    cache, kv, batcher = setup(FakeCache({(1, 2, 3): [41, 42, 43]}))
    req = make_req("a", [1, 2, 3, 4, 5, 6])
    batcher.waiting.append(req)
    plan = batcher.plan()
    assert [(p.req.rid, p.extend) for p in plan] == [("a", 3)]
    assert req.cached_tokens == req.num_computed == 3
    # Locked, then counted once admitted: 5 tokens may come from the cache, 3 did.
    assert cache.calls == [("lock",), ("record", 5, 3)]
    batch = batcher.build(plan)
    assert batch.input_ids.tolist() == [4, 5, 6]
    assert batch.positions.tolist() == [3, 4, 5]
    assert batch.prefix_lens == [3] and batch.extend_lens == [3]
    assert batch.req_rows.tolist() == [req.row]
    assert batch.logits_indices.tolist() == [2]  # the last token samples
    new = batch.out_slots.tolist()
    assert table_of(batch) == {
        (req.row, 0): 41,
        (req.row, 1): 42,
        (req.row, 2): 43,
        (req.row, 3): new[0],
        (req.row, 4): new[1],
        (req.row, 5): new[2],
    }
    # The scheduler's own copy of the row agrees with what the runner is told.
    assert kv.table.table[req.row, :6].tolist() == [41, 42, 43, *new]


def test_reservation_covers_prompt_and_output_before_admission():
    _, kv, batcher = setup(slots=20)
    first = make_req("a", list(range(1, 9)), max_new_tokens=8)  # needs 16
    second = make_req("b", list(range(1, 9)), max_new_tokens=8)
    batcher.waiting.extend([first, second])
    plan = batcher.plan()
    assert [p.req.rid for p in plan] == ["a"]
    assert list(batcher.waiting) == [second]  # waits until "a" frees its KV
    assert kv.reserved == 16 and kv.available_slots == 4
    batcher.build(plan)
    assert kv.reserved == 8 and first.reserved_left == 8  # the prompt's 8 were taken


def test_a_request_that_does_not_fit_asks_the_cache_to_evict_and_unlocks():
    cache, kv, batcher = setup(FakeCache(evictable=2), slots=10)
    req = make_req("a", list(range(1, 9)), max_new_tokens=8)  # needs 16, pool holds 10
    batcher.waiting.append(req)
    assert batcher.plan() == []
    assert cache.calls == [("lock",), ("evict", 6), ("unlock",)]
    assert req.row is None and req.num_computed == 0 and kv.reserved == 0


def test_chunked_prefill_and_decode_rows_first():
    _, kv, batcher = setup(chunk=4)
    long = make_req("long", list(range(1, 11)))
    batcher.waiting.append(long)
    steps = []
    for _ in range(3):
        plan = batcher.plan()
        batcher.build(plan)
        steps.append([(p.req.rid, p.start, p.extend, p.samples) for p in plan])
        for p in plan:
            kv.computed(p.req, p.extend)
        if plan[-1].samples:
            long.output_ids.append(5)  # as output processing would
    assert steps == [
        [("long", 0, 4, False)],
        [("long", 4, 4, False)],
        [("long", 8, 2, True)],
    ]
    short = make_req("short", [1, 2])
    batcher.waiting.append(short)
    plan = batcher.plan()
    assert [(p.req.rid, p.extend) for p in plan] == [("long", 1), ("short", 2)]
    batch = batcher.build(plan)
    assert batch.prefix_lens == [10, 0] and batch.extend_lens == [1, 2]
    assert batch.input_ids.tolist() == [5, 1, 2]


def test_lpm_admits_the_longest_cached_prefix_first():
    cache = FakeCache({(9, 9): [11, 12], (5, 5, 5, 5): [21, 22, 23, 24]})
    _, _, batcher = setup(cache, policy="lpm")
    reqs = [make_req("none", [1, 2, 3]), make_req("two", [9, 9, 1]), make_req("four", [5] * 6)]
    batcher.waiting.extend(reqs)
    assert [p.req.rid for p in batcher.plan()] == ["four", "two", "none"]


@pytest.mark.parametrize("policy", ["lpm", "fcfs"])
def test_without_a_cache_requests_run_in_arrival_order_and_nobody_waits(policy):
    shared = list(range(1, 41))  # 40 tokens in common, longer than MIN_SHARED_PREFIX
    _, _, batcher = setup(NullCache(lambda s: None), policy=policy, slots=200)
    batcher.waiting.extend([make_req("a", [*shared, 1]), make_req("b", [*shared, 2])])
    assert [p.req.rid for p in batcher.plan()] == ["a", "b"]


def test_a_request_sharing_a_long_uncached_prefix_waits_a_step():
    shared = list(range(1, 41))
    _, _, batcher = setup(slots=200)
    batcher.waiting.extend([make_req("a", [*shared, 1]), make_req("b", [*shared, 2])])
    assert [p.req.rid for p in batcher.plan()] == ["a"]
    assert [r.rid for r in batcher.waiting] == ["b"]


def test_finished_chunk_is_offered_to_the_cache_and_release_returns_everything():
    cache, kv, batcher = setup(chunk=3)
    req = make_req("a", [1, 2, 3, 4], max_new_tokens=2)
    batcher.waiting.append(req)
    plan = batcher.plan()
    batch = batcher.build(plan)
    kv.computed(req, 3)
    chunk_slots = batch.out_slots.tolist()
    assert cache.calls[-1] == ("insert_running", [1, 2, 3], chunk_slots)
    row = req.row
    kv.release(req)
    assert cache.calls[-2:] == [("insert", [1, 2, 3], chunk_slots), ("unlock",)]
    assert req.row is None and kv.free_rows == 4 and kv.reserved == 0
    assert row is not None


# ---- output processing ---------------------------------------------------------------


def running(**params):
    """A request admitted and built, ready for its step's logits."""
    cache, kv, batcher = setup()
    sent: list = []
    lp = {
        k: params.pop(k)
        for k in ("return_logprob", "logprob_start_len", "top_logprobs_num")
        if k in params
    }
    p = SamplingParams(**{"temperature": 0.0, "max_new_tokens": 4, **params})
    req = Req(
        "r",
        [1, 2, 3],
        p,
        sink=sent.append,
        detokenizer=IncrementalDetokenizer(LetterTokenizer(), p.stop),
        generator=None,
        **lp,
    )
    batcher.waiting.append(req)
    plan = batcher.plan()
    batcher.build(plan)
    grammar = GrammarSteps(LetterTokenizer(), VOCAB, (EOS,), CONTEXT)
    out = OutputProcessor(kv, grammar, LetterTokenizer(), (EOS,), CONTEXT)
    return req, plan, out, sent, kv


def logits_for(*best: int) -> torch.Tensor:
    """One row per entry, its argmax at that token; values fixed."""
    base = torch.linspace(-1.0, 1.0, VOCAB)
    out = base.repeat(len(best), 1)
    for i, b in enumerate(best):
        out[i, b] = 5.0
    return out


def test_greedy_token_is_appended_and_the_request_goes_on():
    req, plan, out, sent, kv = running()
    out.process(plan, logits_for(4), None)
    assert req.output_ids == [4] and not req.finished and sent == []
    assert req.num_computed == 3 and req.row is not None


def test_eos_stops_and_releases_the_kv():
    req, plan, out, sent, kv = running()
    out.process(plan, logits_for(EOS), None)
    assert req.finish_reason == {"type": "stop", "matched": EOS}
    assert req.row is None and kv.reserved == 0 and kv.free_rows == 4
    assert sent[-1]["meta_info"]["finish_reason"] == req.finish_reason
    assert sent[-1]["text"] == ""  # the stop token's text is dropped


def test_max_new_tokens_ends_with_length():
    req, plan, out, sent, _ = running(max_new_tokens=1)
    out.process(plan, logits_for(2), None)
    assert req.finish_reason == {"type": "length", "length": 1}
    assert sent[-1]["text"] == "c"


def test_a_stop_string_cuts_the_text():
    req, plan, out, sent, _ = running(stop=["d"])
    out.process(plan, logits_for(3), None)  # "d"
    assert req.finish_reason == {"type": "stop", "matched": "d"}
    assert sent[-1]["text"] == ""


def test_ignore_eos_keeps_going():
    req, plan, out, _, _ = running(ignore_eos=True)
    out.process(plan, logits_for(EOS), None)
    assert req.output_ids == [EOS] and not req.finished


def test_logprobs_of_prompt_and_output_come_from_the_raw_logits():
    req, plan, out, sent, _ = running(
        return_logprob=True, logprob_start_len=0, top_logprobs_num=2, max_new_tokens=1
    )
    # Rows for positions 0, 1 (scoring prompt tokens 2, 3) and the sampling row.
    assert plan[0].num_logits == 3
    logits = logits_for(2, 3, 6)
    out.process(plan, logits, None)
    ref = torch.log_softmax(logits, dim=-1)
    meta = sent[-1]["meta_info"]
    assert [x[1] for x in meta["input_token_logprobs"]] == [1, 2, 3]
    assert meta["input_token_logprobs"][0][0] is None
    assert [x[0] for x in meta["input_token_logprobs"][1:]] == pytest.approx(
        [ref[0, 2].item(), ref[1, 3].item()]
    )
    assert meta["output_token_logprobs"] == [[pytest.approx(ref[2, 6].item()), 6, None]]
    top = meta["output_top_logprobs"][0]
    assert [x[1] for x in top] == [6, 7]
    assert top[0][0] == pytest.approx(ref[2, 6].item())
    assert meta["input_top_logprobs"][0] is None
    assert [x[1] for x in meta["input_top_logprobs"][1]] == [2, 7]
    assert math.isclose(sum(math.exp(v) for v in ref[2].tolist()), 1.0, rel_tol=1e-6)


def test_a_row_that_cannot_be_sampled_fails_its_request_alone():
    cache, kv, batcher = setup()
    good, bad = make_req("good", [1, 2]), make_req("bad", [3, 4])
    batcher.waiting.extend([good, bad])
    plan = batcher.plan()
    batcher.build(plan)
    grammar = GrammarSteps(LetterTokenizer(), VOCAB, (EOS,), CONTEXT)
    out = OutputProcessor(kv, grammar, LetterTokenizer(), (EOS,), CONTEXT)
    logits = logits_for(4, 4)
    logits[1] = float("nan")
    out.process(plan, logits, None)
    assert good.output_ids == [4] and not good.finished
    assert bad.finish_reason["type"] == "abort"
    assert bad.finish_reason["message"].startswith("sampling failed")
    assert bad.row is None
