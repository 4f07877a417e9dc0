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

A backend that does not bound its own work (outlines) compiles in a worker
process (compile_worker.py, started on first need and reused) under ``compile_timeout_s``: past the deadline, or once every request
waiting for it has ended (``cancel``), the worker is killed and the chain moves
on; a request whose chain yields nothing gets a GrammarError (a 400 over HTTP)
saying so. Every grammar is probed before use (a fresh matcher must allow a
first token or accept the empty text), so a grammar that compiles but can never
run (a schema that only refers to itself, a regex too large to lex) is refused
at compile time, not in the middle of decoding.

Caches: an in-memory LRU of results keyed by (backend chain, tokenizer
fingerprint, kind, source), and, given ``cache_dir``, pickled grammars of
persistent backends (outlines) keyed by (backend version, fingerprint, kind,
source). Only fallbacks not caused by a deadline are cached in memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import select
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

from plait.runtime.constrained.base import CompiledGrammar, GrammarBackend
from plait.runtime.constrained.bitmask import allocate_bitmask
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


def _probe(backend: str, grammar: CompiledGrammar, vocab_size: int) -> None:
    """Refuse a grammar that can never produce output: fresh matchers must be free of
    errors and allow a first token (or accept the empty text). Two of them, since a
    lexer built lazily and shared by all matchers (llguidance) may only hit its size
    limit on the second."""
    bitmask = allocate_bitmask(1, vocab_size)
    for _ in range(2):
        matcher = grammar.matcher()
        matcher.fill_mask(bitmask, 0)
        error = matcher.error()
        if error:
            raise UnsupportedGrammar(f"{backend}: {error}")
        if not matcher.can_stop() and not bool(bitmask.any()):
            raise UnsupportedGrammar(f"{backend}: the grammar admits no output")


def make_backend(name: str, tokenizer_info: TokenizerInfo) -> GrammarBackend:
    if name == "llguidance":
        return LlguidanceBackend(tokenizer_info)
    if name == "llguidance-lenient":
        return LlguidanceBackend(tokenizer_info, lenient=True)
    if name == "outlines":
        return OutlinesBackend(tokenizer_info)
    raise ValueError(f"unknown grammar backend {name!r}; known: {FALLBACK_ORDER}")


class _DeadlinePassed(UnsupportedGrammar):
    """A slow backend did not finish in time; its child process was killed."""


class _Cancelled(Exception):
    """Every request waiting for a compile has ended."""


_LENGTH = struct.Struct("<I")


def write_frame(stream: BinaryIO, obj: Any) -> None:
    """One message to a compile worker (or back): a 4-byte length, then a pickle."""
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_LENGTH.pack(len(data)) + data)
    stream.flush()


def read_frame(stream: BinaryIO) -> Any:
    header = stream.read(_LENGTH.size)
    if len(header) < _LENGTH.size:
        raise EOFError("the other side closed the pipe")
    (n,) = _LENGTH.unpack(header)
    data = stream.read(n)
    if len(data) < n:
        raise EOFError("the other side closed the pipe")
    return pickle.loads(data)


