"""Programs in the style of SGLang's frontend tests, on the real default model
and the zero-configuration path: with no backend set, the first run starts the
embedded engine with the default model."""

from __future__ import annotations

import json
import re

import pytest

import plait as pl

pytestmark = pytest.mark.default_model


@pytest.fixture(scope="module", autouse=True)
def default_backend(default_model_source):
    pl.set_default_backend(None)
    yield
    backend = pl.get_default_backend()
    pl.set_default_backend(None)
    backend.shutdown()


def test_zero_configuration_starts_the_default_model():
    @pl.function
    def hello(s):
        s += pl.user("Say hello.")
        s += pl.assistant(pl.gen("reply", max_tokens=16))

    state = hello.run(temperature=0)
    backend = pl.get_default_backend()
    assert isinstance(backend, pl.EngineBackend)
    assert backend.engine.model_config.architecture == "LlamaForCausalLM"
    assert state["reply"]
    # The DSL renders exactly what the model's chat template renders.
    tok = backend.engine.tokenizer
    assert state.text() == tok.apply_chat_template(state.messages(), tokenize=False)


def test_few_shot_qa_and_run_batch():
    @pl.function
    def few_shot_qa(s, question):
        s += "The following are questions with answers.\n\n"
        s += "Q: What is the capital of France?\nA: Paris\n\n"
        s += "Q: What is the capital of Germany?\nA: Berlin\n\n"
        s += "Q: What is the capital of Italy?\nA: Rome\n\n"
        s += "Q: " + question + "\nA:" + pl.gen("answer", stop="\n", temperature=0)

    state = few_shot_qa.run(question="What is the capital of Spain?")
    assert state["answer"].strip() == "Madrid"
    questions = ["Japan", "the United Kingdom", "China"]
    states = few_shot_qa.run_batch(
        [{"question": f"What is the capital of {c}?"} for c in questions], temperature=0.1
    )
    assert [s["answer"].strip().lower() for s in states] == ["tokyo", "london", "beijing"]
    assert all(s.get_meta_info("answer")["cached_tokens"] > 40 for s in states)


def test_multi_turn_with_roles_and_stop():
    @pl.function
    def mt(s, q1, q2):
        s += pl.system("You are a helpful assistant.")
        s += pl.user(q1)
        s += pl.assistant(pl.gen("answer_1", stop="."))
        with s.user():
            s += q2
        with s.assistant():
            s += pl.gen("answer_2", max_tokens=64)

    state = mt.run(
        q1="Name a fruit.", q2="What colour is it?", temperature=0.7, seed=1, max_new_tokens=64
    )
    assert len(state.messages()) == 5
    assert "." not in state["answer_1"]
    assert state["answer_2"]


def test_select_and_python_branching():
    @pl.function
    def classify(s, statement):
        s += pl.user(f"Is this statement true or false? {statement}")
        s += pl.assistant(pl.select("verdict", ["True", "False"]))
        if s["verdict"] == "True":
            s += pl.user("Explain why in one sentence.")
        else:
            s += pl.user("Correct it in one sentence.")
        s += pl.assistant(pl.gen("why", max_tokens=32, temperature=0))

    state = classify.run(statement="Paris is the capital of France.")
    assert state["verdict"] in ("True", "False")
    follow_up = state.messages()[-2]["content"]
    assert follow_up.startswith("Explain" if state["verdict"] == "True" else "Correct")


def test_typed_and_regex_generation_parse():
    ipv4 = r"((25[0-5]|2[0-4][0-9]|[01]?[0-9][0-9]?)\.){3}(25[0-5]|2[0-4][0-9]|[01]?[0-9][0-9]?)"

    @pl.function
    def typed(s):
        s += "The number of hours in a day is " + pl.gen_int("hours") + "\n"
        s += "The number of days in a year is " + pl.gen_int("days") + "\n"
        s += "The IP address of the local machine is " + pl.gen("ip", regex=ipv4) + "\n"
        s += "A JSON object describing the city of Paris:\n"
        with s.var_scope("json_output"):
            s += '{\n  "name": ' + pl.gen_string("name", max_tokens=32) + ",\n"
            s += '  "population": ' + pl.gen_int("population", max_tokens=12) + "\n}"

    state = typed.run(temperature=0)
    assert state.parsed("hours") == 24
    assert state.parsed("days") == 365
    assert re.fullmatch(ipv4, state["ip"])
    doc = json.loads(state["json_output"])
    assert isinstance(doc["name"], str) and isinstance(doc["population"], int)


def test_fork_join_parallel_tips():
    @pl.function
    def tips(s):
        s += pl.user("Give two tips for staying healthy.")
        with s.assistant():
            s += "1." + pl.gen("tip_1", max_tokens=16, stop="\n") + "\n"
            s += "2." + pl.gen("tip_2", max_tokens=16, stop="\n") + "\n"
        forks = s.fork(2)
        for i, f in enumerate(forks, start=1):
            f += pl.user(f"Expand tip {i}.")
            f += pl.assistant(pl.gen("detail", max_tokens=24))
        forks.join()
        s["detail_cached"] = [f.get_meta_info("detail")["cached_tokens"] for f in forks]

    state = tips.run(temperature=0)
    assert len(state["detail"]) == 2 and all(state["detail"])
    n_shared = len(pl.get_default_backend().engine.tokenizer.encode(state.text()))
    assert all(c >= n_shared - 2 for c in state["detail_cached"]), state["detail_cached"]


def test_streaming_pieces_concatenate_to_the_final_text():
    @pl.function
    def story(s):
        s += pl.user("Tell me a short story about a cat.")
        s += pl.assistant(pl.gen("story", max_tokens=48))

    state = story.run(stream=True, temperature=0)
    pieces = list(state.text_iter("story"))
    assert len(pieces) > 1
    assert "".join(pieces) == state["story"]
    assert state["story"] == story.run(temperature=0)["story"]


def test_min_tokens_is_honoured():
    @pl.function
    def long_answer(s):
        s += pl.user("Say hi.")
        s += pl.assistant(pl.gen("answer", min_tokens=64, max_tokens=128))

    state = long_answer.run(temperature=0)
    assert state.get_meta_info("answer")["completion_tokens"] >= 64


def test_the_readmes_language_example_gives_what_the_readme_shows():
    from pydantic import BaseModel

    class Place(BaseModel):
        city: str
        country: str

    @pl.function
    def agent(s, question):
        s += pl.user(question)
        s += pl.assistant(pl.gen("answer", max_tokens=64))
        s += pl.user("Is that a city? Then give it as JSON.")
        s += pl.assistant(pl.select("is_city", ["yes", "no"]))
        if s["is_city"] == "yes":
            s += pl.assistant(pl.gen("place", json_schema=Place))

    state = agent.run(question="What is the capital of France?", temperature=0)
    assert state["answer"] == "The capital of France is Paris."
    assert state["is_city"] == "yes"
    assert state.parsed("place") == Place(city="Paris", country="FRANCE")
