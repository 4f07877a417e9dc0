"""The radix prefix cache: token-id runs -> KV slot indices.

    root ── [The, cat] ── [sat, on, the, mat]
                       └─ [ran, away]

Every edge holds a run of token ids and the KV slots computed for them. A
request's prompt is matched against the tree; the slots along the matched
path are lent to it (its node is locked, which protects the whole path from
eviction) and only the rest of the prompt is computed. When the request
ends its tokens are inserted: the tree adopts the slots of tokens it did not
have, and slots for tokens it already had are handed back to the pool.
Unlocked leaves are evicted in least-recently-used order when the pool runs
short.

Ownership invariant (checked by ``check_integrity``): every slot is either
free in the pool, held by exactly one tree node, or held by exactly one
running request beyond its cached prefix.

The cache knows nothing of models or devices: it stores index tensors and
returns freed slots through a callback.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch

FreeFn = Callable[[torch.Tensor], None]


class TreeNode:
    __slots__ = ("key", "value", "children", "parent", "lock_ref", "last_access", "id")
    _ids = itertools.count()

    def __init__(self, key: list[int], value: torch.Tensor, parent: TreeNode | None):
        self.key = key  # token ids of the edge into this node
        self.value = value  # their KV slots, same length
        self.children: dict[int, TreeNode] = {}
        self.parent = parent
        self.lock_ref = 0
        self.last_access = 0
        self.id = next(TreeNode._ids)

    @property
    def is_leaf(self) -> bool:
        return not self.children

    def __lt__(self, other: TreeNode) -> bool:  # for the eviction heap
        return self.last_access < other.last_access


@dataclass
class MatchResult:
    slots: torch.Tensor  # KV slots of the matched prefix
    node: TreeNode  # the deepest node of the match; lock it while the slots are in use

    @property
    def length(self) -> int:
        return int(self.slots.numel())


@dataclass
class CacheStats:
    query_tokens: int = 0
    hit_tokens: int = 0
    evicted_tokens: int = 0
    inserted_tokens: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0


class RadixCache:
    """Prefix cache over KV slots. ``free`` returns slots to the pool."""

    enabled = True

    def __init__(self, free: FreeFn, device: torch.device | str = "cpu"):
        self.free = free
        self.device = torch.device(device)
        self._empty = torch.empty(0, dtype=torch.int64, device=self.device)
        self._clock = itertools.count(1)
        self.reset()

    # ---- bookkeeping -----------------------------------------------------------

    def reset(self) -> None:
        """Forget everything (without freeing: the caller resets the pool too)."""
        self._roots: dict[Hashable, TreeNode] = {}
        self.evictable_size = 0  # tokens in unlocked nodes
        self.protected_size = 0  # tokens in locked nodes
        self.stats = CacheStats()

    def _root(self, namespace: Hashable | None) -> TreeNode:
        root = self._roots.get(namespace)
        if root is None:
            root = TreeNode([], self._empty, None)
            root.lock_ref = 1  # the root is never evicted
            self._roots[namespace] = root
        return root

    @property
    def total_size(self) -> int:
        return self.evictable_size + self.protected_size

    def _touch(self, node: TreeNode) -> None:
        t = next(self._clock)
        while node is not None:
            node.last_access = t
            node = node.parent

    # ---- match / insert ----------------------------------------------------------

    def match_prefix(
        self, tokens: Sequence[int], namespace: Hashable | None = None, record: bool = True
    ) -> MatchResult:
        """Longest cached prefix of ``tokens``. Splits a node when the match ends inside
        its run, so the returned node covers exactly the matched prefix. ``record=False``
        leaves the hit counters and recency alone (a look, not a use)."""
        node = self._root(namespace)
        parts: list[torch.Tensor] = []
        i = 0
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                break
            n = _common_len(child.key, tokens, i)
            if n < len(child.key):
                child = self._split(child, n)
            parts.append(child.value)
            node = child
            i += n
        if record:
            self.record_query(node, len(tokens), i)
        slots = torch.cat(parts) if parts else self._empty
        return MatchResult(slots, node)

    def record_query(self, node: TreeNode, query_tokens: int, hit_tokens: int) -> None:
        """Count a use of a match made with ``record=False`` (once it is really used)."""
        self._touch(node)
        self.stats.query_tokens += query_tokens
        self.stats.hit_tokens += hit_tokens

    def insert(
        self, tokens: Sequence[int], slots: torch.Tensor, namespace: Hashable | None = None
    ) -> int:
        """Cache ``tokens`` with their ``slots``. The tree adopts the slots of tokens it
        did not hold; for tokens it already held, any different slot passed in is a
        duplicate and goes back to the pool. Returns how many tokens were already cached."""
        if len(tokens) != slots.numel():
            raise ValueError(f"insert: {len(tokens)} tokens but {slots.numel()} slots")
        node = self._root(namespace)
        i, cached = 0, len(tokens)
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                cached = i
                new = TreeNode(list(tokens[i:]), slots[i:].clone(), node)
                node.children[tokens[i]] = new
                self.evictable_size += len(new.key)
                self.stats.inserted_tokens += len(new.key)
                node = new
                break
            n = _common_len(child.key, tokens, i)
            if n < len(child.key):
                child = self._split(child, n)
            dup = slots[i : i + n]
            self._free_duplicates(dup, child.value)
            node = child
            i += n
        self._touch(node)
        return cached

    def insert_running(
        self,
        tokens: Sequence[int],
        slots: torch.Tensor,
        node: TreeNode,
        namespace: Hashable | None = None,
    ) -> MatchResult:
        """Cache what a running request has computed and move its lock from ``node`` to
        the node covering ``tokens``; the request's row must point at the returned slots."""
        self.insert(tokens, slots, namespace)
        match = self.match_prefix(tokens, namespace, record=False)
        self.lock(match.node)
        self.unlock(node)
        return match

    def _free_duplicates(self, passed: torch.Tensor, held: torch.Tensor) -> None:
        different = passed != held
        if bool(different.any()):
            self.free(passed[different])

    def _split(self, node: TreeNode, n: int) -> TreeNode:
        """Split ``node``'s run after ``n`` tokens; returns the new upper node."""
        parent = node.parent
        upper = TreeNode(node.key[:n], node.value[:n], parent)
        upper.lock_ref = node.lock_ref
        upper.last_access = node.last_access
        parent.children[upper.key[0]] = upper
        node.key, node.value = node.key[n:], node.value[n:]
        node.parent = upper
        upper.children[node.key[0]] = node
        return upper

    # ---- locks ---------------------------------------------------------------------

    def lock(self, node: TreeNode) -> None:
        """Protect the path from ``node`` to the root from eviction."""
        while node.parent is not None:
            if node.lock_ref == 0:
                self.evictable_size -= len(node.key)
                self.protected_size += len(node.key)
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: TreeNode) -> None:
        while node.parent is not None:
            if node.lock_ref <= 0:
                raise RuntimeError(f"unlock of an unlocked node {node.id}")
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self.evictable_size += len(node.key)
                self.protected_size -= len(node.key)
            node = node.parent

    # ---- eviction ------------------------------------------------------------------

    def evict(self, num_tokens: int) -> int:
        """Free at least ``num_tokens`` slots from unlocked leaves, least recently used
        first (fewer when not enough are evictable). Returns the number freed."""
        heap = [n for n in self._nodes() if n.is_leaf and n.lock_ref == 0 and n.parent]
        heapq.heapify(heap)
        freed = 0
        while freed < num_tokens and heap:
            leaf = heapq.heappop(heap)
            self.free(leaf.value)
            freed += len(leaf.key)
            self.evictable_size -= len(leaf.key)
            parent = leaf.parent
            del parent.children[leaf.key[0]]
            if parent.parent is not None and parent.is_leaf and parent.lock_ref == 0:
                heapq.heappush(heap, parent)
        self.stats.evicted_tokens += freed
        return freed

    def flush(self) -> int:
        """Evict everything unlocked; returns the number of slots freed."""
        return self.evict(self.evictable_size)

    # ---- inspection ------------------------------------------------------------------

    def _nodes(self):
        stack = list(self._roots.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def held_slots(self) -> torch.Tensor:
        parts = [n.value for n in self._nodes() if n.parent is not None]
        return torch.cat(parts) if parts else self._empty

    def check_integrity(self) -> None:
        """Raise AssertionError if the tree's bookkeeping is inconsistent."""
        evictable = protected = 0
        for node in self._nodes():
            if node.parent is None:
                continue
            assert len(node.key) == node.value.numel() > 0, f"node {node.id}: key/value lengths"
            assert node.parent.children.get(node.key[0]) is node, f"node {node.id}: parent link"
            child_locks = sum(c.lock_ref for c in node.children.values())
            assert node.lock_ref >= child_locks, f"node {node.id}: lock below its children's"
            if node.lock_ref:
                protected += len(node.key)
            else:
                evictable += len(node.key)
        assert evictable == self.evictable_size, (evictable, self.evictable_size)
        assert protected == self.protected_size, (protected, self.protected_size)
        held = self.held_slots()
        assert held.unique().numel() == held.numel(), "a slot is held by two nodes"

    def pretty_print(self) -> str:
        lines: list[str] = []

        def walk(node: TreeNode, depth: int) -> None:
            for child in sorted(node.children.values(), key=lambda c: c.key[0]):
                head = " ".join(map(str, child.key[:8])) + (" ..." if len(child.key) > 8 else "")
                lines.append(f"{'  ' * depth}[{head}] len={len(child.key)} lock={child.lock_ref}")
                walk(child, depth + 1)

        for ns, root in self._roots.items():
            lines.append(f"namespace {ns!r}:")
            walk(root, 1)
        lines.append(f"evictable={self.evictable_size} protected={self.protected_size}")
        return "\n".join(lines)


class NullCache:
    """The same interface caching nothing: ``disable_radix_cache=True``."""

    enabled = False

    def __init__(self, free: FreeFn, device: torch.device | str = "cpu"):
        self.free = free
        self._empty = torch.empty(0, dtype=torch.int64, device=torch.device(device))
        self._root = TreeNode([], self._empty, None)
        self.evictable_size = self.protected_size = self.total_size = 0
        self.stats = CacheStats()

    def reset(self) -> None:
        self.stats = CacheStats()

    def match_prefix(
        self, tokens: Sequence[int], namespace: Hashable | None = None, record: bool = True
    ) -> MatchResult:
        if record:
            self.stats.query_tokens += len(tokens)
        return MatchResult(self._empty, self._root)

    def record_query(self, node: TreeNode, query_tokens: int, hit_tokens: int) -> None:
        self.stats.query_tokens += query_tokens

    def insert(
        self, tokens: Sequence[int], slots: torch.Tensor, namespace: Hashable | None = None
    ) -> int:
        self.free(slots)
        return 0

    def insert_running(
        self,
        tokens: Sequence[int],
        slots: torch.Tensor,
        node: TreeNode,
        namespace: Hashable | None = None,
    ) -> MatchResult:
        return MatchResult(self._empty, node)  # nothing cached: the request keeps its slots

    def lock(self, node: TreeNode) -> None:
        pass

    def unlock(self, node: TreeNode) -> None:
        pass

    def evict(self, num_tokens: int) -> int:
        return 0

    def flush(self) -> int:
        return 0

    def held_slots(self) -> torch.Tensor:
        return self._empty

    def check_integrity(self) -> None:
        pass

    def pretty_print(self) -> str:
        return "(radix cache disabled)"


def _common_len(key: list[int], tokens: Sequence[int], start: int) -> int:
    n = min(len(key), len(tokens) - start)
    i = 0
    while i < n and key[i] == tokens[start + i]:
        i += 1
    return i
