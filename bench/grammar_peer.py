"""``plait bench grammar``, section 4: plait against outlines and guidance on the
same model files, in the same run. plait's side runs here; the peers run in
their own environment through ``grammar_peer_child.py``."""

from __future__ import annotations

import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from plait.bench.grammar_decode import SMALL_SCHEMA

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
    script = Path(__file__).with_name("grammar_peer_child.py")
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
