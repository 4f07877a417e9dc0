"""``plait bench grammar``, coverage part two and closing: generate one output per
sampled schema with the default engine, validate it with jsonschema, and report
(with the compile results) per set; budget-aware closing on and off."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from plait.bench.grammar_compile import (
    DEFAULT_LABEL,
    SETS,
    CompileStats,
    log,
    one_line,
    request_error_reason,
)

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
        return None, f"invalid for {cls.__name__}: {one_line(e.message)}"
    registry = referencing.Registry(retrieve=_no_retrieve)
    return cls(schema, registry=registry, format_checker=cls.FORMAT_CHECKER), None


def validate_output(validator: Any, text: str, finish: dict | None, max_tokens: int) -> tuple:
    """(status, reason) of one output: valid, invalid or not_counted."""
    import jsonschema
    import referencing.exceptions

    kind = (finish or {}).get("type")
    if kind == "abort":
        return "invalid", f"aborted: {one_line((finish or {}).get('message', ''))}"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        if kind == "length":
            return "invalid", f"truncated at max tokens ({max_tokens}): ...{text[-60:]!r}"
        return "invalid", f"finished ({kind}) but not JSON: {e.msg} at char {e.pos}"
    try:
        error = jsonschema.exceptions.best_match(validator.iter_errors(value))
    except referencing.exceptions.Unresolvable as e:
        return "not_counted", f"jsonschema cannot resolve $ref: {one_line(str(e))}"
    except re.error as e:
        return "not_counted", f"jsonschema cannot compile a pattern: {e}"
    except (OverflowError, ValueError, RecursionError) as e:  # e.g. a 600-digit integer
        return "invalid", f"jsonschema cannot check the value: {type(e).__name__}: {e}"
    if error is None:
        return "valid", ""
    where = "/".join(str(p) for p in error.absolute_path) or "(root)"
    cut = " (truncated at max tokens)" if kind == "length" else ""
    return "invalid", f"at {where}: {one_line(error.message)}{cut}"


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
                path.name, "compile_error", f"compile error: {one_line(request_error_reason(e))}"
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
                r.status, r.reason = "compile_error", f"generate raised: {one_line(str(out))}"
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
        log(f"  closing {set_name}: {out[set_name]['closing on'][1]['seconds']:.0f} s")
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
    sizes: Any,  # the run's grammar.Sizes
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
                lines.append(f"{r['name']}: compile error: {one_line(r['error'] or '')}")
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
