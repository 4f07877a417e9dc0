"""plait.radix: the radix prefix cache (pure Python over KV slot-index tensors)."""

from __future__ import annotations

from plait.radix.cache import CacheStats, MatchResult, NullCache, RadixCache, TreeNode

__all__ = ["CacheStats", "MatchResult", "NullCache", "RadixCache", "TreeNode"]
