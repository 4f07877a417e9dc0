"""plait.radix: the prefix cache behind the ``PrefixCache`` protocol: the radix tree
(pure Python over KV slot-index tensors) and the null cache that keeps nothing."""

from __future__ import annotations

from plait.radix.cache import CacheStats, MatchResult, NullCache, RadixCache, TreeNode
from plait.radix.protocol import PrefixCache

__all__ = ["CacheStats", "MatchResult", "NullCache", "PrefixCache", "RadixCache", "TreeNode"]
