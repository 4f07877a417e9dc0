"""``plait bench server``: a chat workload from concurrent clients against
``plait serve``, and the same workload through the in-process engine.

32 clients (threads, one HTTP connection each) send chat completions that
share a ~300-token system prompt; each asks its own questions, one after the
other, and every answer is a fixed number of tokens (``ignore_eos``). Printed:
requests/s, output tokens/s, p50/p99 latency, for HTTP and in-process, and the
HTTP overhead. The server runs in a subprocess (``python -m plait serve``), as
a user would start it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

import httpx

from plait.bench.common import engine_options, set_threads

WORKLOADS = {"server": "HTTP serving: concurrent chat clients against plait serve and in-process"}

SYSTEM = (
    "You are the assistant of a logistics company. You answer questions from warehouse "
    "staff about shifts, deliveries, safety rules and equipment. Keep answers short and "
    "practical, and say when a question should go to a manager instead. "
) * 5
TOPICS = ["forklift", "night shift", "loading dock", "fire exit", "pallet jack", "inventory"]


def _messages(client: int, turn: int) -> list[dict[str, str]]:
    question = f"Client {client}, question {turn}: what should I know about the {TOPICS[(client + turn) % len(TOPICS)]}?"
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


def _summary(label: str, latencies: list[float], seconds: float, tokens: int) -> None:
    lat = sorted(latencies)
    p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
    print(
        f"{label:12s} {len(lat) / seconds:8.2f} {tokens / seconds:10.1f} "
        f"{statistics.median(lat):8.2f} {p99:8.2f} {seconds:8.1f}"
    )


def run_http(url: str, clients: int, turns: int, max_tokens: int) -> tuple[list[float], float, int]:
    latencies: list[float] = []
    tokens = [0]
    lock = threading.Lock()
    errors: list[str] = []

    def client(c: int) -> None:
        with httpx.Client(base_url=url, timeout=600) as http:
            for t in range(turns):
                start = time.perf_counter()
                r = http.post(
                    "/v1/chat/completions",
                    json={
                        "model": "smollm2",
                        "messages": _messages(c, t),
                        "max_tokens": max_tokens,
                        "temperature": 0,
                        "ignore_eos": True,
                    },
                )
                elapsed = time.perf_counter() - start
                with lock:
                    if r.status_code != 200:
                        errors.append(r.text)
                        continue
                    latencies.append(elapsed)
                    tokens[0] += r.json()["usage"]["completion_tokens"]

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed; first: {errors[0][:300]}")
    return latencies, time.perf_counter() - t0, tokens[0]


def run_engine(engine: Any, clients: int, turns: int, max_tokens: int):
    latencies: list[float] = []
    tokens = 0
    params = {"max_new_tokens": max_tokens, "temperature": 0, "ignore_eos": True}

    async def client(c: int) -> None:
        nonlocal tokens
        for t in range(turns):
            start = time.perf_counter()
            prompt = engine.apply_chat_template(_messages(c, t))
            out = await engine.async_generate(prompt, params)
            latencies.append(time.perf_counter() - start)
            tokens += out["meta_info"]["completion_tokens"]

    async def all_clients() -> None:
        await asyncio.gather(*(client(c) for c in range(clients)))

    t0 = time.perf_counter()
    asyncio.run(all_clients())
    return latencies, time.perf_counter() - t0, tokens


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The server bench has no flags beyond the shared ones."""


def main(args: argparse.Namespace) -> int:
    from plait.runtime.engine import Engine

    threads = set_threads(args.threads)
    clients, turns, max_tokens = (8, 2, 8) if args.quick else (32, 4, 32)
    port = 30000 + os.getpid() % 20000
    cmd = [
        sys.executable,
        "-m",
        "plait",
        "serve",
        "--model",
        args.model,
        "--port",
        str(port),
        "--threads",
        str(threads),
    ]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError(
                    "the server did not start: " + server.stderr.read().decode()[-2000:]
                )
            time.sleep(0.5)
        run_http(url, 2, 1, 2)  # warm up
        http = run_http(url, clients, turns, max_tokens)
    finally:
        server.terminate()
        server.wait(60)

    engine = Engine(model=args.model, **engine_options(args, threads))
    run_engine(engine, 2, 1, 2)
    local = run_engine(engine, clients, turns, max_tokens)
    engine.shutdown()

    print(
        f"model: {args.model}; torch threads: {threads}; {clients} concurrent clients x "
        f"{turns} chat requests; {max_tokens} output tokens each; shared system prompt"
    )
    print(f"{'':12s} {'req/s':>8s} {'out tok/s':>10s} {'p50 s':>8s} {'p99 s':>8s} {'wall s':>8s}")
    _summary("HTTP", *http)
    _summary("in-process", *local)
    print(f"HTTP overhead on wall time: {http[1] / local[1] - 1:+.1%}")
    return 0
