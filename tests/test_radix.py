"""The radix prefix cache on its own (CPU, no model): a hypothesis state machine that
drives a RadixCache over a real SlotAllocator against a naive reference, and one unit
test per behaviour (splits, duplicate freeing, locks, LRU eviction, namespaces,
counters, reset, NullCache)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from plait.radix import NullCache, RadixCache
from plait.runtime.kv_pool import SlotAllocator

CPU = torch.device("cpu")


def t(*xs: int) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.int64)


def recording_cache() -> tuple[RadixCache, list[list[int]]]:
    """A cache whose free callback records each call's slots (as a list)."""
    freed: list[list[int]] = []
    return RadixCache(lambda s: freed.append(s.tolist())), freed


def tree_contents(cache: RadixCache) -> dict[tuple, int]:
    """Brute force: {(namespace, token prefix): slot} for every token the tree holds."""
    out: dict[tuple, int] = {}
    for ns, root in cache._roots.items():
        stack = [(root, ())]
        while stack:
            node, prefix = stack.pop()
            for child in node.children.values():
                p = prefix
                for tok, slot in zip(child.key, child.value.tolist()):
                    p = p + (tok,)
                    out[(ns, p)] = slot
                stack.append((child, p))
    return out


# ---- the state machine ------------------------------------------------------------------

POOL_SIZE = 32
MAX_INFLIGHT = 3
NAMESPACES = (None, "b")
tokens_st = st.lists(st.integers(0, 3), min_size=1, max_size=8)
ns_st = st.sampled_from(NAMESPACES)


class Request:
    def __init__(self, ns, tokens: tuple[int, ...], node, tree_len: int, slots: list[int]):
        self.ns, self.tokens, self.node = ns, tokens, node
        self.tree_len = tree_len  # tokens[:tree_len] are the cache's, locked
        self.slots = slots  # one per token: tree's slots, then the request's own

    @property
    def private(self) -> list[int]:
        return self.slots[self.tree_len :]


