"""``plait bench memory``: the resident memory of an engine under a steady chat load.

The workload of ``plait bench server`` (32 concurrent chats sharing a system
prompt, 4 turns each, fixed-length answers) runs through the in-process engine
in rounds, the prefix cache flushed between rounds (as a long-running server's
cache turns over), twice, each in a fresh process: with KV slots reused last-freed-first (plait's
allocator) and first-freed-first (the order it replaced). Printed per run: RSS
after loading, right after the load, and after the engine has been idle for a
moment; the KV slots the cache keeps; and how many distinct slots the load ever
touched. The pool is allocated untouched, so touched slots are what costs RSS.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from plait.bench.common import rss_mib, set_threads

WORKLOADS = {"memory": "resident memory under a steady chat load"}
ORDERS = ("lifo", "fifo")
ROUNDS = 4


def _child(order: str, model: str, threads: int, quick: bool) -> dict:
    import torch

    from plait.bench.server import run_engine
    from plait.runtime import kv_pool
    from plait.runtime.engine import Engine

    if order == "fifo":  # the order plait used before: freed slots go to the back

        def free_fifo(self, slots: torch.Tensor) -> None:
            if slots.numel():
                self._free = torch.cat([self._free, slots.to(torch.int64)])

        kv_pool.SlotAllocator.free = free_fifo
    set_threads(threads)
    engine = Engine(model=model, num_threads=threads)
    touched: set[int] = set()
    real_alloc = engine.scheduler.allocator.alloc

    def alloc(n: int) -> torch.Tensor:
        slots = real_alloc(n)
        touched.update(slots.tolist())
        return slots

    engine.scheduler.allocator.alloc = alloc
    clients, turns, max_tokens = (8, 2, 8) if quick else (32, 4, 32)
    loaded = rss_mib()
    seconds, tokens = 0.0, 0
    for _ in range(ROUNDS):
        _, s, t = run_engine(engine, clients, turns, max_tokens)
        seconds, tokens = seconds + s, tokens + t
        engine.flush_cache()
    after = rss_mib()
    time.sleep(2)
    idle = rss_mib()
    stats = engine.get_stats()
    engine.shutdown()
    return {
        "order": order,
        "loaded": loaded,
        "after": after,
        "idle": idle,
        "touched": len(touched),
        "cached": stats["cache_tokens"],
        "pool": stats["max_total_num_tokens"],
        "seconds": seconds,
        "tokens": tokens,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The memory bench has no flags beyond the shared ones."""


def main(args: argparse.Namespace) -> int:
    threads = set_threads(args.threads)  # and each child process sets it again
    rows = []
    for order in ORDERS:
        cmd = [sys.executable, "-m", "plait.bench.memory", order, args.model, str(threads)]
        if args.quick:
            cmd.append("--quick")
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(
        f"plait bench memory: model {args.model}, {threads} threads, "
        f"{ROUNDS} rounds of a chat load, cache flushed between rounds"
    )
    print(
        f"{'slot order':12s} {'RSS loaded':>11s} {'after load':>11s} {'idle':>8s} "
        f"{'slots touched':>14s} {'cached':>8s} {'pool':>8s}"
    )
    for r in rows:
        print(
            f"{r['order']:12s} {r['loaded']:8.0f} MiB {r['after']:8.0f} MiB {r['idle']:5.0f} MiB "
            f"{r['touched']:14d} {r['cached']:8d} {r['pool']:8d}"
        )
    lifo, fifo = rows
    print(
        f"steady-state RSS {lifo['idle']:.0f} MiB (last-freed-first) vs {fifo['idle']:.0f} MiB "
        f"(first-freed-first): {fifo['idle'] - lifo['idle']:+.0f} MiB saved; "
        f"{lifo['tokens']} tokens in {lifo['seconds']:.1f} s"
    )
    return 0


if __name__ == "__main__":
    order, model, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
    print(json.dumps(_child(order, model, threads, "--quick" in sys.argv)))
