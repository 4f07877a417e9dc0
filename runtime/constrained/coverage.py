"""Compile coverage of a folder of JSON schemas (e.g. JSONSchemaBench subsets).

    python -m plait.runtime.constrained.coverage DIR [DIR ...] --limit 100

prints, per folder, the share of schemas that compile (with the default
fallback chain unless ``--no-fallback``), which backend compiled them, and the
median / p90 compile time. Compiling is not generating: whether outputs
validate is a separate measure.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from plait.runtime.constrained.compiler import FALLBACK_ORDER, GrammarCompiler
from plait.runtime.constrained.spec import GrammarError, GrammarSpec
from plait.runtime.constrained.vocab import TokenizerInfo


@dataclass(frozen=True)
class SchemaResult:
    name: str
    ok: bool
    backend: str | None  # which backend compiled it
    ms: float
    error: str | None  # GrammarError message, or the fallback reason when ok


def sample_schemas(folder: str | Path, limit: int | None = None, seed: int = 0) -> list[Path]:
    """The folder's ``*.json`` files, sorted, or a seeded sample of ``limit`` of them."""
    files = sorted(Path(folder).glob("*.json"))
    if limit is not None and limit < len(files):
        files = sorted(random.Random(seed).sample(files, limit))
    return files


def compile_coverage(
    folder: str | Path, compiler: GrammarCompiler, limit: int | None = None, seed: int = 0
) -> list[SchemaResult]:
    """Compile each schema of ``folder`` (synchronously) and time it."""
    compiler.compile(GrammarSpec("regex", "warm-up"))  # builds the backend tokenizer once
    results = []
    for path in sample_schemas(folder, limit, seed):
        start = time.perf_counter()
        try:
            result = compiler.compile(GrammarSpec.of("json_schema", path.read_text()))
            ok, backend, error = True, result.backend, result.fallback_reason
        except GrammarError as e:
            ok, backend, error = False, None, str(e)
        ms = (time.perf_counter() - start) * 1000
        results.append(SchemaResult(path.name, ok, backend, ms, error))
    return results


def summarize(results: list[SchemaResult]) -> dict:
    """Compiled share, backends used, and median / p90 compile time in ms."""
    times = sorted(r.ms for r in results)
    return {
        "schemas": len(results),
        "compiled_pct": 100.0 * sum(r.ok for r in results) / max(len(results), 1),
        "backends": dict(Counter(r.backend or "none" for r in results)),
        "median_ms": statistics.median(times) if times else 0.0,
        "p90_ms": times[min(len(times) - 1, int(0.9 * len(times)))] if times else 0.0,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--limit", type=int, default=None, help="sample this many per folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--primary", default="llguidance", choices=FALLBACK_ORDER)
    parser.add_argument("--no-fallback", action="store_true")
    parser.add_argument("--timeout", type=float, default=10.0, help="compile_timeout_s")
    parser.add_argument("--tokenizer", default=None, help="tokenizer dir (default: smollm2)")
    args = parser.parse_args(argv)

    import transformers

    from plait.runtime.loader import resolve_model

    path = args.tokenizer or resolve_model("smollm2", progress=False).tokenizer_path
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    info = TokenizerInfo.from_hf(tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    for folder in args.folders:
        compiler = GrammarCompiler(
            info, args.primary, compile_timeout_s=args.timeout, fallback=not args.no_fallback
        )
        summary = summarize(compile_coverage(folder, compiler, args.limit, args.seed))
        print(
            f"{Path(folder).name}: {summary['compiled_pct']:.1f}% of {summary['schemas']} "
            f"compiled; median {summary['median_ms']:.1f} ms, p90 {summary['p90_ms']:.1f} ms; "
            f"backends {summary['backends']}"
        )
        compiler.close()


if __name__ == "__main__":
    main()