class RadixMachine(RuleBasedStateMachine):
    """Reference: ``ref`` maps every cached (namespace, prefix) to its slot (prefix-closed),
    ``touched`` the logical time each prefix was last used (a use of a sequence uses all
    its prefixes), ``inflight`` the running requests. After every step the tree's exact
    contents are recomputed from the tree and compared with ``ref``."""

    @initialize()
    def setup(self):
        self.allocator = SlotAllocator(POOL_SIZE, CPU)
        self.freed: list[int] | None = None  # slots passed to free() during one call

        def free(slots: torch.Tensor) -> None:
            if self.freed is not None:
                self.freed.extend(slots.tolist())
            self.allocator.free(slots)

        self.cache = RadixCache(free)
        self.ref: dict[tuple, int] = {}
        self.touched: dict[tuple, int] = {}
        self.clock = 0
        self.inflight: list[Request] = []
        self.query = self.hit = self.inserted = self.evicted = 0

    # -- reference helpers --

    def cached_len(self, ns, tokens) -> int:
        n = 0
        while n < len(tokens) and (ns, tuple(tokens[: n + 1])) in self.ref:
            n += 1
        return n

    def touch(self, ns, tokens) -> None:
        self.clock += 1
        for i in range(1, len(tokens) + 1):
            self.touched[(ns, tuple(tokens[:i]))] = self.clock

    def draw_sequence(self, data) -> tuple:
        """(namespace, tokens): half the time a cached prefix, maybe extended."""
        if self.ref and data.draw(st.booleans()):
            ns, prefix = data.draw(st.sampled_from(sorted(self.ref, key=repr)))
            tokens = prefix + tuple(data.draw(st.lists(st.integers(0, 3), max_size=3)))
            return ns, tokens[:8]
        return data.draw(ns_st), tuple(data.draw(tokens_st))

    def locked(self) -> set[tuple]:
        return {(r.ns, r.tokens[:i]) for r in self.inflight for i in range(1, r.tree_len + 1)}

    def call(self, fn, *args, **kwargs):
        """Run a cache call, returning (result, slots it freed)."""
        self.freed = []
        try:
            return fn(*args, **kwargs), self.freed
        finally:
            self.freed = None

    def checked_evict(self, n: int) -> int:
        before = dict(self.ref)
        locked = self.locked()
        evictable = len(before) - len(locked)
        assert self.cache.evictable_size == evictable
        got, freed = self.call(self.cache.evict, n)
        after = tree_contents(self.cache)
        removed = {k: v for k, v in before.items() if k not in after}
        # Only removals, nothing moved.
        assert all(before.get(k) == v for k, v in after.items())
        assert sorted(freed) == sorted(removed.values())
        assert got == len(removed) == len(freed)
        assert got <= evictable
        assert got >= min(n, evictable)
        if n <= 0:
            assert got == 0
        # Locked prefixes survive: every in-flight request still matches its whole lock.
        assert not locked & removed.keys()
        for r in self.inflight:
            m = self.cache.match_prefix(r.tokens[: r.tree_len], r.ns, record=False)
            assert m.slots.tolist() == r.slots[: r.tree_len]
        # LRU: everything evicted was used no later than any unlocked leaf left behind.
        leaves = [
            k
            for k in after
            if k not in locked and not any((k[0], k[1] + (x,)) in after for x in range(4))
        ]
        if removed and leaves:
            assert max(self.touched[k] for k in removed) <= min(self.touched[k] for k in leaves)
        self.ref = after
        self.evicted += got
        return got

    # -- rules --

    @precondition(lambda self: len(self.inflight) < MAX_INFLIGHT)
    @rule(data=st.data())
    def request(self, data):
        self._request(*self.draw_sequence(data))

    @rule(data=st.data())
    def complete_request(self, data):
        """A request admitted and finished in one step (fills the tree quickly)."""
        if self._request(*self.draw_sequence(data)):
            r = self.inflight.pop()
            self._insert(r, len(r.tokens))
            self.cache.unlock(r.node)

    def _request(self, ns, tokens: tuple[int, ...]) -> bool:
        """Match, lock, evict if short, allocate the rest; False if the pool is too full."""
        expect = self.cached_len(ns, tokens)
        m, freed = self.call(self.cache.match_prefix, list(tokens), ns)
        assert freed == []
        assert m.length == expect
        assert m.slots.tolist() == [self.ref[(ns, tokens[: i + 1])] for i in range(expect)]
        assert m.slots.dtype == torch.int64
        self.query += len(tokens)
        self.hit += expect
        if expect:
            self.touch(ns, tokens[:expect])
        self.cache.lock(m.node)
        need = len(tokens) - expect
        short = need - self.allocator.num_free
        if short > 0:
            # Like the scheduler: evict with the match locked, give up if still short.
            self.inflight.append(Request(ns, tokens, m.node, expect, m.slots.tolist()))
            self.checked_evict(short)
            self.inflight.pop()
            if self.allocator.num_free < need:
                self.cache.unlock(m.node)
                return False
        own = self.allocator.alloc(need).tolist()
        self.inflight.append(Request(ns, tokens, m.node, expect, m.slots.tolist() + own))
        return True

    def _insert(self, r: Request, n: int) -> None:
        """Insert r's first n tokens and check the cached count and freed duplicates."""
        tokens = r.tokens[:n]
        expect = self.cached_len(r.ns, tokens)
        dups = [
            r.slots[i] for i in range(expect) if self.ref[(r.ns, tokens[: i + 1])] != r.slots[i]
        ]
        assert dups == r.slots[r.tree_len : max(expect, r.tree_len)]
        got, freed = self.call(self.cache.insert, list(tokens), t(*r.slots[:n]), r.ns)
        assert got == expect
        assert sorted(freed) == sorted(dups)
        for i in range(expect, n):
            self.ref[(r.ns, tokens[: i + 1])] = r.slots[i]
        self.inserted += n - expect
        self.touch(r.ns, tokens)

    @precondition(lambda self: self.inflight)
    @rule(data=st.data())
    def finish(self, data):
        r = self.inflight.pop(data.draw(st.integers(0, len(self.inflight) - 1)))
        self._insert(r, len(r.tokens))
        self.cache.unlock(r.node)

    @precondition(lambda self: self.inflight)
    @rule(data=st.data())
    def checkpoint(self, data):
        """Chunked prefill: insert what was computed so far and move the lock to it."""
        r = self.inflight[data.draw(st.integers(0, len(self.inflight) - 1))]
        n = data.draw(st.integers(r.tree_len, len(r.tokens)))
        self._insert(r, n)
        m, freed = self.call(self.cache.match_prefix, list(r.tokens[:n]), r.ns, record=False)
        assert freed == []
        assert m.length == n
        self.cache.lock(m.node)
        self.cache.unlock(r.node)
        r.node, r.tree_len = m.node, n
        r.slots[:n] = m.slots.tolist()

    @precondition(lambda self: self.inflight)
    @rule(data=st.data())
    def abort(self, data):
        """A request that gives its own slots straight back and caches nothing."""
        r = self.inflight.pop(data.draw(st.integers(0, len(self.inflight) - 1)))
        self.allocator.free(t(*r.private))
        self.cache.unlock(r.node)

    @rule(n=st.integers(-1, 6))
    def evict(self, n):
        self.checked_evict(n)

    @rule()
    def flush(self):
        protected = len(self.locked())
        self.checked_evict(self.cache.evictable_size)
        assert self.cache.total_size == self.cache.protected_size == protected
        assert self.ref.keys() == self.locked()
        if not self.inflight:
            assert self.cache.total_size == 0
            assert self.allocator.num_free == POOL_SIZE
            assert sorted(self.allocator._free.tolist()) == list(range(1, POOL_SIZE + 1))

    @rule(data=st.data())
    def peek(self, data):
        ns, tokens = self.draw_sequence(data)
        expect = self.cached_len(ns, tokens)
        m, freed = self.call(self.cache.match_prefix, list(tokens), ns, record=False)
        assert freed == [] and m.length == expect
        assert m.slots.tolist() == [self.ref[(ns, tokens[: i + 1])] for i in range(expect)]

    # -- after every step --

    @invariant()
    def consistent(self):
        cache = self.cache
        cache.check_integrity()
        assert tree_contents(cache) == self.ref
        locked = self.locked()
        assert cache.protected_size == len(locked)
        assert cache.evictable_size == len(self.ref) - len(locked)
        assert cache.evictable_size + cache.protected_size == cache.total_size == len(self.ref)
        free = self.allocator._free.tolist()
        held = cache.held_slots().tolist()
        private = [s for r in self.inflight for s in r.private]
        assert sorted(held) == sorted(self.ref.values())
        assert self.allocator.num_free + cache.total_size + len(private) == POOL_SIZE
        assert sorted(free + held + private) == list(range(1, POOL_SIZE + 1))  # no slot twice
        for r in self.inflight:  # the locked prefix is still the tree's
            assert all(self.ref[(r.ns, r.tokens[: i + 1])] == r.slots[i] for i in range(r.tree_len))
        s = cache.stats
        assert (s.query_tokens, s.hit_tokens) == (self.query, self.hit)
        assert (s.inserted_tokens, s.evicted_tokens) == (self.inserted, self.evicted)


RadixMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestRadixStateMachine = RadixMachine.TestCase


# ---- unit tests --------------------------------------------------------------------------


def test_match_ending_inside_a_run_splits_the_node():
    cache, freed = recording_cache()
    assert cache.insert([1, 2, 3, 4], t(11, 12, 13, 14)) == 0
    assert (
        cache.pretty_print() == "namespace None:\n  [1 2 3 4] len=4 lock=0\nevictable=4 protected=0"
    )
    m = cache.match_prefix([1, 2, 9])
    assert m.length == 2 and m.slots.tolist() == [11, 12]
    assert m.node.key == [1, 2] and m.node.value.tolist() == [11, 12]
    assert cache.pretty_print() == (
        "namespace None:\n  [1 2] len=2 lock=0\n    [3 4] len=2 lock=0\nevictable=4 protected=0"
    )
    assert cache.match_prefix([1, 2, 3, 4, 5]).slots.tolist() == [11, 12, 13, 14]
    assert freed == [] and cache.total_size == 4
    cache.check_integrity()


def test_insert_of_a_diverging_sequence_splits_and_both_branches_match():
    cache, freed = recording_cache()
    cache.insert([1, 2, 3, 4], t(11, 12, 13, 14))
    assert cache.insert([1, 2, 7, 8], t(11, 12, 17, 18)) == 2
    assert cache.pretty_print() == (
        "namespace None:\n  [1 2] len=2 lock=0\n    [3 4] len=2 lock=0\n"
        "    [7 8] len=2 lock=0\nevictable=6 protected=0"
    )
    assert cache.match_prefix([1, 2, 3, 4]).slots.tolist() == [11, 12, 13, 14]
    assert cache.match_prefix([1, 2, 7, 8]).slots.tolist() == [11, 12, 17, 18]
    assert freed == [] and cache.total_size == 6
    cache.check_integrity()


def test_insert_returns_already_cached_slots_to_the_pool():
    cache, freed = recording_cache()
    cache.insert([1, 2, 3], t(11, 12, 13))
    assert cache.insert([1, 2, 3, 4], t(21, 22, 23, 24)) == 3
    assert freed == [[21, 22, 23]]
    assert cache.match_prefix([1, 2, 3, 4]).slots.tolist() == [11, 12, 13, 24]
    assert cache.total_size == 4
    # A sequence inside a cached run: split, its slots freed, nothing adopted.
    freed.clear()
    assert cache.insert([1, 2], t(31, 32)) == 2
    assert freed == [[31, 32]] and cache.total_size == 4
    cache.check_integrity()


