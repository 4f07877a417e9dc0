"""``plait bench few-shot|multi-turn|fork|prefix``: what the radix cache buys.

Each workload runs three times in one process on the same model and thread
count: plait with the radix cache, plait with the null cache
(``disable_radix_cache=True``), and HF transformers re-running every full
prompt (batched like plait: each step of a workload is one batch). Every
request decodes a fixed number of tokens (``ignore_eos``), so the three runs
do the same work apart from what they recompute.

Printed per workload: wall seconds, requests/s, prompt tokens, the cache hit
rate (cached prompt tokens / prompt tokens), the optimum hit rate of that
request sequence, the share of the optimum reached, and the speed-up of plait
(radix) over the null cache and over HF.

The optimum: a request can at best reuse the longest prefix it shares with any
earlier prompt, or with any earlier prompt plus its output (the KV of a
finished request's last token is never computed), capped one token short of
its own length. Requests of one batch may share with each other's prompts.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from plait.bench.common import engine_options, hf_generate, load_hf_model, set_threads

WORKLOADS = {
    "few-shot": "prefix reuse: questions after one shared ~1k-token few-shot prefix",
    "multi-turn": "prefix reuse: chats advancing together turn by turn",
    "fork": "prefix reuse: a tree of thought, each level one batch",
    "prefix": "prefix reuse: few-shot, multi-turn and fork in one run",
}


@dataclass
class Result:
    prompt_ids: list[int]
    output_ids: list[int]
    text: str
    cached_tokens: int = 0


# A backend turns a batch of token-id prompts into results, each decoding
# exactly ``max_new_tokens`` tokens greedily.
Generate = Callable[[list[list[int]], int], list[Result]]


@dataclass
class RunStats:
    seconds: float = 0.0
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    optimum_tokens: int = 0
    _seen: list[list[int]] = field(default_factory=list, repr=False)

    def record_batch(self, results: list[Result]) -> None:
        """Account one batch: the cache hits it got and the best it could have got."""
        for i, r in enumerate(results):
            earlier = self._seen + [x.prompt_ids for x in results[:i]]
            best = max((_common_prefix(r.prompt_ids, s) for s in earlier), default=0)
            self.optimum_tokens += min(best, len(r.prompt_ids) - 1)
            self.prompt_tokens += len(r.prompt_ids)
            self.cached_tokens += r.cached_tokens
            self.requests += 1
        for r in results:
            self._seen.append(r.prompt_ids)
            self._seen.append(r.prompt_ids + r.output_ids[:-1])

    @property
    def hit_rate(self) -> float:
        return self.cached_tokens / max(1, self.prompt_tokens)

    @property
    def optimum_rate(self) -> float:
        return self.optimum_tokens / max(1, self.prompt_tokens)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _run(generate: Generate, stats: RunStats, prompts: list[list[int]], n: int) -> list[Result]:
    t0 = time.perf_counter()
    results = generate(prompts, n)
    stats.seconds += time.perf_counter() - t0
    stats.record_batch(results)
    return results


# ---- workloads ---------------------------------------------------------------------------
# Each takes the tokenizer (for chat templates and text), a backend and a size,
# runs the workload batch by batch, and returns its RunStats.


def few_shot(tok: Any, generate: Generate, size: dict[str, int]) -> RunStats:
    """``questions`` questions after one shared ~1k-token few-shot prefix."""
    rng = random.Random(0)
    shots = []
    for _ in range(size["shots"]):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        shots.append(f"Question: What is {a} plus {b}?\nAnswer: {a} plus {b} is {a + b}.\n\n")
    prefix = "Answer each arithmetic question in one sentence.\n\n" + "".join(shots)
    prompts = []
    for _ in range(size["questions"]):
        a, b = rng.randint(100, 999), rng.randint(100, 999)
        prompts.append(tok.encode(prefix + f"Question: What is {a} plus {b}?\nAnswer:"))
    stats = RunStats()
    _run(generate, stats, prompts, size["new_tokens"])
    return stats


LOREM = (
    "The report covers the quarterly figures of the northern warehouse, the delays at the "
    "harbour, the new rota for the night shift and the repairs to the loading cranes. "
)


def multi_turn(tok: Any, generate: Generate, size: dict[str, int]) -> RunStats:
    """``sessions`` chats advancing together for ``turns`` turns; each user turn
    pastes a document excerpt of ~``message_tokens`` tokens and asks about it."""
    reps = max(1, size["message_tokens"] // len(tok.encode(LOREM)))
    histories = [
        [{"role": "system", "content": f"You are assistant number {s}. Answer briefly."}]
        for s in range(size["sessions"])
    ]
    stats = RunStats()
    for turn in range(size["turns"]):
        for s, h in enumerate(histories):
            h.append(
                {
                    "role": "user",
                    "content": f"Excerpt {turn} for chat {s}:\n{LOREM * reps}\nSummarise it.",
                }
            )
        prompts = [_chat_ids(tok, h) for h in histories]
        results = _run(generate, stats, prompts, size["new_tokens"])
        for h, r in zip(histories, results):
            h.append({"role": "assistant", "content": r.text})
    return stats


def fork(tok: Any, generate: Generate, size: dict[str, int]) -> RunStats:
    """A tree of thought: ``problems`` problems, each expanded ``levels`` levels
    deep with ``branches`` branches per node; a level is one batch."""
    reps = max(1, size["context_tokens"] // len(tok.encode(LOREM)))
    nodes = [
        f"Problem {p}: plan the warehouse work for next week.\n{LOREM * reps}\n"
        for p in range(size["problems"])
    ]
    stats = RunStats()
    for level in range(size["levels"]):
        children = [
            f"{node}\nLevel {level + 1}, idea {b + 1}:"
            for node in nodes
            for b in range(size["branches"])
        ]
        results = _run(generate, stats, [tok.encode(c) for c in children], size["new_tokens"])
        nodes = [c + r.text for c, r in zip(children, results)]
    return stats


def _chat_ids(tok: Any, messages: list[dict[str, str]]) -> list[int]:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok.encode(text)


RUNS = {  # workload -> (function, sizes, --quick sizes)
    "few-shot": (
        few_shot,
        {"shots": 32, "questions": 64, "new_tokens": 16},
        {"shots": 32, "questions": 16, "new_tokens": 8},
    ),
    "multi-turn": (
        multi_turn,
        {"sessions": 8, "turns": 6, "message_tokens": 160, "new_tokens": 16},
        {"sessions": 4, "turns": 3, "message_tokens": 96, "new_tokens": 8},
    ),
    "fork": (
        fork,
        {"problems": 4, "levels": 3, "branches": 2, "context_tokens": 384, "new_tokens": 16},
        {"problems": 2, "levels": 2, "branches": 2, "context_tokens": 192, "new_tokens": 8},
    ),
}


# ---- backends ---------------------------------------------------------------------------


def plait_backend(engine: Any) -> Generate:
    def generate(prompts: list[list[int]], n: int) -> list[Result]:
        params = {"max_new_tokens": n, "temperature": 0, "ignore_eos": True}
        outs = engine.generate(input_ids=prompts, sampling_params=params)
        return [
            Result(p, o["output_ids"], o["text"], o["meta_info"]["cached_tokens"])
            for p, o in zip(prompts, outs)
        ]

    return generate


def hf_backend(model: Any, tok: Any) -> Generate:
    import torch

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def generate(prompts: list[list[int]], n: int) -> list[Result]:
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.inference_mode():
            out = hf_generate(model, ids, n, pad, attention_mask=mask)
        results = []
        for p, row in zip(prompts, out[:, width:].tolist()):
            results.append(Result(p, row, tok.decode(row, skip_special_tokens=True)))
        return results

    return generate


# ---- driver ------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``plait bench few-shot|multi-turn|fork|prefix``."""
    parser.add_argument(
        "--size",
        default="",
        help="override workload sizes, e.g. sessions=1,turns=8",
    )


