"""``plait bench grammar``: what constrained decoding covers and what it costs.

    python -m plait bench grammar --threads 2 [--quick] [--peer-python /tmp/peer-venv/bin/python]

This module is the driver; the sections live in ``grammar_compile`` and
``grammar_coverage`` (1 and 5), ``grammar_decode`` (2 and 3) and ``grammar_peer`` (4).

Four sections, printed as each finishes (``--sections`` picks some):

1. **coverage** on three JSONSchemaBench sets (Github_trivial, Github_easy,
   Glaiveai2K, under ``--data-dir``).

   *Compile*: a seeded sample of ``--compile-limit`` schemas per set is compiled
   by each backend alone (llguidance, outlines, llguidance-lenient: no fallback)
   and by the default configuration (the fallback chain). Compiles run one at a
   time in a worker process; one that runs past ``--compile-timeout`` fails
   (as in the engine), and the worker is then restarted so the compile left
   running in the background neither slows nor skips the schemas after it.
   Printed: compiled %, median / p90 compile ms, timeouts, backends used.

   *Generate*: a smaller seeded sample of ``--generate-limit`` schemas per set
   runs through the default engine: greedy, ``--max-new-tokens``, batches of
   ``--batch-size``; the prompt is the model's chat template around a user
   message asking for a JSON value matching the schema (schema text included).
   Each output is validated with ``jsonschema``: the draft the schema's
   ``$schema`` names, else 2020-12, with format checks; remote ``$ref`` s are
   not fetched. valid % = valid outputs / sampled schemas, where a schema that
   fails to compile counts as not valid and a schema jsonschema itself cannot
   handle (invalid for its draft, an unresolvable ``$ref``, a pattern Python's
   ``re`` rejects) is not counted and is listed as such. Every failure is
   listed with a one-line reason and the backend that compiled the schema.

2. **overhead**: ms per decode step of constrained against free decoding at
   batch 1 and batch 16 (same prompts, same token count). The free run uses
   ``ignore_eos``; the constrained runs use a regex (``(?:[a-z ]{16}){N}``)
   and a JSON array schema (``minItems`` N objects) that cannot complete within
   N tokens, on an engine with ``disable_jump_forward=True``, so every run
   decodes exactly N tokens per request (checked, with the forward passes) and
   the difference is the grammar's cost per token: mask fill, mask apply,
   matcher advance. Goal: <= 5 %.

3. **jump**: forward passes for a person schema with fixed keys (name, age,
   city, email, is_student), greedy over several prompts run one at a time,
   with and without jump-forward; % saved (goal >= 30 %), and whether the
   outputs validate and match both ways.

5. **closing** (budget-aware closing, constrained/closing.py): a seeded sample of
   ``--generate-limit`` schemas per set (default 40) generated with
   ``--max-new-tokens`` (default 512), greedy, with ``budget_closing`` on and
   off in the same batches (the two share each prompt's prefill through the
   prefix cache). Printed per set: compiled N (sampled schemas that compile
   and that jsonschema can check), valid outputs M/N for each mode, and how
   many outputs closing finished (``finish_reason.closed``).

4. **peer**: plait against outlines and guidance on the same model files, in
   the same run: seconds per call for a ~14-token JSON object (name, age) and
   a 4-way select. The peers run in their own environment
   (``--peer-python``; they pin other llguidance / outlines-core releases than
   plait) through ``grammar_peer_child.py``. Each call gets a distinct prompt,
   so no runtime replays a whole cached prompt; a shared prefix may be reused
   (plait's radix cache, guidance's KV reuse; outlines recomputes it). plait's
   select is the ``choices`` constraint; a logprob-scoring variant (score the
   four continuations in one batch, no decoding) is shown beside it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from plait.bench.common import engine_options, set_threads
from plait.bench.grammar_compile import SETS, CompileWorker, compile_section, log
from plait.bench.grammar_coverage import (
    closing_section,
    generate_section,
    report_closing,
    report_coverage,
)
from plait.bench.grammar_decode import jump_section, overhead_section, report_jump, report_overhead
from plait.bench.grammar_peer import peer_prompts, plait_peer_workloads, report_peer, run_peer

WORKLOADS = {"grammar": "constrained decoding: coverage, overhead, jump-forward, closing, peers"}


@dataclass(frozen=True)
class Sizes:
    compile_limit: int  # schemas compiled per set
    generate_limit: int  # schemas generated per set
    max_new_tokens: int  # per generated output (coverage)
    overhead_tokens: int  # tokens per request at batch 1 (half that at batch 16)
    overhead_repeats: int  # timed runs per mode (the median is reported)
    jump_prompts: int
    peer_calls: int  # timed calls per workload (after one warm-up call)


FULL = Sizes(200, 40, 384, 128, 5, 8, 8)
QUICK = Sizes(10, 4, 128, 16, 1, 3, 2)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``plait bench grammar`` (registered by cli.py)."""
    g = parser.add_argument_group("grammar workload")
    g.add_argument(
        "--data-dir",
        default=None,
        help="JSONSchemaBench folder (default: ../shared/data/jsonschemabench beside the repo)",
    )
    g.add_argument("--compile-limit", type=int, default=None, help="schemas compiled per set")
    g.add_argument("--generate-limit", type=int, default=None, help="schemas generated per set")
    g.add_argument("--compile-timeout", type=float, default=10.0, help="seconds per compile")
    g.add_argument("--max-new-tokens", type=int, default=None, help="per coverage output")
    g.add_argument("--batch-size", type=int, default=16, help="coverage generation batch")
    g.add_argument("--seed", type=int, default=0, help="schema sampling seed")
    g.add_argument(
        "--sections",
        default="coverage,overhead,jump,peer",
        help="comma-separated subset of coverage,overhead,jump,peer,closing",
    )
    g.add_argument("--peer-python", default=None, help="python of a venv with outlines/guidance")
    g.add_argument("--peer-calls", type=int, default=None, help="timed calls per peer workload")