def test_insert_keeps_the_requests_own_matched_prefix():
    cache, freed = recording_cache()
    cache.insert([1, 2, 3, 4], t(11, 12, 13, 14))
    m = cache.match_prefix([1, 2, 3, 5, 6])
    cache.lock(m.node)
    assert cache.insert([1, 2, 3, 5, 6], torch.cat([m.slots, t(25, 26)])) == 3
    cache.unlock(m.node)
    assert freed == []
    assert cache.match_prefix([1, 2, 3, 5, 6]).slots.tolist() == [11, 12, 13, 25, 26]
    cache.check_integrity()


def test_insert_frees_only_the_private_slots_another_request_cached_first():
    cache, freed = recording_cache()
    cache.insert([1, 2], t(11, 12))
    m = cache.match_prefix([1, 2, 3, 4])
    cache.lock(m.node)
    assert cache.insert([1, 2, 3], t(11, 12, 33)) == 2  # another request, same prefix
    assert freed == []
    assert cache.insert([1, 2, 3, 4], torch.cat([m.slots, t(23, 24)])) == 3
    cache.unlock(m.node)
    assert freed == [[23]]
    assert cache.match_prefix([1, 2, 3, 4]).slots.tolist() == [11, 12, 33, 24]
    cache.check_integrity()


def test_insert_rejects_a_length_mismatch():
    cache, _ = recording_cache()
    with pytest.raises(ValueError, match="3 tokens but 2 slots"):
        cache.insert([1, 2, 3], t(11, 12))


def test_lock_protects_the_whole_path_and_unlock_releases_it():
    cache, freed = recording_cache()
    cache.insert([1, 2, 3, 4], t(11, 12, 13, 14))
    cache.insert([1, 2, 5], t(11, 12, 15))
    m = cache.match_prefix([1, 2, 5])
    cache.lock(m.node)
    assert (cache.protected_size, cache.evictable_size) == (3, 2)
    cache.check_integrity()
    assert cache.evict(100) == 2
    assert freed == [[13, 14]]
    assert cache.match_prefix([1, 2, 5]).slots.tolist() == [11, 12, 15]
    assert cache.match_prefix([1, 2, 3, 4]).length == 2
    assert cache.flush() == 0
    cache.unlock(m.node)
    assert (cache.protected_size, cache.evictable_size) == (0, 3)
    freed.clear()
    assert cache.evict(100) == 3
    assert freed == [[15], [11, 12]]  # leaf first, then its parent
    assert cache.total_size == 0
    cache.check_integrity()


def test_two_locks_on_one_path_need_two_unlocks():
    cache, _ = recording_cache()
    cache.insert([1, 2, 3], t(11, 12, 13))
    a = cache.match_prefix([1, 2, 3])
    b = cache.match_prefix([1])  # splits a's node: the lock must cover both halves
    cache.lock(a.node)
    cache.lock(b.node)
    assert cache.protected_size == 3
    cache.unlock(a.node)
    assert (cache.protected_size, cache.evictable_size) == (1, 2)
    assert cache.evict(100) == 2
    cache.unlock(b.node)
    assert cache.evict(100) == 1 and cache.total_size == 0
    cache.check_integrity()


def test_unlock_of_an_unlocked_node_raises():
    cache, _ = recording_cache()
    cache.insert([1, 2], t(11, 12))
    m = cache.match_prefix([1, 2])
    with pytest.raises(RuntimeError, match="unlock of an unlocked node"):
        cache.unlock(m.node)
    cache.lock(m.node)
    cache.unlock(m.node)
    with pytest.raises(RuntimeError, match="unlock of an unlocked node"):
        cache.unlock(m.node)


def test_evict_takes_the_least_recently_used_leaf_first():
    cache, freed = recording_cache()
    cache.insert([1, 1], t(11, 12))
    cache.insert([2, 2], t(21, 22))
    cache.insert([3, 3], t(31, 32))
    assert cache.evict(1) == 2  # whole nodes: at least 1, here 2
    assert freed == [[11, 12]]
    cache.match_prefix([2, 2, 0])  # a use: [3 3] is now the oldest
    assert cache.evict(1) == 2
    assert freed == [[11, 12], [31, 32]]
    assert cache.match_prefix([2, 2]).length == 2
    cache.check_integrity()


