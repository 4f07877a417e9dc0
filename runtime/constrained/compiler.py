"""GrammarCompiler: compiles specs off the caller's thread, with fallback and caches.

Fallback policy, tried in order until one compiles (``primary`` first):

1. ``llguidance`` (strict): milliseconds, exact for what it accepts;
2. ``outlines``: a regex per schema (recursion unrolled to depth 3); it skips
   some keywords silently (``dependencies``; ``not`` in places), and takes
   seconds to minutes on large schemas, so it runs under ``compile_timeout_s``;
3. ``llguidance-lenient``: ignores the keywords it cannot express, so outputs
   may break some schema constraints -- the last resort, and said so in
   ``fallback_reason``.

Invalid input (bad regex syntax, malformed JSON, an unsatisfiable schema, a
Lark/GBNF syntax error) raises :class:`GrammarError` at once, without fallback.
When no backend compiles a valid spec, GrammarError lists each one's reason.

A compile past its deadline cannot be stopped (a thread cannot be killed): it
finishes in the background and its grammar goes to the disk cache, and the
request falls back meanwhile. While such a straggler runs, other slow compiles
are skipped (fall back at once) so the cores stay with decoding; a later
request for the same spec picks the straggler's grammar up once it is done.

Caches: an in-memory LRU of results keyed by (backend chain, tokenizer
fingerprint, kind, source), and, given ``cache_dir``, pickled grammars of
persistent backends (outlines) keyed by (backend version, fingerprint, kind,
source). Only fallbacks not caused by a deadline are cached in memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, replace
from pathlib import Path

from plait.runtime.constrained.base import CompiledGrammar, GrammarBackend
from plait.runtime.constrained.llguidance_backend import LlguidanceBackend
from plait.runtime.constrained.outlines_backend import OutlinesBackend
from plait.runtime.constrained.spec import GrammarError, GrammarSpec, UnsupportedGrammar
from plait.runtime.constrained.vocab import TokenizerInfo

logger = logging.getLogger(__name__)

FALLBACK_ORDER = ("llguidance", "outlines", "llguidance-lenient")
LENIENT_NOTE = (
    "compiled by llguidance-lenient, which ignores unsupported keywords: "
    "outputs may not satisfy every schema constraint"
)


@dataclass(frozen=True)
class CompiledResult:
    grammar: CompiledGrammar
    backend: str
    fallback_reason: str | None = None


@dataclass(frozen=True)
class CacheStats:
    hits: int = 0
    misses: int = 0
    disk_hits: int = 0
    disk_writes: int = 0


def make_backend(name: str, tokenizer_info: TokenizerInfo) -> GrammarBackend:
    if name == "llguidance":
        return LlguidanceBackend(tokenizer_info)
    if name == "llguidance-lenient":
        return LlguidanceBackend(tokenizer_info, lenient=True)
    if name == "outlines":
        return OutlinesBackend(tokenizer_info)
    raise ValueError(f"unknown grammar backend {name!r}; known: {FALLBACK_ORDER}")


class _DeadlinePassed(UnsupportedGrammar):
    """A slow backend did not finish in time (or was skipped for a straggler)."""


class GrammarCompiler:
    """What the scheduler holds: ``submit(spec)`` -> Future[CompiledResult]."""

    def __init__(
        self,
        tokenizer_info: TokenizerInfo,
        primary: str = "llguidance",
        cache_dir: Path | None = None,
        compile_timeout_s: float = 10.0,
        max_workers: int = 1,
        *,
        fallback: bool = True,
        max_cached: int = 256,
    ):
        self.tokenizer_info = tokenizer_info
        chain = [primary, *(n for n in FALLBACK_ORDER if n != primary)] if fallback else [primary]
        self._backends = [make_backend(name, tokenizer_info) for name in chain]
        self._cache_dir = Path(cache_dir) if cache_dir is not None else None
        if self._cache_dir is not None:
            self._cache_dir.mkdir(parents=True, exist_ok=True)
        self.compile_timeout_s = compile_timeout_s
        self._max_cached = max_cached
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="plait-grammar")
        self._lock = threading.RLock()  # a done future runs its callback at once, locked
        self._results: OrderedDict[tuple, CompiledResult] = OrderedDict()
        self._inflight: dict[tuple, Future] = {}
        self._stragglers: dict[tuple, Future] = {}  # slow compiles past their deadline
        self._stats = CacheStats()

    @property
    def backends(self) -> list[str]:
        return [b.name for b in self._backends]

    @property
    def stats(self) -> CacheStats:
        with self._lock:
            return self._stats

    def submit(self, spec: GrammarSpec) -> Future[CompiledResult]:
        """Compile on the worker pool; a cached spec gives an already-done future."""
        key = self._key(spec)
        with self._lock:
            cached = self._lookup(key)
            if cached is not None:
                done: Future[CompiledResult] = Future()
                done.set_result(cached)
                return done
            future = self._inflight.get(key)
            if future is None:
                future = self._pool.submit(self._build, spec, key)
                self._inflight[key] = future
                future.add_done_callback(lambda _: self._forget_inflight(key))
            return future

    def compile(self, spec: GrammarSpec) -> CompiledResult:
        """Compile on the caller's thread (cache first)."""
        key = self._key(spec)
        with self._lock:
            cached = self._lookup(key)
        return cached if cached is not None else self._build(spec, key)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- the fallback chain -------------------------------------------------------

    def _build(self, spec: GrammarSpec, key: tuple) -> CompiledResult:
        reasons: list[str] = []
        deadline_passed = False
        for backend in self._backends:
            try:
                grammar = self._attempt(backend, spec)
            except _DeadlinePassed as e:
                reasons.append(e.reason)
                deadline_passed = True
                continue
            except UnsupportedGrammar as e:
                reasons.append(e.reason)
                continue
            if backend.name == "llguidance-lenient" and backend is not self._backends[0]:
                reasons.append(LENIENT_NOTE)
            result = CompiledResult(grammar, backend.name, "; ".join(reasons) or None)
            if reasons:
                logger.info("%s compiled by %s after: %s", spec.kind, backend.name, reasons)
            if not deadline_passed:
                with self._lock:
                    self._remember(key, result)
            return result
        raise GrammarError(spec.kind, spec.source, "no backend compiles it: " + "; ".join(reasons))

    def _attempt(self, backend: GrammarBackend, spec: GrammarSpec) -> CompiledGrammar:
        path = self._disk_path(backend, spec)
        loaded = self._load(backend, path)
        if loaded is not None:
            return loaded
        if backend.compile_is_bounded:
            grammar = backend.compile(spec)
            self._store(backend, grammar, path)
            return grammar
        return self._compile_with_deadline(backend, spec, path)

    def _compile_with_deadline(
        self, backend: GrammarBackend, spec: GrammarSpec, path: Path | None
    ) -> CompiledGrammar:
        akey = (backend.name, spec.kind, spec.source)
        with self._lock:
            straggler = self._stragglers.get(akey)
            if straggler is not None and straggler.done():
                del self._stragglers[akey]
            busy = any(not f.done() for f in self._stragglers.values())
        if straggler is not None and straggler.done():
            return straggler.result()  # raises what the compile raised
        if straggler is not None:
            raise _DeadlinePassed(f"{backend.name}: still compiling (past its deadline)")
        if busy:
            raise _DeadlinePassed(f"{backend.name}: skipped while a compile past its deadline runs")

        future: Future[CompiledGrammar] = Future()

        def run() -> None:
            try:
                grammar = backend.compile(spec)
                self._store(backend, grammar, path)
                future.set_result(grammar)
            except BaseException as e:  # handed to whoever waits on the future
                future.set_exception(e)

        threading.Thread(target=run, name=f"plait-{backend.name}", daemon=True).start()
        try:
            return future.result(timeout=self.compile_timeout_s)
        except FutureTimeout:
            with self._lock:
                self._stragglers[akey] = future
            raise _DeadlinePassed(
                f"{backend.name}: compile exceeded {self.compile_timeout_s:g} s "
                "(it finishes in the background and is cached)"
            ) from None

    # -- caches -------------------------------------------------------------------

    def _key(self, spec: GrammarSpec) -> tuple:
        return (tuple(self.backends), self.tokenizer_info.fingerprint, spec.kind, spec.source)

    def _lookup(self, key: tuple) -> CompiledResult | None:
        """Memory cache lookup; the caller holds the lock."""
        result = self._results.get(key)
        if result is None:
            self._stats = replace(self._stats, misses=self._stats.misses + 1)
            return None
        self._results.move_to_end(key)
        self._stats = replace(self._stats, hits=self._stats.hits + 1)
        return result

    def _remember(self, key: tuple, result: CompiledResult) -> None:
        self._results[key] = result
        self._results.move_to_end(key)
        while len(self._results) > self._max_cached:
            self._results.popitem(last=False)

    def _forget_inflight(self, key: tuple) -> None:
        with self._lock:
            self._inflight.pop(key, None)

    def _disk_path(self, backend: GrammarBackend, spec: GrammarSpec) -> Path | None:
        if self._cache_dir is None or not backend.persistent:
            return None
        ident = [backend.cache_tag(), self.tokenizer_info.fingerprint, spec.kind, spec.source]
        digest = hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:40]
        return self._cache_dir / f"{backend.name}-{digest}.pkl"

    def _load(self, backend: GrammarBackend, path: Path | None) -> CompiledGrammar | None:
        if path is None or not path.exists():
            return None
        try:
            grammar = backend.load(path.read_bytes())
        except Exception as e:  # a stale or truncated file is a miss, not an error
            logger.warning("ignoring unreadable grammar cache file %s: %s", path, e)
            return None
        with self._lock:
            self._stats = replace(self._stats, disk_hits=self._stats.disk_hits + 1)
        return grammar

    def _store(self, backend: GrammarBackend, grammar: CompiledGrammar, path: Path | None) -> None:
        if path is None:
            return
        data = backend.dump(grammar)
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".pkl")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)  # atomic: readers never see a partial file
        except OSError as e:
            logger.warning("cannot write grammar cache file %s: %s", path, e)
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            return
        with self._lock:
            self._stats = replace(self._stats, disk_writes=self._stats.disk_writes + 1)
