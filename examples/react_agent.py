"""A ReAct-style agent: the model picks an action with ``select``, Python runs
the tool and branches on the choice, and the loop continues in one program.

    python examples/react_agent.py
"""

from __future__ import annotations

import plait as pl

FACTS = {
    "eiffel tower": "The Eiffel Tower is in Paris and is 330 metres tall.",
    "paris": "Paris is the capital of France, with about 2.1 million inhabitants.",
    "france": "France is a country in Western Europe; its capital is Paris.",
}


def search(query: str) -> str:
    """A toy search tool over a few facts."""
    q = query.lower()
    hits = [text for key, text in FACTS.items() if key in q]
    return " ".join(hits) or "No result."


@pl.function
def react(s, question, max_steps=3):
    s += pl.system(
        "You answer questions. At each step choose an action: Search to look something "
        "up, or Finish to give the final answer.\n"
        "Example:\nStep 1. Action: Search\nQuery: capital of Italy\n"
        "Observation: Rome is the capital of Italy.\nStep 2. Action: Finish\n"
        "Answer: The capital of Italy is Rome."
    )
    s += pl.user(question)
    for step in range(1, max_steps + 1):
        with s.assistant():
            s += f"Step {step}. Action: " + pl.select(
                f"action_{step}", ["Search", "Finish"], choices_method="greedy_token_selection"
            )
            if s[f"action_{step}"] == "Finish" or step == max_steps:
                s += "\nAnswer: " + pl.gen("answer", max_tokens=48, stop="\n")
                return
            s += "\nQuery: " + pl.gen(f"query_{step}", max_tokens=16, stop="\n")
        s += pl.user("Observation: " + search(s[f"query_{step}"]))


def main() -> None:
    pl.set_default_backend(pl.Engine(model="smollm2"))
    state = react.run(question="How tall is the Eiffel Tower?", temperature=0)
    for m in state.messages():
        print(f"[{m['role']}] {m['content']}")
    print("\nanswer:", state["answer"])


if __name__ == "__main__":
    main()
