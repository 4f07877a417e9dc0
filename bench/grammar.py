"""``plait bench grammar``: what constrained decoding covers and what it costs.

    python -m plait bench grammar --threads 2 [--quick] [--peer-python /tmp/peer-venv/bin/python]

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
   plait) through ``bench_grammar_peer.py``. Each call gets a distinct prompt,
   so no runtime replays a whole cached prompt; a shared prefix may be reused
   (plait's radix cache, guidance's KV reuse; outlines recomputes it). plait's
   select is the ``choices`` constraint; a logprob-scoring variant (score the
   four continuations in one batch, no decoding) is shown beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SETS = ("Github_trivial", "Github_easy", "Glaiveai2K")
# label -> (primary backend, fallback); None: the engine's default primary.
COMPILE_CONFIGS: dict[str, tuple[str | None, bool]] = {
    "llguidance": ("llguidance", False),
    "outlines": ("outlines", False),
    "llguidance-lenient": ("llguidance-lenient", False),
    "default (chain)": (None, True),
}
DEFAULT_LABEL = "default (chain)"

PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "city": {"type": "string"},
        "email": {"type": "string"},
        "is_student": {"type": "boolean"},
    },
    "required": ["name", "age", "city", "email", "is_student"],
    "additionalProperties": False,
}
PEOPLE = [
    "Maria Silva, 21, a biology student in Lisbon, maria.silva@example.com",
    "Tom Baker, 45, a carpenter in Leeds, tom.baker@example.org",
    "Aiko Tanaka, 30, a software engineer in Osaka, aiko@example.jp",
    "Pedro Ruiz, 19, a music student in Seville, pedro.ruiz@example.es",
    "Fatima Zahra, 52, a doctor in Casablanca, f.zahra@example.ma",
    "Lars Berg, 23, a history student in Uppsala, lars.berg@example.se",
    "Grace Kelly, 67, a retired teacher in Dublin, grace.k@example.ie",
    "Chen Wei, 28, a chef in Singapore, chen.wei@example.sg",
]
SMALL_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
SELECT_CHOICES = ["positive", "negative", "neutral", "mixed"]
REVIEWS = [
    "The soup was cold and the waiter ignored us.",
    "Absolutely loved the concert, best night of the year!",
    "The parcel arrived on Tuesday.",
    "Great screen, but the battery dies by noon.",
    "I would not stay in this hotel again.",
    "The museum was wonderful and the guide was funny.",
    "The meeting is moved to room 4.",
    "Tasty food, terribly slow service.",
    "This is the best phone I have ever owned.",
    "The train was late again and nobody told us why.",
    "The book has 300 pages.",
    "Fun film, although the ending felt rushed.",
]


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


# ---- 1. coverage: compile -----------------------------------------------------------------


class CompileWorker:
    """A child process that compiles JSON schemas, one at a time, and times them.

    It is restarted after a compile that ran past its deadline: the engine would
    keep that compile running in the background (a thread cannot be stopped)
    and fall back for later slow compiles, which would make every later
    measurement depend on the straggler.
    """

    def __init__(self, init: dict[str, Any], log_path: Path):
        self._init = init
        self._log = open(log_path, "a")  # noqa: SIM115 -- closed in close()
        self.restarts = 0
        self._start()

    def _start(self) -> None:
        code = "from plait.runtime.bench_grammar import compile_worker_main; compile_worker_main()"
        self._proc = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            bufsize=1,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, args=(self._proc, self._lines), daemon=True).start()
        self._send(self._init)
        if self._recv(300) is None:
            raise RuntimeError(f"compile worker did not start; see {self._log.name}")

    @staticmethod
    def _read(proc: subprocess.Popen, lines: queue.Queue) -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    def _send(self, msg: dict[str, Any]) -> None:
        self._proc.stdin.write(json.dumps(msg) + "\n")
        self._proc.stdin.flush()

    def _recv(self, timeout: float) -> dict[str, Any] | None:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            return None
        return None if line is None else json.loads(line)

    def restart(self) -> None:
        self._stop()
        self.restarts += 1
        self._start()

    def compile(self, primary: str, fallback: bool, source: str, hard_timeout: float) -> dict:
        self._send({"primary": primary, "fallback": fallback, "source": source})
        result = self._recv(hard_timeout)
        if result is None:  # hung or died: what the deadline did not catch
            self.restart()
            error = f"worker gave no answer in {hard_timeout:g} s"
            return {
                "ok": False,
                "backend": None,
                "ms": hard_timeout * 1000,
                "timeout": True,
                "error": error,
            }
        if result.pop("straggling"):
            self.restart()
        return result

    def _stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()

    def close(self) -> None:
        self._stop()
        self._log.close()


def compile_worker_main() -> None:
    """The worker's loop: one JSON line in (an init, then compile requests), one out."""
    out = sys.stdout
    sys.stdout = sys.stderr  # stray prints go to the log, not the protocol
    init = json.loads(sys.stdin.readline())

    import transformers

    from plait.runtime.constrained import GrammarCompiler, GrammarError, GrammarSpec, TokenizerInfo

    tok = transformers.AutoTokenizer.from_pretrained(init["tokenizer_path"])
    info = TokenizerInfo.from_hf(tok, init["vocab_size"], init["eos_token_ids"])
    compilers: dict[tuple[str, bool], GrammarCompiler] = {}

    def reply(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    reply({"ready": True})
    for line in sys.stdin:
        msg = json.loads(line)
        key = (msg["primary"], msg["fallback"])
        if key not in compilers:
            compilers[key] = GrammarCompiler(
                info,
                msg["primary"],
                compile_timeout_s=init["timeout"],
                fallback=msg["fallback"],
                max_cached=0,  # time real compiles, even of a duplicate schema
            )
            compilers[key].compile(GrammarSpec("regex", "warm-up"))  # backend tables, once
        start = time.perf_counter()
        try:
            r = compilers[key].compile(GrammarSpec.of("json_schema", msg["source"]))
            res = {"ok": True, "backend": r.backend, "error": r.fallback_reason}
        except GrammarError as e:
            res = {"ok": False, "backend": None, "error": request_error_reason(e)}
        res["ms"] = (time.perf_counter() - start) * 1000
        res["timeout"] = "exceeded" in (res["error"] or "")
        res["straggling"] = _compile_still_running()
        reply(res)


def _compile_still_running() -> bool:
    """Whether a deadline compile thread (``plait-<backend>``) is still alive."""
    threads = [
        t
        for t in threading.enumerate()
        if t.name.startswith("plait-") and not t.name.startswith("plait-grammar")
    ]
    for t in threads:
        t.join(timeout=0.2)
    return any(t.is_alive() for t in threads)


def request_error_reason(e: Exception) -> str:
    """The reason part of a RequestError's message (without the echoed value)."""
    msg = str(e)
    field_name, value = getattr(e, "field", None), getattr(e, "value", None)
    if field_name is not None:
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        prefix = f"{field_name}={shown}: "
        if msg.startswith(prefix):
            return msg[len(prefix) :]
    return msg


@dataclass
class CompileStats:
    label: str
    results: list[dict] = field(default_factory=list)  # per schema: ok, backend, ms, ...

    def summary(self) -> dict[str, Any]:
        times = sorted(r["ms"] for r in self.results)
        n = len(self.results)
        backends: dict[str, int] = {}
        for r in self.results:
            backends[r["backend"] or "none"] = backends.get(r["backend"] or "none", 0) + 1
        return {
            "n": n,
            "pct": 100.0 * sum(r["ok"] for r in self.results) / max(n, 1),
            "median": statistics.median(times) if times else 0.0,
            "p90": times[min(n - 1, int(0.9 * n))] if times else 0.0,
            "timeouts": sum(r["timeout"] for r in self.results),
            "backends": backends,
        }


def compile_section(
    files: dict[str, list[Path]], worker: CompileWorker, primary: str, timeout: float
) -> dict[str, dict[str, CompileStats]]:
    """Compile every sampled schema under each configuration; returns set -> label -> stats."""
    out: dict[str, dict[str, CompileStats]] = {}
    hard = 3 * timeout + 60
    for set_name, paths in files.items():
        out[set_name] = {}
        for label, (cfg_primary, fallback) in COMPILE_CONFIGS.items():
            stats = CompileStats(label)
            t0 = time.perf_counter()
            for path in paths:
                r = worker.compile(cfg_primary or primary, fallback, path.read_text(), hard)
                stats.results.append({**r, "name": path.name})
            s = stats.summary()
            _log(
                f"  compiled {set_name} with {label}: {s['pct']:.1f}% "
                f"({time.perf_counter() - t0:.0f} s, {s['timeouts']} timeouts)"
            )
            out[set_name][label] = stats
    return out


# ---- 1. coverage: generate and validate ---------------------------------------------------


@dataclass
class GenResult:
    name: str
    status: str  # valid | invalid | compile_error | not_counted
    reason: str = ""
    backend: str | None = None


def _no_retrieve(uri: str) -> Any:
    raise LookupError(f"remote $ref not fetched: {uri}")


def make_validator(schema: Any) -> tuple[Any | None, str | None]:
    """A jsonschema validator for ``schema``, or (None, why jsonschema cannot handle it)."""
    import jsonschema
    import referencing
    from jsonschema.validators import validator_for

    if not isinstance(schema, (dict, bool)):
        return None, f"not a schema: {type(schema).__name__}"
    cls = validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as e:
        return None, f"invalid for {cls.__name__}: {_one_line(e.message)}"
    registry = referencing.Registry(retrieve=_no_retrieve)
    return cls(schema, registry=registry, format_checker=cls.FORMAT_CHECKER), None


def validate_output(validator: Any, text: str, finish: dict | None, max_tokens: int) -> tuple:
    """(status, reason) of one output: valid, invalid or not_counted."""
    import jsonschema
    import referencing.exceptions

    kind = (finish or {}).get("type")
    if kind == "abort":
        return "invalid", f"aborted: {_one_line((finish or {}).get('message', ''))}"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        if kind == "length":
            return "invalid", f"truncated at max tokens ({max_tokens}): ...{text[-60:]!r}"
        return "invalid", f"finished ({kind}) but not JSON: {e.msg} at char {e.pos}"
    try:
        error = jsonschema.exceptions.best_match(validator.iter_errors(value))
    except referencing.exceptions.Unresolvable as e:
        return "not_counted", f"jsonschema cannot resolve $ref: {_one_line(str(e))}"
    except re.error as e:
        return "not_counted", f"jsonschema cannot compile a pattern: {e}"
    except (OverflowError, ValueError, RecursionError) as e:  # e.g. a 600-digit integer
        return "invalid", f"jsonschema cannot check the value: {type(e).__name__}: {e}"
    if error is None:
        return "valid", ""
    where = "/".join(str(p) for p in error.absolute_path) or "(root)"
    cut = " (truncated at max tokens)" if kind == "length" else ""
    return "invalid", f"at {where}: {_one_line(error.message)}{cut}"


def schema_prompt(engine: Any, schema_text: str, budget: int) -> tuple[str, bool]:
    """The chat prompt for one schema, the schema text cut to fit ``budget`` tokens."""

    def render(text: str) -> str:
        return engine.apply_chat_template(
            [
                {
                    "role": "user",
                    "content": "Generate a JSON object that is valid against this JSON schema. "
                    f"Reply with the JSON only.\n\nSchema:\n{text}",
                }
            ]
        )

    prompt, cut = render(schema_text), False
    n = len(engine.tokenizer.encode(prompt))
    while n > budget:
        schema_text = schema_text[: int(len(schema_text) * budget / n * 0.9)]
        prompt, cut = render(schema_text + " ..."), True
        n = len(engine.tokenizer.encode(prompt))
    return prompt, cut


def generate_section(
    engine: Any, paths: list[Path], max_tokens: int, batch_size: int
) -> tuple[list[GenResult], dict[str, float]]:
    """Generate one output per schema with the default engine and validate it."""
    by_mode = generate_modes(engine, paths, max_tokens, batch_size, {"default": {}})
    return by_mode["default"]


def generate_modes(
    engine: Any,
    paths: list[Path],
    max_tokens: int,
    batch_size: int,
    modes: dict[str, dict[str, Any]],
) -> dict[str, tuple[list[GenResult], dict[str, float]]]:
    """Generate one output per schema and mode (extra sampling params per mode; the
    modes of a schema share a batch, hence its prompt's prefill) and validate them."""
    from plait.runtime.constrained import GrammarError, GrammarSpec

    results: dict[str, GenResult] = {}
    todo: list[tuple[str, Any, Any, str]] = []  # name, schema, validator, prompt
    cut_prompts = 0
    budget = engine.context_len - max_tokens
    for path in paths:
        text = path.read_text()
        schema = json.loads(text)
        validator, why = make_validator(schema)
        if validator is None:
            results[path.name] = GenResult(path.name, "not_counted", why)
            continue
        try:
            compiled = engine.grammar_compiler.compile(GrammarSpec.of("json_schema", schema))
        except GrammarError as e:
            results[path.name] = GenResult(
                path.name, "compile_error", f"compile error: {_one_line(request_error_reason(e))}"
            )
            continue
        compact = json.dumps(schema, ensure_ascii=False)
        prompt, cut = schema_prompt(engine, compact, budget)
        cut_prompts += cut
        todo.append((path.name, schema, validator, prompt))
        results[path.name] = GenResult(path.name, "pending", backend=compiled.backend)

    t0 = time.perf_counter()
    per_mode = {m: ({}, {"tokens": 0, "closed": 0, "cut_prompts": cut_prompts}) for m in modes}
    for m in modes:
        per_mode[m][0].update({k: GenResult(**vars(r)) for k, r in results.items()})
    step = max(1, batch_size // len(modes))
    for i in range(0, len(todo), step):
        batch = [(item, m) for item in todo[i : i + step] for m in modes]
        params = [
            {"max_new_tokens": max_tokens, "temperature": 0, "json_schema": s, **modes[m]}
            for (_, s, _, _), m in batch
        ]
        outs = _generate_isolated(engine, [item[3] for item, _ in batch], params)
        for ((name, _, validator, _), m), out in zip(batch, outs):
            r = per_mode[m][0][name]
            info = per_mode[m][1]
            if isinstance(out, Exception):
                r.status, r.reason = "compile_error", f"generate raised: {_one_line(str(out))}"
                continue
            meta = out["meta_info"]
            info["tokens"] += meta["completion_tokens"]
            info["closed"] += bool((meta["finish_reason"] or {}).get("closed"))
            r.backend = meta.get("grammar_backend", r.backend)
            r.status, r.reason = validate_output(
                validator, out["text"], meta["finish_reason"], max_tokens
            )
    seconds = time.perf_counter() - t0
    out_modes = {}
    for m, (res, info) in per_mode.items():
        info["seconds"] = seconds
        out_modes[m] = ([res[p.name] for p in paths], info)
    return out_modes


def closing_section(
    engine: Any, data: Path, limit: int, seed: int, max_tokens: int, batch_size: int
) -> dict[str, dict[str, tuple[list[GenResult], dict[str, float]]]]:
    """Per set: outputs with budget-aware closing on and off (same schemas, same run)."""
    modes = {"closing on": {"budget_closing": True}, "closing off": {"budget_closing": False}}
    out = {}
    for set_name in SETS:
        from plait.runtime.constrained.coverage import sample_schemas

        paths = sample_schemas(data / set_name, limit, seed)
        out[set_name] = generate_modes(engine, paths, max_tokens, batch_size, modes)
        _log(f"  closing {set_name}: {out[set_name]['closing on'][1]['seconds']:.0f} s")
    return out


def report_closing(
    by_set: dict[str, dict[str, tuple[list[GenResult], dict[str, float]]]],
    limit: int,
    max_tokens: int,
) -> None:
    print(
        f"\n== 5. Budget-aware closing: JSONSchemaBench, {limit} schemas/set, greedy, "
        f"max {max_tokens} tokens; valid = validates with jsonschema"
    )
    for set_name, modes in by_set.items():
        parts = []
        compiled = 0
        for mode, (results, info) in modes.items():
            counted = [r for r in results if r.status in ("valid", "invalid")]
            compiled = len(counted)
            valid = sum(r.status == "valid" for r in counted)
            pct = 100.0 * valid / max(compiled, 1)
            parts.append(
                f"{mode}: valid outputs {valid}/{compiled} ({pct:.1f}%), "
                f"{int(info['closed'])} closed, {int(info['tokens'])} tokens"
            )
        print(f"{set_name}: compiled {compiled}; " + "; ".join(parts))
    print("\ninvalid outputs:")
    for set_name, modes in by_set.items():
        for mode, (results, _) in modes.items():
            for r in results:
                if r.status == "invalid":
                    print(f"  {set_name} [{mode}] {r.name} [{r.backend}]: {r.reason}")
            skipped = [r for r in results if r.status in ("not_counted", "compile_error")]
            if skipped and mode == next(iter(modes)):
                names = ", ".join(f"{r.name} ({r.status})" for r in skipped)
                print(f"  {set_name}: not counted: {names}")


def _generate_isolated(engine: Any, prompts: list[str], params: list[dict]) -> list[Any]:
    """One batched generate; if it raises, each prompt alone (an exception per failure)."""
    try:
        return engine.generate(prompts, params)
    except Exception:
        outs: list[Any] = []
        for prompt, p in zip(prompts, params):
            try:
                outs.append(engine.generate(prompt, p))
            except Exception as e:
                outs.append(e)
        return outs


def report_coverage(
    compiled: dict[str, dict[str, CompileStats]],
    generated: dict[str, tuple[list[GenResult], dict[str, float]]],
    sizes: Sizes,
    timeout: float,
    restarts: int,
) -> None:
    print(
        f"\n== 1. Coverage: JSONSchemaBench; compile {sizes.compile_limit}/set "
        f"(timeout {timeout:g} s = failure), generate {sizes.generate_limit}/set "
        f"(greedy, max {sizes.max_new_tokens} tokens)"
    )
    print(
        f"{'set':15s} {'config':19s} {'compiled':>9s} {'median ms':>10s} {'p90 ms':>9s}"
        f" {'timeouts':>8s}  backends"
    )
    for set_name, by_label in compiled.items():
        for k, (label, stats) in enumerate(by_label.items()):
            s = stats.summary()
            backends = (
                ", ".join(f"{b} {n}" for b, n in sorted(s["backends"].items()))
                if label == DEFAULT_LABEL
                else ""
            )
            print(
                f"{set_name if k == 0 else '':15s} {label:19s} {s['pct']:8.1f}% "
                f"{s['median']:10.1f} {s['p90']:9.1f} {s['timeouts']:8d}  {backends}"
            )
    if restarts:
        print(f"(the compile worker was restarted {restarts}x after a compile past its deadline)")

    if generated:
        print("\nvalid output, default configuration (valid / sampled schemas jsonschema handles):")
        print(
            f"{'set':15s} {'valid':>12s} {'invalid':>8s} {'no compile':>10s} {'not counted':>11s}"
            f" {'tokens':>7s} {'gen s':>6s}"
        )
    for set_name, (results, info) in generated.items():
        counted = [r for r in results if r.status != "not_counted"]
        valid = sum(r.status == "valid" for r in counted)
        pct = 100.0 * valid / max(len(counted), 1)
        print(
            f"{set_name:15s} {valid:3d}/{len(counted):<3d}{pct:5.1f}%"
            f" {sum(r.status == 'invalid' for r in counted):8d}"
            f" {sum(r.status == 'compile_error' for r in counted):10d}"
            f" {len(results) - len(counted):11d} {int(info['tokens']):7d} {info['seconds']:6.0f}"
        )
        if info["cut_prompts"]:
            print(f"  ({int(info['cut_prompts'])} prompt(s) had the schema text cut to fit)")

    print("\nfailures, default configuration:")
    any_failure = False
    for set_name in compiled.keys() | generated.keys():
        lines = []
        default = compiled.get(set_name, {}).get(DEFAULT_LABEL)
        for r in default.results if default else []:
            if not r["ok"]:
                lines.append(f"{r['name']}: compile error: {_one_line(r['error'] or '')}")
        for r in generated.get(set_name, ([], {}))[0]:
            if r.status in ("invalid", "compile_error"):
                tag = f" [{r.backend}]" if r.backend else ""
                lines.append(f"{r.name}{tag}: {r.reason}")
            elif r.status == "not_counted":
                lines.append(f"{r.name}: not counted: {r.reason}")
        if lines:
            any_failure = True
            print(f"  {set_name}:")
            for line in lines:
                print(f"    {line}")
    if not any_failure:
        print("  none")


# ---- 2. overhead --------------------------------------------------------------------------


def overhead_section(engine: Any, n_tokens: int, repeats: int) -> list[dict[str, Any]]:
    """ms per decode step, free vs constrained, at batch 1 and batch 16.

    Each mode runs ``repeats`` times, the modes interleaved (rotating order), so
    a burst of load from other jobs on the machine hits all of them alike. Wall
    time and this process's CPU time (user + system, all threads) are both
    kept: CPU time barely moves when another job takes the cores for a while.
    """
    from plait.runtime.bench import TOPICS

    prompts = [
        engine.apply_chat_template(
            [{"role": "user", "content": f"Write a long story about {TOPICS[i % 8]} (part {i})."}]
        )
        for i in range(16)
    ]
    rows = []
    for bs, n in ((1, n_tokens), (16, max(2, n_tokens // 2))):
        modes = {
            "free (ignore_eos)": {"ignore_eos": True},
            "regex": {"regex": f"(?:[a-z ]{{16}}){{{n}}}"},
            "json array": {"json_schema": {"type": "array", "minItems": n, "items": SMALL_SCHEMA}},
        }
        batch = prompts[:bs]
        for extra in modes.values():  # compile, cache the prompts, warm up
            engine.generate(batch, {"max_new_tokens": 2, "temperature": 0, **extra})
        wall: dict[str, list[float]] = {m: [] for m in modes}
        cpu: dict[str, list[float]] = {m: [] for m in modes}
        passes: dict[str, set[int]] = {m: set() for m in modes}
        exact: dict[str, bool] = dict.fromkeys(modes, True)
        names = list(modes)
        for r in range(repeats):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                params = {"max_new_tokens": n, "temperature": 0, **modes[name]}
                p0 = engine.get_stats()["num_forward_passes"]
                c0, t0 = _cpu_seconds(), time.perf_counter()
                outs = engine.generate(batch, params)
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(_cpu_seconds() - c0)
                passes[name].add(engine.get_stats()["num_forward_passes"] - p0)
                exact[name] &= all(len(o["output_ids"]) == n for o in outs)
        free = names[0]
        for name in names:
            rows.append(
                {
                    "batch": bs,
                    "tokens": n,
                    "mode": name,
                    "wall_ms": 1000 * statistics.median(wall[name]) / n,
                    "wall_min_ms": 1000 * min(wall[name]) / n,
                    "cpu_ms": 1000 * statistics.median(cpu[name]) / n,
                    "over_wall": statistics.median(wall[name]) / statistics.median(wall[free]) - 1,
                    "over_min": min(wall[name]) / min(wall[free]) - 1,
                    "over_cpu": statistics.median(cpu[name]) / statistics.median(cpu[free]) - 1,
                    "passes": sorted(passes[name]),
                    "exact": exact[name],
                }
            )
    return rows


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def report_overhead(rows: list[dict[str, Any]], repeats: int) -> None:
    print(
        f"\n== 2. Per-token overhead of constrained decoding (jump-forward off; {repeats} "
        "interleaved run(s) per mode; same prompts, same token count; goal <= 5%)"
    )
    print(
        f"{'batch':>5s} {'tokens':>6s} {'mode':18s} {'ms/step':>8s} {'min':>7s} {'CPU ms':>7s}"
        f" {'over wall':>9s} {'over min':>8s} {'over CPU':>8s} {'passes':>6s} exact"
    )
    for r in rows:
        free = r["mode"].startswith("free")
        over = [
            "-" if free else f"{100 * r[k]:+.1f}%" for k in ("over_wall", "over_min", "over_cpu")
        ]
        passes = "/".join(str(p) for p in r["passes"])
        print(
            f"{r['batch']:5d} {r['tokens']:6d} {r['mode']:18s} {r['wall_ms']:8.1f} "
            f"{r['wall_min_ms']:7.1f} {r['cpu_ms']:7.1f} {over[0]:>9s} {over[1]:>8s} "
            f"{over[2]:>8s} {passes:>6s} {'yes' if r['exact'] else 'NO'}"
        )
    print(
        "ms/step = wall time / tokens per request (median run; min = fastest run); CPU ms = "
        "process CPU time per step, all threads; over = vs the free run; passes = forward "
        "passes per run; exact = every request gave exactly the token count"
    )


# ---- 3. jump-forward ----------------------------------------------------------------------


def jump_section(engine_jf: Any, engine_plain: Any, n_prompts: int) -> dict[str, Any]:
    """Forward passes for the person schema with and without jump-forward, per prompt."""
    validator, _ = make_validator(PERSON_SCHEMA)
    prompts = [
        engine_jf.apply_chat_template(
            [
                {
                    "role": "user",
                    "content": "Write a JSON record (name, age, city, email, is_student) for "
                    f"this person: {PEOPLE[i % len(PEOPLE)]}.",
                }
            ]
        )
        for i in range(n_prompts)
    ]
    params = {"max_new_tokens": JUMP_MAX_TOKENS, "temperature": 0, "json_schema": PERSON_SCHEMA}
    runs = {}
    for label, engine in (("with jump-forward", engine_jf), ("without", engine_plain)):
        engine.generate("warm up", {**params, "max_new_tokens": 4})  # compile
        per_prompt = []
        for p in prompts:  # one at a time: the passes of each request alone
            p0 = engine.get_stats()["num_forward_passes"]
            t0 = time.perf_counter()
            o = engine.generate(p, params)
            meta = o["meta_info"]
            status, _ = validate_output(
                validator, o["text"], meta["finish_reason"], JUMP_MAX_TOKENS
            )
            per_prompt.append(
                {
                    "passes": engine.get_stats()["num_forward_passes"] - p0,
                    "seconds": time.perf_counter() - t0,
                    "tokens": meta["completion_tokens"],
                    "forced": meta.get("forced_tokens", 0),
                    "valid": status == "valid",
                    "complete": (meta["finish_reason"] or {}).get("type") == "stop",
                    "text": o["text"],
                }
            )
        runs[label] = per_prompt
    return runs


JUMP_MAX_TOKENS = 128


def report_jump(runs: dict[str, list[dict]]) -> None:
    jf, plain = runs["with jump-forward"], runs["without"]
    n = len(jf)
    print(
        f"\n== 3. Jump-forward: person schema (name, age, city, email, is_student), {n} prompts "
        f"one at a time, greedy, max {JUMP_MAX_TOKENS} tokens"
    )
    print(
        f"{'':18s} {'fwd passes':>10s} {'tokens':>7s} {'forced':>7s} {'seconds':>8s}"
        f" {'valid':>7s} {'complete':>8s}"
    )
    for label, rs in runs.items():
        print(
            f"{label:18s} {sum(r['passes'] for r in rs):10d} {sum(r['tokens'] for r in rs):7d} "
            f"{sum(r['forced'] for r in rs):7d} {sum(r['seconds'] for r in rs):8.2f} "
            f"{sum(r['valid'] for r in rs):3d}/{n:<3d} {sum(r['complete'] for r in rs):4d}/{n:<3d}"
        )

    def saved(keep: list[int]) -> float:
        a = sum(jf[i]["passes"] for i in keep)
        b = sum(plain[i]["passes"] for i in keep)
        return 100 * (1 - a / max(b, 1))

    done = [i for i in range(n) if jf[i]["complete"] and plain[i]["complete"]]
    same = sum(a["text"] == b["text"] for a, b in zip(jf, plain))
    speed = sum(r["seconds"] for r in plain) / max(sum(r["seconds"] for r in jf), 1e-9)
    print(
        f"forward passes saved: {saved(list(range(n))):.1f}% over all {n} outputs, "
        f"{saved(done):.1f}% over the {len(done)} that completed before max tokens "
        f"(goal >= 30%); wall time {speed:.2f}x; identical outputs both ways {same}/{n}"
    )
    print(
        "per prompt (passes with / without jump-forward, tokens, forced): "
        + ", ".join(
            f"{a['passes']}/{b['passes']} ({a['tokens']}, {a['forced']})" for a, b in zip(jf, plain)
        )
    )
    print(f"example: {jf[0]['text']}")
    for i, (a, b) in enumerate(zip(jf, plain)):
        if not a["complete"]:
            print(f"prompt {i} hit max tokens: {a['text'][:100]!r}...")
        if a["text"] != b["text"]:
            print(f"prompt {i} differs: with jump-forward {a['text']!r}")
            print(f"{'':10s}         without           {b['text']!r}")


# ---- 4. peers -----------------------------------------------------------------------------


def peer_prompts(engine: Any, calls: int) -> dict[str, list[str]]:
    """Distinct prompts per call (the first is the warm-up)."""
    json_prompts = [
        engine.apply_chat_template(
            [
                {
                    "role": "user",
                    "content": f"Invent a person (record {i}) and give their name and age as a "
                    "JSON object.",
                }
            ]
        )
        for i in range(calls + 1)
    ]
    select_prompts = [
        engine.apply_chat_template(
            [
                {
                    "role": "user",
                    "content": f'Review: "{REVIEWS[i % len(REVIEWS)]}"\nIs the sentiment of '
                    "this review positive, negative, neutral or mixed? Answer with one word.",
                }
            ]
        )
        for i in range(calls + 1)
    ]
    return {"json": json_prompts, "select": select_prompts}


def plait_peer_workloads(engine: Any, prompts: dict[str, list[str]]) -> dict[str, dict]:
    """Seconds per call for plait: JSON object, choices select, logprob-scoring select."""

    def json_call(p: str) -> dict:
        params = {"max_new_tokens": 64, "temperature": 0, "json_schema": SMALL_SCHEMA}
        return engine.generate(p, params)

    def select_call(p: str) -> dict:
        return engine.generate(
            p, {"max_new_tokens": 8, "temperature": 0, "choices": SELECT_CHOICES}
        )

    def score_call(p: str) -> dict:
        prefix_len = len(engine.tokenizer.encode(p))
        outs = engine.generate(
            [p + c for c in SELECT_CHOICES],
            {"max_new_tokens": 0},
            return_logprob=True,
            logprob_start_len=prefix_len,
        )
        scores = [
            sum(lp for lp, _, _ in o["meta_info"]["input_token_logprobs"] if lp is not None)
            for o in outs
        ]
        best = max(range(len(scores)), key=scores.__getitem__)
        return {"text": SELECT_CHOICES[best], "meta_info": {"completion_tokens": 0}}

    out = {}
    for name, fn, key in (
        ("json", json_call, "json"),
        ("select", select_call, "select"),
        ("select (logprob scoring)", score_call, "select"),
    ):
        engine.flush_cache()  # no workload reuses the prompts an earlier one cached
        fn(prompts[key][0])  # warm-up
        times, last = [], None
        for p in prompts[key][1:]:
            t0 = time.perf_counter()
            last = fn(p)
            times.append(time.perf_counter() - t0)
        out[name] = {
            "median_s": statistics.median(times),
            "min_s": min(times),
            "all_s": times,
            "text": last["text"],
            "tokens": last["meta_info"]["completion_tokens"],
        }
    return out


def run_peer(
    peer_python: str, model_dir: str, threads: int, prompts: dict[str, list[str]]
) -> dict[str, Any]:
    spec = {
        "model_dir": model_dir,
        "threads": threads,
        "json_prompts": prompts["json"],
        "select_prompts": prompts["select"],
        "schema": SMALL_SCHEMA,
        "choices": SELECT_CHOICES,
        "json_max_tokens": 64,
        "select_max_tokens": 8,
    }
    script = Path(__file__).with_name("bench_grammar_peer.py")
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    try:
        proc = subprocess.run(
            [peer_python, str(script), f.name], capture_output=True, text=True, timeout=1800
        )
    finally:
        Path(f.name).unlink(missing_ok=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"peer script failed (rc {proc.returncode}):\n{tail}")
    return json.loads(lines[-1])


def report_peer(plait_r: dict[str, dict], peer: dict[str, Any] | None, calls: int) -> None:
    print(
        f"\n== 4. Same-run peer comparison: seconds per call (median of {calls} calls, distinct "
        "prompts, greedy; tokens generated in brackets)"
    )
    results = (peer or {}).get("results", [])
    rows = (
        ("JSON object {name, age}", "json", "json"),
        ("4-way select (choices)", "select", "select"),
        ("4-way select (logprobs)", "select (logprob scoring)", "select"),
    )
    for stat, title in (("median_s", "median call"), ("min_s", "fastest call")):
        header = f"{title:26s} {'plait':>14s}"
        for r in results:
            header += f" {r['library'].split(' (')[0]:>16s} {'/plait':>7s}"
        print(header)
        for label, pkey, peer_key in rows:
            p = plait_r[pkey]
            line = f"{label:26s} {p[stat]:9.3f} [{p['tokens']:2d}]"
            for r in results:
                q = r[peer_key]
                line += f" {q[stat]:11.3f} [{q['tokens']:2d}] {q[stat] / p[stat]:6.2f}x"
            print(line)
    for pkey, p in plait_r.items():
        print(f"plait {pkey} calls (s): {' '.join(f'{t:.2f}' for t in p['all_s'])}")
    for r in results:
        for key in ("json", "select"):
            times = " ".join(f"{t:.2f}" for t in r[key]["all_s"])
            print(f"{r['library'].split(' (')[0]} {key} calls (s): {times}")
    for pkey, p in plait_r.items():
        print(f"plait {pkey}: {p['text']!r}")
    for r in results:
        print(
            f"{r['library']}: json {r['json']['text']!r} (setup {r['json']['setup_s']:.2f} s), "
            f"select {r['select']['text']!r} (setup {r['select']['setup_s']:.2f} s)"
        )
    for name, err in (peer or {}).get("errors", {}).items():
        print(f"{name}: not measured: {err}")
    if peer:
        info = peer.get("info", {})
        print(
            f"peer environment: torch {info.get('torch')}, transformers "
            f"{info.get('transformers')}; /plait = peer seconds / plait seconds"
        )
    print(
        "reference figures measured elsewhere on this machine: guidance/outlines 0.9-1.4 s "
        "(JSON) and 0.16-0.36 s (select); llama.cpp 0.30-0.41 s and 0.09-0.13 s"
    )


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
    import torch

    from plait.runtime.bench import engine_options
    from plait.runtime.constrained.coverage import sample_schemas
    from plait.runtime.engine import Engine

    started = time.perf_counter()
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
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
                _log(f"  generated {s}: {generated[s][1]['seconds']:.0f} s")
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


def _one_line(text: str, limit: int = 200) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _log(msg: str) -> None:
    """Progress, on stderr (the tables go to stdout)."""
    print(msg, file=sys.stderr, flush=True)
