"""Few-shot question answering over a batch with ``run_batch``.

Every run starts with the same few-shot examples. ``run_batch`` traces the
program, caches that constant prefix once, and runs the questions concurrently,
so the runtime batches them and each one computes only its own question.

    python examples/few_shot_qa.py
"""

from __future__ import annotations

import time

import plait as pl

EXAMPLES = [
    ("What is the capital of Japan?", "Tokyo"),
    ("What is the capital of the United Kingdom?", "London"),
    ("What is the capital of Italy?", "Rome"),
    ("What is the capital of Canada?", "Ottawa"),
]


@pl.function
def few_shot_qa(s, question):
    s += "Answer each question with one word.\n\n"
    for q, a in EXAMPLES:
        s += f"Q: {q}\nA: {a}\n\n"
    s += "Q: " + question + "\nA:" + pl.gen("answer", max_tokens=8, stop="\n")


def main() -> None:
    pl.set_default_backend(pl.Engine(model="smollm2"))
    countries = ["France", "Germany", "Spain", "China", "Egypt", "Brazil", "Kenya", "Peru"]
    questions = [{"question": f"What is the capital of {c}?"} for c in countries]
    t0 = time.perf_counter()
    states = few_shot_qa.run_batch(questions, temperature=0, progress_bar=True)
    elapsed = time.perf_counter() - t0
    for q, s in zip(questions, states):
        meta = s.get_meta_info("answer")
        print(f"{q['question']:40s} -> {s['answer'].strip():12s} (cached {meta['cached_tokens']})")
    print(f"{len(states)} programs in {elapsed:.2f}s")


if __name__ == "__main__":
    main()