# ---- driver -------------------------------------------------------------------------------


def find_data_dir(arg: str | None) -> Path:
    """--data-dir, else ../shared/data/jsonschemabench beside the repo (or the cwd)."""
    if arg:
        return Path(arg)
    repo = Path(__file__).resolve().parents[1]
    for base in (repo, Path.cwd()):
        for rel in ("../shared/data/jsonschemabench", "shared/data/jsonschemabench"):
            candidate = (base / rel).resolve()
            if all((candidate / s).is_dir() for s in SETS):
                return candidate
    raise SystemExit(
        "JSONSchemaBench sets not found beside the repo (../shared/data/jsonschemabench); "
        "pass --data-dir"
    )


def main(args: argparse.Namespace) -> int:
    from plait.runtime.constrained.coverage import sample_schemas
    from plait.runtime.engine import Engine

    started = time.perf_counter()
    threads = set_threads(args.threads)
    base = QUICK if args.quick else FULL
    sizes = Sizes(
        compile_limit=args.compile_limit or base.compile_limit,
        generate_limit=base.generate_limit if args.generate_limit is None else args.generate_limit,
        max_new_tokens=args.max_new_tokens or base.max_new_tokens,
        overhead_tokens=base.overhead_tokens,
        overhead_repeats=base.overhead_repeats,
        jump_prompts=base.jump_prompts,
        peer_calls=args.peer_calls or base.peer_calls,
    )
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    unknown = sections - {"coverage", "overhead", "jump", "peer", "closing"}
    if unknown:
        raise SystemExit(f"unknown --sections {sorted(unknown)}")
    kwargs = engine_options(args, threads)
    engine = Engine(model=args.model, **kwargs)
    plain: Any = None  # the jump-forward-off engine, built when a section needs it

    def engine_plain() -> Any:
        nonlocal plain
        if plain is None:
            plain = Engine(model=args.model, disable_jump_forward=True, **kwargs)
        return plain

    print(f"model: {args.model} ({engine.source.model_path})")
    print(
        f"torch threads: {threads} (torch.set_num_threads); device: {engine.device}; "
        f"dtype: {engine.dtype}; default grammar backend: {engine.config.grammar_backend} "
        "(fallbacks: the others)"
    )
    print(f"sizes: {sizes}", flush=True)

    if "coverage" in sections:
        data = find_data_dir(args.data_dir)
        print(f"JSONSchemaBench: {data}", flush=True)
        compile_files = {s: sample_schemas(data / s, sizes.compile_limit, args.seed) for s in SETS}
        init = {
            "tokenizer_path": engine.source.tokenizer_path,
            "vocab_size": engine.model_config.vocab_size,
            "eos_token_ids": list(engine.eos_token_ids),
            "timeout": args.compile_timeout,
        }
        log_path = Path(tempfile.gettempdir()) / "plait-bench-grammar-worker.log"
        worker = CompileWorker(init, log_path)
        try:
            compiled = compile_section(
                compile_files, worker, engine.config.grammar_backend, args.compile_timeout
            )
        finally:
            worker.close()
        generated = {}
        for s in SETS:
            paths = sample_schemas(data / s, sizes.generate_limit, args.seed)
            if paths:
                generated[s] = generate_section(
                    engine, paths, sizes.max_new_tokens, args.batch_size
                )
                log(f"  generated {s}: {generated[s][1]['seconds']:.0f} s")
        report_coverage(compiled, generated, sizes, args.compile_timeout, worker.restarts)
        sys.stdout.flush()

    if "closing" in sections:
        data = find_data_dir(args.data_dir)
        limit = 40 if args.generate_limit is None else args.generate_limit
        max_tokens = args.max_new_tokens or 512
        by_set = closing_section(engine, data, limit, args.seed, max_tokens, args.batch_size)
        report_closing(by_set, limit, max_tokens)
        sys.stdout.flush()

    if "overhead" in sections:
        rows = overhead_section(engine_plain(), sizes.overhead_tokens, sizes.overhead_repeats)
        report_overhead(rows, sizes.overhead_repeats)
        sys.stdout.flush()

    if "jump" in sections:
        report_jump(jump_section(engine, engine_plain(), sizes.jump_prompts))
        sys.stdout.flush()

    if "peer" in sections:
        prompts = peer_prompts(engine, sizes.peer_calls)
        plait_r = plait_peer_workloads(engine, prompts)
        model_dir = engine.source.model_path
        if plain is not None:
            plain.shutdown()
        engine.shutdown()  # the peers get the cores to themselves
        peer = None
        if args.peer_python:
            try:
                peer = run_peer(args.peer_python, model_dir, threads, prompts)
            except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
                print(f"\npeer run failed: {e}")
        else:
            print("\n(no --peer-python: the peer columns are skipped; see the module docstring)")
        report_peer(plait_r, peer, sizes.peer_calls)
    if plain is not None:
        plain.shutdown()
    engine.shutdown()
    print(f"\ntotal bench time: {time.perf_counter() - started:.0f} s")
    return 0
