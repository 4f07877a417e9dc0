"""``plait bench programs``: DSL programs on plait against the same prompts sent
one by one to HF transformers, and against plait with the radix cache off.

Two workloads, each run with ``run_batch`` in one process and thread count:

* few-shot: 64 questions after one ~1k-token few-shot prefix, 16 tokens each;
* fork: 8 problems, each a ~400-token context forked into 4 branches (24
  tokens each), joined, then a 24-token summary over the branches.

Every ``gen`` decodes a fixed number of tokens (``ignore_eos``), so all runs do
the same decoding work. The HF baseline replays exactly the prompts plait's
generations saw (recorded by a backend wrapper), one call at a time, as a
program written against HF's ``generate`` would.
"""

from __future__ import annotations

import argparse
import random
import threading
import time
from typing import Any

import plait as pl
from plait.backend import EngineBackend
from plait.bench.common import engine_options, hf_generate, load_hf_model, set_threads

WORKLOADS = {"programs": "DSL programs (run_batch) against HF one by one and the null cache"}

LOREM = (
    "The report covers the quarterly figures of the northern warehouse, the delays at the "
    "harbour, the new rota for the night shift and the repairs to the loading cranes. "
)


class RecordingBackend(EngineBackend):
    """Records (prompt, max_new_tokens) of every generating call."""

    def __init__(self, engine: Any):
        super().__init__(engine)
        self.calls: list[tuple[str, int]] = []
        self._lock = threading.Lock()

    def generate(self, text, sampling_params, **options):
        n = sampling_params.get("max_new_tokens", 128) if isinstance(sampling_params, dict) else 0
        if n and isinstance(text, str):
            with self._lock:
                self.calls.append((text, n))
        return super().generate(text, sampling_params, **options)


def few_shot_program(shots: int) -> tuple[Any, list[dict]]:
    rng = random.Random(0)
    examples = []
    for _ in range(shots):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        examples.append(f"Question: What is {a} plus {b}?\nAnswer: {a} plus {b} is {a + b}.\n\n")
    prefix = "Answer each arithmetic question in one sentence.\n\n" + "".join(examples)

    @pl.function
    def few_shot(s, question):
        s += prefix + "Question: " + question + "\nAnswer:" + pl.gen("answer", max_tokens=16)

    args = []
    for _ in range(64):
        a, b = rng.randint(100, 999), rng.randint(100, 999)
        args.append({"question": f"What is {a} plus {b}?"})
    return few_shot, args


def fork_program(problems: int) -> tuple[Any, list[dict]]:
    @pl.function
    def tree(s, problem):
        s += f"Problem {problem}: plan the warehouse work for next week.\n" + LOREM * 10
        forks = s.fork(4)
        forks += lambda i: f"\nIdea {i + 1}:" + pl.gen("idea", max_tokens=24)
        forks.join()
        s += "\nIdeas:\n" + "".join(f"- {idea}\n" for idea in s["idea"])
        s += "Best plan:" + pl.gen("plan", max_tokens=24)

    return tree, [{"problem": p} for p in range(problems)]


def run_plait(engine: Any, program: Any, args: list[dict]) -> tuple[float, RecordingBackend]:
    backend = RecordingBackend(engine)
    engine.flush_cache()
    t0 = time.perf_counter()
    states = program.run_batch(args, backend=backend, temperature=0, ignore_eos=True)
    elapsed = time.perf_counter() - t0
    for s in states:
        s.sync()  # raises if a program failed
    return elapsed, backend


def run_hf(model: Any, tokenizer: Any, calls: list[tuple[str, int]]) -> float:
    import torch

    t0 = time.perf_counter()
    with torch.inference_mode():
        for text, n in calls:
            ids = torch.tensor([tokenizer.encode(text)])
            hf_generate(model, ids, n, tokenizer.eos_token_id)
    return time.perf_counter() - t0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The programs bench has no flags beyond the shared ones."""


def main(args: argparse.Namespace) -> int:
    threads = set_threads(args.threads)
    kwargs = engine_options(args, threads)
    quick = args.quick
    workloads = {
        "few-shot (64 x ~1k-token prefix, 16 tokens)": few_shot_program(16 if quick else 32),
        "fork (8 problems x 4 branches + summary)": fork_program(2 if quick else 8),
    }
    if quick:
        name = next(iter(workloads))
        workloads[name] = (workloads[name][0], workloads[name][1][:8])
    results: dict[str, dict[str, float]] = {name: {} for name in workloads}
    calls: dict[str, list[tuple[str, int]]] = {}
    for label, off in (("plait radix", False), ("plait null cache", True)):
        engine = pl.Engine(model=args.model, disable_radix_cache=off, **kwargs)
        engine.generate("warm up", {"max_new_tokens": 2})
        for name, (program, program_args) in workloads.items():
            seconds, backend = run_plait(engine, program, program_args)
            results[name][label] = seconds
            calls.setdefault(name, backend.calls)
        model_path, tokenizer = engine.source.model_path, engine.tokenizer
        engine.shutdown()
    if not args.skip_hf:
        hf = load_hf_model(model_path)
        for name in workloads:
            results[name]["HF one by one"] = run_hf(hf, tokenizer, calls[name])

    print(f"model: {args.model}; torch threads: {threads}; greedy, fixed token counts")
    for name, r in results.items():
        n_calls = len(calls[name])
        print(f"\n== {name}: {n_calls} generations")
        for label, seconds in r.items():
            print(f"{label:18s} {seconds:8.1f} s")
        radix = r["plait radix"]
        for other in ("plait null cache", "HF one by one"):
            if other in r:
                print(f"speed-up of plait radix over {other}: {r[other] / radix:.2f}x")
    return 0
