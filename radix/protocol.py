"""PrefixCache: what the scheduler asks of a prefix cache.

Two implementations: ``RadixCache`` (the radix tree) and ``NullCache``
(``disable_radix_cache=True``: matches nothing, keeps nothing). The scheduler
runs the same code over either; ``enabled`` only tells its policies whether
waiting for a prefix to be cached can pay off.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Protocol

import torch

from plait.radix.cache import CacheStats, MatchResult, TreeNode


class PrefixCache(Protocol):
    enabled: bool  # False: nothing inserted is ever matched (the null cache)
    stats: CacheStats
    evictable_size: int  # tokens in unlocked nodes
    protected_size: int  # tokens in locked nodes

    @property
    def total_size(self) -> int: ...

    def match_prefix(
        self, tokens: Sequence[int], namespace: Hashable | None = None, record: bool = True
    ) -> MatchResult:
        """Longest cached prefix of ``tokens``; lock its node before using its slots."""

    def record_query(self, node: TreeNode, query_tokens: int, hit_tokens: int) -> None:
        """Count a match made with ``record=False`` once it is really used."""

    def lock(self, node: TreeNode) -> None:
        """Protect the path from ``node`` to the root from eviction."""

    def unlock(self, node: TreeNode) -> None: ...

    def insert(
        self, tokens: Sequence[int], slots: torch.Tensor, namespace: Hashable | None = None
    ) -> int:
        """Hand over the KV ``slots`` of ``tokens``: kept, or freed when not needed."""

    def insert_running(
        self,
        tokens: Sequence[int],
        slots: torch.Tensor,
        node: TreeNode,
        namespace: Hashable | None = None,
    ) -> MatchResult:
        """Cache what a running request has computed (``tokens``, ``slots``) and move
        its lock from ``node`` to the node covering them. Returns that match: the
        request's row must now point at its slots (the duplicates went back to the pool)."""

    def evict(self, num_tokens: int) -> int:
        """Free at least ``num_tokens`` unlocked slots if possible; returns how many."""

    def flush(self) -> int:
        """Evict everything unlocked."""

    def reset(self) -> None:
        """Forget everything (the caller resets the pool too)."""

    def held_slots(self) -> torch.Tensor: ...

    def check_integrity(self) -> None: ...

    def pretty_print(self) -> str: ...
