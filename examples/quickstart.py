"""Quickstart: an agent program on the embedded engine with the default model
(SmolLM2-135M-Instruct), offline, on CPU. It answers a question, then extracts
the answer from that same conversation as JSON that fits a schema -- the second
turn reuses the first turn's KV cache.

    python examples/quickstart.py
"""

from __future__ import annotations

import logging
import time

from pydantic import BaseModel

import plait as pl


class Place(BaseModel):
    city: str
    country: str


@pl.function
def agent(s, question):
    # No system turn: the model's chat template inserts its own default system prompt,
    # which is what this small model was tuned with (a custom one makes it ramble).
    s += pl.user(question)
    s += pl.assistant(pl.gen("answer", max_tokens=64))
    s += pl.user("Give the city and country from your answer as JSON.")
    s += pl.assistant(pl.gen("place", json_schema=Place, max_tokens=48))


def main() -> None:
    # plait logs what it does at INFO: the one-time GGUF conversion and CPU kernel build
    # (half a minute each, the first time on a machine), the model load, the KV budget.
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("plait").setLevel(logging.INFO)
    t0 = time.perf_counter()
    engine = pl.Engine(model="smollm2")  # also what runs when no backend is set
    pl.set_default_backend(engine)
    print(f"engine ready in {time.perf_counter() - t0:.1f}s ({engine.device}, {engine.dtype})")

    t1 = time.perf_counter()
    state = agent.run(question="What is the capital of France?", temperature=0)
    print("answer:", state["answer"])
    place = state.parsed("place")  # a validated Place
    print("json:  ", state["place"], "->", repr(place))
    meta = state.get_meta_info("place")
    print(
        f"second turn reused {meta['cached_tokens']} of {meta['prompt_tokens']} prompt tokens; "
        f"jump-forward wrote {meta['forced_tokens']} of its {meta['completion_tokens']} tokens"
    )
    print(f"program ran in {time.perf_counter() - t1:.2f}s")
    engine.shutdown()


if __name__ == "__main__":
    main()
