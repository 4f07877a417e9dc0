"""``plait bench grammar``, sections 2 and 3: what a grammar costs per decode step
(overhead) and how many forward passes jump-forward saves (jump)."""

from __future__ import annotations

import statistics
import time
from typing import Any

from plait.bench.common import cpu_seconds
from plait.bench.engine import TOPICS
from plait.bench.grammar_coverage import make_validator, validate_output

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


# ---- 2. overhead --------------------------------------------------------------------------


def overhead_section(engine: Any, n_tokens: int, repeats: int) -> list[dict[str, Any]]:
    """ms per decode step, free vs constrained, at batch 1 and batch 16.

    Each mode runs ``repeats`` times, the modes interleaved (rotating order), so
    a burst of load from other jobs on the machine hits all of them alike. Wall
    time and this process's CPU time (user + system, all threads) are both
    kept: CPU time barely moves when another job takes the cores for a while.
    """
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
                c0, t0 = cpu_seconds(), time.perf_counter()
                outs = engine.generate(batch, params)
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(cpu_seconds() - c0)
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
