"""Quickstart: the embedded engine with the default model (SmolLM2-135M-Instruct),
offline, on CPU. A two-step agent: answer a question, then extract the answer
as JSON from that conversation.

    python examples/quickstart.py
"""

from __future__ import annotations

import json
import time

import plait


def main() -> None:
    t0 = time.perf_counter()
    with plait.Engine(model="smollm2") as engine:
        print(
            f"engine ready in {time.perf_counter() - t0:.1f}s "
            f"({engine.model_config.architecture}, {engine.device}, {engine.dtype})"
        )
        messages = [
            {"role": "user", "content": "What is the capital of France?"},
        ]
        greedy = {"temperature": 0, "max_new_tokens": 64}
        answer = engine.generate(engine.apply_chat_template(messages), greedy)
        print("answer:", answer["text"])

        messages += [
            {"role": "assistant", "content": answer["text"]},
            {
                "role": "user",
                "content": 'Reply with JSON only, like {"city": "...", "country": "..."}.',
            },
        ]
        prompt = engine.apply_chat_template(messages) + '{"city": "'
        extracted = engine.generate(prompt, {**greedy, "stop": ["}"]})
        text = '{"city": "' + extracted["text"] + "}"
        print("json:", json.dumps(json.loads(text)))
        meta = extracted["meta_info"]
        print(f"{meta['completion_tokens']} tokens in {meta['e2e_latency']:.2f}s")


if __name__ == "__main__":
    main()
