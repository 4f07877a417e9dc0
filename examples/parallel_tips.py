"""Parallel branches with ``fork`` / ``join``: a skeleton, then every tip
expanded at the same time. The fork caches the shared conversation once; all
branches start from it and run as one batch in the runtime.

    python examples/parallel_tips.py
"""

from __future__ import annotations

import time

import plait as pl


@pl.function
def tips(s, topic, n=3):
    s += pl.system("You give short, practical advice.")
    s += pl.user(f"Give {n} tips about {topic}, one line each.")
    with s.assistant():
        for i in range(1, n + 1):
            s += f"{i}." + pl.gen(f"tip_{i}", max_tokens=24, stop="\n") + "\n"
    forks = s.fork(n)
    for i, f in enumerate(forks, start=1):
        f += pl.user(f"Expand tip {i} in two sentences.")
        f += pl.assistant(pl.gen("detail", max_tokens=64))
    forks.join()  # s["detail"] is now the list of the branches' details
    s += pl.user("Summarize the tips in one sentence.")
    s += pl.assistant(pl.gen("summary", max_tokens=48))


def main() -> None:
    pl.set_default_backend(pl.Engine(model="smollm2"))
    t0 = time.perf_counter()
    state = tips.run(topic="staying healthy while working from home", temperature=0)
    for i, detail in enumerate(state["detail"], start=1):
        print(f"tip {i}: {state[f'tip_{i}'].strip()}\n   {detail.strip()}\n")
    print("summary:", state["summary"])
    print(f"{time.perf_counter() - t0:.2f}s")


if __name__ == "__main__":
    main()
