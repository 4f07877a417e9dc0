"""The vision-embedding cache: an image's encoder output, computed once.

A vision-language request pays for its images twice over if the encoder runs on
every request: a chat that shows one photo for ten turns, or 8 requests about the
same picture, would encode it ten or eight times. ``EmbeddingCache`` keeps encoder
outputs keyed by what determines them, the image's content hash
(``LoadedImage.content_hash``: decoded pixels, so a path and its base64 are one
image) and the processor's settings (any hashable value the caller builds: tile
size, resolution, the model), with ``cache_key``.

- **Bounded in bytes**, least recently used first out. A value is a tensor, or a
  list / tuple of tensors (one per tile or view), sized by ``nbytes``; values stay
  on whatever device the encoder left them. An entry larger than the whole budget
  is returned to its caller but not kept (keeping it would empty the cache for one
  image that no other request can be sure to reuse). A budget of 0 keeps nothing.
- **One encoder pass per call**: ``get_or_encode(keys, encode_fn)`` looks every key
  up, and calls ``encode_fn`` once with the positions of the missing images, each
  distinct image once (the same image twice in one call is encoded once).
- **One encoder pass per image across threads**: a key being encoded by one call is
  *pending*; another call that needs it waits for that encode instead of running
  the encoder again (single flight). If the first encode fails, the waiter encodes
  the image itself, so one request's failure is not handed to another.
- **Stats**: a lookup is a hit or a miss, and ``misses`` counts exactly the images
  handed to the encoder (a duplicate within a call, or a wait on another call's
  encode, is a hit; a wait whose encode failed counts as whatever its retry is).
  ``CacheStats.as_dict()`` names the figures as ``get_stats()`` shows them.

Thread-safe: one lock guards the table and the pending set; the encoder runs
outside it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

GIB = 2**30

# What each figure of CacheStats.as_dict() means, and its Prometheus kind: for the
# server's /metrics (a counter only grows; a gauge is read as it is).
STAT_FIELDS: dict[str, tuple[str, str]] = {
    "mm_cache_hits": ("counter", "image lookups served from the vision-embedding cache"),
    "mm_cache_misses": ("counter", "images the vision encoder ran on"),
    "mm_cache_evictions": ("counter", "vision embeddings evicted to stay within the budget"),
    "mm_cache_bytes": ("gauge", "bytes of vision embeddings held"),
    "mm_cache_entries": ("gauge", "vision embeddings held"),
    "mm_cache_capacity_bytes": ("gauge", "the vision-embedding cache's byte budget"),
    "mm_cache_hit_rate": ("gauge", "hits / lookups of the vision-embedding cache"),
}


def prometheus_families(stats: dict[str, Any], prefix: str = "plait_") -> list[Any]:
    """The figures of ``STAT_FIELDS`` found in ``stats`` (an engine's ``get_stats()``)
    as Prometheus metric families, for a collector's ``collect`` to yield. A counter
    shows as ``<name>_total``."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    families = []
    for name, (kind, doc) in STAT_FIELDS.items():
        if name in stats:
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            families.append(family(prefix + name, doc, value=float(stats[name])))
    return families


def cache_key(content_hash: str, settings: Hashable) -> tuple[str, Hashable]:
    """The key of one image's embedding: its content hash and the processor settings
    that shaped its pixels (two settings give two entries)."""
    return (content_hash, settings)


def nbytes(value: Any) -> int:
    """The bytes of a tensor, or of a list / tuple of tensors (nested)."""
    if isinstance(value, (list, tuple)):
        return sum(nbytes(v) for v in value)
    size = getattr(value, "nbytes", None)
    if not isinstance(size, int):
        raise TypeError(
            f"a vision embedding is a tensor or a list of tensors, not {type(value).__name__}"
        )
    return size


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    evictions: int
    bytes: int
    entries: int
    capacity_bytes: int

    @property
    def hit_rate(self) -> float:
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0

    def as_dict(self) -> dict[str, float]:
        """The figures under the names of ``STAT_FIELDS`` (``get_stats()``'s keys)."""
        return {
            "mm_cache_hits": self.hits,
            "mm_cache_misses": self.misses,
            "mm_cache_evictions": self.evictions,
            "mm_cache_bytes": self.bytes,
            "mm_cache_entries": self.entries,
            "mm_cache_capacity_bytes": self.capacity_bytes,
            "mm_cache_hit_rate": self.hit_rate,
        }


class _Pending:
    """An encode in flight: waiters block on ``done``; ``ok`` says whether ``value`` came."""

    __slots__ = ("done", "ok", "value")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.ok = False
        self.value: Any = None


class EmbeddingCache:
    """An LRU of vision embeddings bounded by ``capacity_bytes`` (see the module doc)."""

    def __init__(self, capacity_bytes: int):
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes={capacity_bytes!r}: must be >= 0")
        self.capacity_bytes = int(capacity_bytes)
        self._entries: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()  # oldest first
        self._pending: dict[Hashable, _Pending] = {}
        self._lock = threading.Lock()
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._evictions = 0

    @classmethod
    def from_gb(cls, gb: float) -> EmbeddingCache:
        """A cache of ``gb`` GiB (``EngineConfig.mm_cache_memory_gb``)."""
        return cls(int(gb * GIB))

    # ---- lookups ------------------------------------------------------------------------------

    def get(self, key: Hashable) -> Any | None:
        """The embedding under ``key`` (now the most recently used), or None; counted."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self._misses += 1
                return None
            self._entries.move_to_end(key)
            self._hits += 1
            return entry[0]

    def put(self, key: Hashable, value: Any) -> bool:
        """Keep ``value`` under ``key``, evicting the least recently used entries to make
        room. Returns False (and keeps nothing) when it alone exceeds the budget."""
        size = nbytes(value)
        with self._lock:
            return self._insert(key, value, size)

    def get_or_encode(
        self, keys: Sequence[Hashable], encode_fn: Callable[[list[int]], Sequence[Any]]
    ) -> list[Any]:
        """The embedding of each key, in order. ``encode_fn(positions)`` gets the positions
        in ``keys`` of the images to encode (the first position of each distinct missing
        key, ascending) and returns their embeddings in that order. It is called once at
        most, unless this call waited on another call's encode and that one failed (the
        images are then encoded here, in a second call). Keys another call is encoding
        are waited for, not encoded again. An error of ``encode_fn`` propagates and
        leaves nothing cached or pending for its images."""
        found: dict[Hashable, Any] = {}
        todo = list(dict.fromkeys(keys))  # distinct keys, first appearance first
        while todo:
            mine, waits = self._claim(todo, found)
            if mine:
                self._encode(keys, mine, encode_fn, found)
            # Our own claims are encoded before we wait on anyone else's, so two calls
            # that each wait on the other's image cannot deadlock.
            retry = []
            for key, pending in waits:
                pending.done.wait()
                if pending.ok:
                    found[key] = pending.value
                    with self._lock:
                        self._hits += 1
                else:  # the other call's encode failed: try again (it may now be ours)
                    retry.append(key)
            todo = retry
        with self._lock:
            self._hits += len(keys) - len(found)  # repeats within the call
        return [found[key] for key in keys]

    def _claim(
        self, todo: list[Hashable], found: dict[Hashable, Any]
    ) -> tuple[list[Hashable], list[tuple[Hashable, _Pending]]]:
        """Under the lock: take hits into ``found``, claim the keys no one is encoding
        (now pending on this call), and return those and the keys to wait for."""
        mine: list[Hashable] = []
        waits: list[tuple[Hashable, _Pending]] = []
        with self._lock:
            for key in todo:
                entry = self._entries.get(key)
                if entry is not None:
                    self._entries.move_to_end(key)
                    found[key] = entry[0]
                    self._hits += 1
                elif key in self._pending:
                    waits.append((key, self._pending[key]))  # counted when it resolves
                else:
                    self._pending[key] = _Pending()
                    mine.append(key)
                    self._misses += 1
        return mine, waits

    def _encode(
        self,
        keys: Sequence[Hashable],
        mine: list[Hashable],
        encode_fn: Callable[[list[int]], Sequence[Any]],
        found: dict[Hashable, Any],
    ) -> None:
        first = {}
        for i, key in enumerate(keys):
            first.setdefault(key, i)
        positions = sorted(first[key] for key in mine)
        try:
            values = list(encode_fn(positions))
            if len(values) != len(positions):
                raise ValueError(
                    f"encode_fn returned {len(values)} embeddings for {len(positions)} images"
                )
            sizes = [nbytes(v) for v in values]
        except BaseException:
            with self._lock:
                for key in mine:
                    self._pending.pop(key).done.set()  # ok stays False: waiters retry
            raise
        with self._lock:
            for pos, value, size in zip(positions, values, sizes):
                key = keys[pos]
                self._insert(key, value, size)
                pending = self._pending.pop(key)
                pending.value, pending.ok = value, True
                pending.done.set()
                found[key] = value

    def _insert(self, key: Hashable, value: Any, size: int) -> bool:
        """Under the lock: add or replace an entry, evicting the oldest to fit."""
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old[1]
        if size > self.capacity_bytes:
            return False
        while self._bytes + size > self.capacity_bytes:
            _, (_, freed) = self._entries.popitem(last=False)
            self._bytes -= freed
            self._evictions += 1
        self._entries[key] = (value, size)
        self._bytes += size
        return True

    # ---- upkeep --------------------------------------------------------------------------------

    def __contains__(self, key: Hashable) -> bool:
        """Whether ``key`` is held (not counted, and not made recent)."""
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def clear(self) -> None:
        """Drop every entry (the counters stay: they count since the cache was made)."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                hits=self._hits,
                misses=self._misses,
                evictions=self._evictions,
                bytes=self._bytes,
                entries=len(self._entries),
                capacity_bytes=self.capacity_bytes,
            )