@pytest.mark.parametrize("record, first", [(True, [21, 22]), (False, [11, 12])])
def test_evict_order_follows_recorded_matches_only(record, first):
    cache, freed = recording_cache()
    cache.insert([1, 1], t(11, 12))
    cache.insert([2, 2], t(21, 22))
    assert cache.match_prefix([1, 1], record=record).length == 2
    assert cache.evict(1) == 2
    assert freed == [first]


def test_evict_of_a_parent_waits_for_its_leaves():
    cache, freed = recording_cache()
    cache.insert([1, 2, 3], t(11, 12, 13))
    cache.insert([1, 2, 4], t(11, 12, 14))
    cache.match_prefix([1, 2])  # the shared [1 2] is the most recent, but not a leaf
    assert cache.evict(1) == 1 and freed == [[13]]
    assert cache.evict(2) == 3 and freed == [[13], [14], [11, 12]]
    assert cache.total_size == 0 and cache.stats.evicted_tokens == 4
    cache.check_integrity()


def test_namespaces_never_match_each_other():
    cache, freed = recording_cache()
    assert cache.insert([1, 2, 3], t(11, 12, 13), namespace="a") == 0
    assert cache.match_prefix([1, 2, 3]).length == 0
    assert cache.match_prefix([1, 2, 3], namespace="b").length == 0
    assert cache.insert([1, 2, 3], t(21, 22, 23), namespace="b") == 0
    assert freed == []
    assert cache.match_prefix([1, 2, 3], namespace="a").slots.tolist() == [11, 12, 13]
    assert cache.match_prefix([1, 2, 3], namespace="b").slots.tolist() == [21, 22, 23]
    assert cache.total_size == 6
    assert sorted(cache.held_slots().tolist()) == [11, 12, 13, 21, 22, 23]
    cache.check_integrity()


def test_hit_and_query_counters():
    cache, _ = recording_cache()
    cache.insert([1, 2, 3], t(11, 12, 13))
    cache.match_prefix([1, 2, 3, 4])
    cache.match_prefix([9])
    assert (cache.stats.query_tokens, cache.stats.hit_tokens) == (5, 3)
    cache.match_prefix([1, 2], record=False)
    assert (cache.stats.query_tokens, cache.stats.hit_tokens) == (5, 3)
    assert cache.stats.hit_rate == pytest.approx(3 / 5)
    assert cache.stats.inserted_tokens == 3
    cache.insert([1, 2, 3, 4, 5], t(11, 12, 13, 14, 15))
    assert cache.stats.inserted_tokens == 5


def test_reset_forgets_everything_without_freeing():
    cache, freed = recording_cache()
    cache.insert([1, 2, 3], t(11, 12, 13))
    cache.lock(cache.match_prefix([1, 2]).node)
    cache.reset()
    assert freed == []
    assert (cache.total_size, cache.evictable_size, cache.protected_size) == (0, 0, 0)
    assert (cache.stats.query_tokens, cache.stats.hit_tokens, cache.stats.inserted_tokens) == (
        0,
        0,
        0,
    )
    assert cache.held_slots().numel() == 0
    assert cache.pretty_print() == "evictable=0 protected=0"
    assert cache.match_prefix([1, 2, 3]).length == 0
    assert cache.insert([1, 2, 3], t(21, 22, 23)) == 0 and freed == []
    cache.check_integrity()


def test_check_integrity_catches_a_wrong_size():
    cache, _ = recording_cache()
    cache.insert([1, 2], t(11, 12))
    cache.evictable_size += 1
    with pytest.raises(AssertionError):
        cache.check_integrity()


def test_null_cache_caches_nothing():
    freed: list[list[int]] = []
    cache = NullCache(lambda s: freed.append(s.tolist()))
    m = cache.match_prefix([1, 2, 3])
    assert m.length == 0 and m.slots.numel() == 0
    assert cache.stats.query_tokens == 3 and cache.stats.hit_tokens == 0
    cache.lock(m.node)
    assert cache.insert([1, 2, 3], t(11, 12, 13)) == 0
    cache.unlock(m.node)
    assert freed == [[11, 12, 13]]
    assert cache.insert([1, 2, 3], t(21, 22, 23)) == 0
    assert freed == [[11, 12, 13], [21, 22, 23]]
    assert cache.match_prefix([1, 2, 3]).length == 0
    assert cache.evict(10) == 0 and cache.flush() == 0
    assert cache.total_size == cache.evictable_size == cache.protected_size == 0
    assert cache.held_slots().numel() == 0
    cache.check_integrity()
