"""How results travel from the engine's loop thread back to its callers.

Each request carries a sink; the scheduler hands it every result dict (or an
exception) of that request. A :class:`QueueSink` serves a waiting thread
(``Engine.generate``), a :class:`LoopSink` an asyncio task
(``Engine.async_generate``). The collectors below read a sink's queue until the
result with a finish reason: the final dict, or every piece of a stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any


class ResultSink:
    """Delivers a request's results to its caller; ``on_final`` runs once the last
    one (a result with a finish reason) has been handed over."""

    on_final: Callable[[], None] | None = None

    def __call__(self, item: Any) -> None:
        self.deliver(item)
        final = not isinstance(item, dict) or item["meta_info"]["finish_reason"] is not None
        if final and self.on_final is not None:
            self.on_final()

    def deliver(self, item: Any) -> None:
        raise NotImplementedError


class QueueSink(ResultSink):
    """Delivers a request's results to a thread waiting on ``queue``."""

    def __init__(self) -> None:
        self.queue: queue.Queue = queue.Queue()

    def deliver(self, item: Any) -> None:
        self.queue.put(item)


class LoopSink(ResultSink):
    """Delivers a request's results to an asyncio queue; a caller whose event loop
    has closed is gone, and its results are dropped (the loop thread must not fail)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, q: asyncio.Queue):
        self.loop, self.queue = loop, q

    def deliver(self, item: Any) -> None:
        with contextlib.suppress(RuntimeError):  # "Event loop is closed"
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


def _raise_if_error(item: Any) -> dict:
    if isinstance(item, BaseException):
        raise item
    return item


def _is_final(item: dict) -> bool:
    return item["meta_info"]["finish_reason"] is not None


def wait_final(q: queue.Queue) -> dict:
    """The final result of a request (a thread's side)."""
    while True:
        item = _raise_if_error(q.get())
        if _is_final(item):
            return item


def iter_pieces(q: queue.Queue, abort: Callable[[], Any]) -> Iterator[dict]:
    """Every piece of a streamed request; ``abort`` runs if the consumer stops early."""
    finished = False
    try:
        while not finished:
            item = _raise_if_error(q.get())
            finished = _is_final(item)
            yield item
    finally:
        if not finished:  # the consumer stopped early
            abort()


async def await_final(q: asyncio.Queue) -> dict:
    """The final result of a request (an asyncio task's side)."""
    while True:
        item = _raise_if_error(await q.get())
        if _is_final(item):
            return item


async def aiter_pieces(q: asyncio.Queue, abort: Callable[[], Any]) -> AsyncIterator[dict]:
    """``iter_pieces`` for asyncio."""
    finished = False
    try:
        while not finished:
            item = _raise_if_error(await q.get())
            finished = _is_final(item)
            yield item
    finally:
        if not finished:
            abort()