def main(args: argparse.Namespace) -> int:
    from plait.runtime.engine import Engine

    threads = set_threads(args.threads)
    names = list(RUNS) if args.workload == "prefix" else [args.workload]
    kwargs = engine_options(args, threads)
    sizes = {name: dict(RUNS[name][2 if args.quick else 1]) for name in names}
    for item in filter(None, args.size.split(",")):
        key, _, value = item.partition("=")
        known = [s for s in sizes.values() if key in s]
        if not known or not value.isdigit():
            raise SystemExit(
                f"--size {item!r}: expected KEY=INT with KEY one of "
                f"{sorted({k for s in sizes.values() for k in s})}"
            )
        for s in known:
            s[key] = int(value)

    runs: dict[str, dict[str, RunStats]] = {name: {} for name in names}
    for label, radix_off in (("plait radix", False), ("plait null cache", True)):
        engine = Engine(model=args.model, disable_radix_cache=radix_off, **kwargs)
        tok, model_path = engine.tokenizer, engine.source.model_path
        engine.generate("warm up", {"max_new_tokens": 2})
        for name in names:
            engine.flush_cache()
            runs[name][label] = RUNS[name][0](tok, plait_backend(engine), sizes[name])
        engine.shutdown()
        del engine
    if not args.skip_hf:
        hf = load_hf_model(model_path)
        for name in names:
            runs[name]["HF transformers"] = RUNS[name][0](tok, hf_backend(hf, tok), sizes[name])

    print(f"model: {args.model} ({model_path})")
    print(f"torch threads: {threads}; device: {args.device or 'auto'}; greedy, ignore_eos")
    for name in names:
        _report(name, sizes[name], runs[name])
    return 0


def _report(name: str, size: dict[str, int], runs: dict[str, RunStats]) -> None:
    print(f"\n== {name}: " + ", ".join(f"{k}={v}" for k, v in size.items()))
    print(
        f"{'':18s} {'seconds':>8s} {'req/s':>7s} {'prompt tok':>10s} {'hit rate':>9s}"
        f" {'optimum':>8s} {'of opt.':>8s}"
    )
    for label, r in runs.items():
        share = r.cached_tokens / r.optimum_tokens if r.optimum_tokens else 1.0
        hit = f"{r.hit_rate:9.1%}" if label.startswith("plait") else f"{'-':>9s}"
        of_opt = f"{share:8.1%}" if label.startswith("plait") else f"{'-':>8s}"
        print(
            f"{label:18s} {r.seconds:8.1f} {r.requests / r.seconds:7.2f} {r.prompt_tokens:10d}"
            f" {hit} {r.optimum_rate:8.1%} {of_opt}"
        )
    radix = runs["plait radix"].seconds
    for other in ("plait null cache", "HF transformers"):
        if other in runs:
            print(f"speed-up of plait radix over {other}: {runs[other].seconds / radix:.2f}x")
