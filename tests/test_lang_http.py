"""DSL programs through ``RuntimeEndpoint`` against a real plait server give what
they give on the in-process engine, and select / fork reuse the server's cache."""

from __future__ import annotations

import dataclasses
import re

import pytest
from http_server import running_server

import plait as pl
from plait.runtime.server import create_app

GREEDY = {"temperature": 0.0}


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    """(engine, RuntimeEndpoint) over one engine: the shutdown hook of the app stops
    the engine when the server ends."""
    engine = pl.Engine(model=tiny_model_dir("llama"), max_total_tokens=8192)
    with running_server(create_app(engine)) as url:
        yield engine, pl.RuntimeEndpoint(url)


@pl.function
def qa(s, question):
    s += pl.system("You answer briefly.")
    s += pl.user(question)
    s += pl.assistant(pl.gen("answer", max_tokens=10))


@pl.function
def pick(s):
    s += "The capital of France is " + pl.select("city", ["Paris", "London", "Rome"])
    s += ". Also " + pl.select(
        "other", ["yes", "no"], choices_method=pl.unconditional_likelihood_normalized
    )


@pl.function
def branches(s):
    s += "The runtime keeps the conversation in a tree of token runs. " * 3
    forks = s.fork(2)
    forks += lambda i: f"Idea {i}:" + pl.gen("idea", max_tokens=4, ignore_eos=True)
    forks.join()


@pl.function
def phone(s):
    s += "Call me at " + pl.gen("number", regex=r"[0-9]{3}-[0-9]{4}")


def test_endpoint_takes_the_chat_template_from_the_server(served):
    engine, endpoint = served
    served_name = endpoint.model_info["served_model_name"]
    assert endpoint.chat_template == dataclasses.replace(engine.chat_template, name=served_name)
    # The server's name for its model, never the path of its weights.
    assert endpoint.get_model_name() == endpoint.model_info["served_model_name"]
    assert str(engine.source.model_path) not in endpoint.get_model_name()


@pytest.mark.parametrize("program", [qa, pick, branches, phone], ids=lambda f: f.__name__)
def test_same_greedy_result_on_the_engine_and_over_http(served, program):
    engine, endpoint = served
    args = {"question": "What is two plus two?"} if program is qa else {}
    local = program.run(backend=engine, **GREEDY, **args)
    remote = program.run(backend=endpoint, **GREEDY, **args)
    assert remote.text() == local.text()
    assert remote.messages() == local.messages()


def test_regex_output_over_http(served):
    _, endpoint = served
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", phone.run(backend=endpoint)["number"])


def test_fork_branches_hit_the_servers_cache(served):
    engine, endpoint = served

    @pl.function
    def meta(s):
        s += "An agent program asks a question and waits for an answer. " * 3
        forks = s.fork(2)
        forks += pl.gen("x", max_tokens=2)
        forks.join()
        s["cached"] = [f.get_meta_info("x")["cached_tokens"] for f in forks]

    engine.flush_cache()
    state = meta.run(backend=endpoint, **GREEDY)
    n = len(engine.tokenizer.encode(state.text()))
    assert all(c >= n - 4 for c in state["cached"]), state["cached"]


def test_run_batch_and_streaming_over_http(served):
    _, endpoint = served
    questions = ["Hello?", "Yes or no?", "What is the capital?"]
    states = qa.run_batch([{"question": q} for q in questions], backend=endpoint, **GREEDY)
    singles = [qa.run(question=q, backend=endpoint, **GREEDY)["answer"] for q in questions]
    assert [s["answer"] for s in states] == singles
    stream = qa.run(question="Hello?", backend=endpoint, stream=True, **GREEDY)
    assert "".join(stream.text_iter("answer")) == singles[0]


def test_a_server_error_reaches_the_program(served):
    _, endpoint = served

    @pl.function
    def bad(s):
        s += "x" + pl.gen("y", json_schema={"type": "object", "properties": 5})

    with pytest.raises(pl.BackendError) as info:
        bad.run(backend=endpoint)
    assert info.value.status == 400