class _Worker:
    """One compile worker process (compile_worker.py); killed to stop a compile."""

    def __init__(self) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        env.setdefault("OMP_NUM_THREADS", "1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "plait.runtime.constrained.compile_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        self.fingerprints: set[str] = set()  # tokenizers the worker already holds

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
        self.proc.wait(5)
        for stream in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                stream.close()


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
        # Per in-flight compile: how many requests wait for it, and its cancel switch.
        self._waiters: dict[tuple, int] = {}
        self._cancel: dict[tuple, threading.Event] = {}
        self._idle_workers: list[_Worker] = []  # compile worker processes, reused
        self._closed = False
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
                self._cancel[key] = cancel = threading.Event()
                self._waiters[key] = 0
                future = self._pool.submit(self._build, spec, key, cancel)
                self._inflight[key] = future
                future.add_done_callback(lambda _: self._forget_inflight(key))
            self._waiters[key] += 1
            return future

    def cancel(self, spec: GrammarSpec) -> None:
        """A request waiting for ``spec`` has ended. When no other request waits for
        the compile, it is stopped (its child process killed, or it never starts)."""
        key = self._key(spec)
        with self._lock:
            if key not in self._waiters:
                return
            self._waiters[key] -= 1
            if self._waiters[key] <= 0:
                self._cancel[key].set()

    def compile(self, spec: GrammarSpec) -> CompiledResult:
        """Compile on the caller's thread (cache first)."""
        key = self._key(spec)
        with self._lock:
            cached = self._lookup(key)
        return cached if cached is not None else self._build(spec, key, threading.Event())

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            self._closed = True
            workers, self._idle_workers = self._idle_workers, []
        for worker in workers:
            worker.kill()

    # -- the fallback chain -------------------------------------------------------

    def _build(self, spec: GrammarSpec, key: tuple, cancel: threading.Event) -> CompiledResult:
        reasons: list[str] = []
        deadline_passed = False
        for backend in self._backends:
            if cancel.is_set():
                raise GrammarError(spec.kind, spec.source, "compile cancelled: the request ended")
            try:
                grammar = self._attempt(backend, spec, cancel)
                _probe(backend.name, grammar, self.tokenizer_info.vocab_size)
            except _Cancelled:
                raise GrammarError(
                    spec.kind, spec.source, "compile cancelled: the request ended"
                ) from None
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

    def _attempt(
        self, backend: GrammarBackend, spec: GrammarSpec, cancel: threading.Event
    ) -> CompiledGrammar:
        path = self._disk_path(backend, spec)
        loaded = self._load(backend, path)
        if loaded is not None:
            return loaded
        if backend.compile_is_bounded:
            grammar = backend.compile(spec)
            self._store(backend, grammar, path)
            return grammar
        grammar = self._compile_in_child(backend, spec, cancel)
        self._store(backend, grammar, path)
        return grammar

    def _compile_in_child(
        self, backend: GrammarBackend, spec: GrammarSpec, cancel: threading.Event
    ) -> CompiledGrammar:
        """Compile in a worker process; kill it past the deadline or on cancel."""
        deadline = time.monotonic() + self.compile_timeout_s
        worker = self._take_worker()
        info = self.tokenizer_info
        state = None
        if info.fingerprint not in worker.fingerprints:
            state = (info.token_bytes, info.eos_token_ids, info.special_tokens)
        done = False
        try:
            write_frame(
                worker.proc.stdin,
                (backend.name, info.fingerprint, state, spec.kind, spec.source),
            )
            worker.fingerprints.add(info.fingerprint)
            fd = worker.proc.stdout.fileno()
            while not select.select([fd], [], [], 0.02)[0]:
                if cancel.is_set():
                    raise _Cancelled()
                if time.monotonic() > deadline:
                    raise _DeadlinePassed(
                        f"{backend.name}: compile exceeded the deadline of "
                        f"{self.compile_timeout_s:g} s (grammar_compile_timeout_s) and was stopped"
                    )
            status, payload = read_frame(worker.proc.stdout)
            done = True
        except (OSError, EOFError) as e:
            raise UnsupportedGrammar(
                f"{backend.name}: the compile process failed ({e}; exit code {worker.proc.poll()})"
            ) from None
        finally:
            if done:
                self._return_worker(worker)
            else:
                worker.kill()
        if status == "invalid":
            raise GrammarError(spec.kind, spec.source, payload)
        if status == "unsupported":
            raise UnsupportedGrammar(payload)
        return backend.load(payload)

    def _take_worker(self) -> _Worker:
        with self._lock:
            while self._idle_workers:
                worker = self._idle_workers.pop()
                if worker.alive():
                    return worker
        return _Worker()

    def _return_worker(self, worker: _Worker) -> None:
        with self._lock:
            if self._closed:
                worker.kill()
            else:
                self._idle_workers.append(worker)

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
            self._waiters.pop(key, None)
            self._cancel.pop(key, None)

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
