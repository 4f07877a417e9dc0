"""Streaming and waiting, shared by the native and the OpenAI routes: server-sent
events, a wait that ends when the client goes away, and several engine streams
merged into one."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from fastapi import Request

from plait.runtime.inputs import GenerateInput
from plait.runtime.server.errors import ClientDisconnected


def sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


async def until_disconnect(request: Request, work: Awaitable[Any]) -> Any:
    """Await ``work``; if the client goes away first, cancel it (which aborts the
    engine requests and frees their KV)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise ClientDisconnected()
    except BaseException:
        task.cancel()
        raise


async def open_streams(
    engine: Any,
    prompts: list[Any],
    params: dict[str, Any],
    options: dict[str, Any],
    rid: str,
) -> list[AsyncIterator[dict]]:
    """One engine stream per (prompt, choice), submitted now so bad input is a 400;
    choice k of a seeded request gets ``seed + k``."""
    n = params.get("n", 1)
    streams = []
    try:
        for p, prompt in enumerate(prompts):
            for k in range(n):
                one = {**params, "n": 1}
                if params.get("seed") is not None:
                    one["seed"] = params["seed"] + k
                key = "input_ids" if isinstance(prompt, list) else "prompt"
                inp = GenerateInput(
                    **{key: prompt},
                    sampling_params=one,
                    stream=True,
                    rid=f"{rid}-{p}-{k}",
                    **options,
                )
                streams.append(await engine.async_generate(inp))
    except BaseException:
        for s in streams:
            await s.aclose()
        raise
    return streams


async def merge_streams(streams: list[AsyncIterator[dict]]) -> AsyncIterator[tuple[int, dict]]:
    """Interleave several streams as their pieces arrive; closing this closes them
    all (which aborts their requests)."""
    if len(streams) == 1:
        try:
            async for piece in streams[0]:
                yield 0, piece
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: AsyncIterator[dict]) -> None:
        try:
            async for piece in stream:
                await queue.put((i, piece))
        finally:
            await queue.put((i, done))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            i, piece = await queue.get()
            if piece is done:
                left -= 1
                continue
            yield i, piece
        for t in tasks:
            t.result()  # re-raise a stream's error
    finally:
        for t in tasks:
            t.cancel()
        # Let each pump leave its stream first: closing a stream that another task is
        # still iterating raises "aclose(): asynchronous generator is already running".
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in streams:
            await s.aclose()
