"""The frontend DSL on a tiny random model: each primitive and run mode gives
exactly what the engine gives for the same rendered prompt, select picks the
argmax of its method's score computed by hand from the engine's logprobs, and
forks, batches and select reuse cached prefixes."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from pydantic import BaseModel

import plait as pl
from plait.choices import (
    greedy_token_selection,
    token_length_normalized,
    unconditional_likelihood_normalized,
)
from plait.lang.ir import REGEX_BOOL, REGEX_FLOAT, REGEX_INT, REGEX_STR
from plait.runtime.errors import RequestError

GREEDY = {"temperature": 0.0}


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    with pl.Engine(model=tiny_model_dir("llama"), max_total_tokens=8192) as eng:
        yield eng


@pytest.fixture(scope="module")
def backend(engine):
    return pl.EngineBackend(engine)


def greedy(engine, prompt: str, n: int, **params) -> dict:
    return engine.generate(prompt, {**GREEDY, "max_new_tokens": n, **params})


# ---- gen and roles ---------------------------------------------------------------------


@pl.function
def qa(s, question):
    s += pl.system("You answer briefly.")
    s += pl.user(question)
    s += pl.assistant(pl.gen("answer", max_tokens=12))


def test_gen_equals_the_engine_on_the_rendered_prompt(engine, backend):
    state = qa.run(question="What is the capital of France?", backend=backend, **GREEDY)
    messages = [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    prompt = engine.apply_chat_template(messages)
    # In an assistant turn gen also stops at the template's end-of-turn marker.
    expected = greedy(engine, prompt, 12, stop=["<|im_end|>"])
    assert state["answer"] == expected["text"]
    assert state.get_meta_info("answer")["completion_tokens"] == len(expected["output_ids"])


def test_text_is_the_models_template_of_the_messages(engine, backend):
    state = qa.run(question="Hello?", backend=backend, **GREEDY)
    assert state.text() == engine.tokenizer.apply_chat_template(state.messages(), tokenize=False)
    assert [m["role"] for m in state.messages()] == ["system", "user", "assistant"]
    assert state.messages()[2]["content"] == state["answer"]


def test_default_system_prompt_is_inserted_before_the_first_user_turn(engine, backend):
    @pl.function
    def chat(s):
        s += pl.user("Hi")
        with s.assistant():
            s += pl.gen("reply", max_tokens=4)

    state = chat.run(backend=backend, **GREEDY)
    messages = state.messages()
    assert messages[0] == {"role": "system", "content": "You are a helpful AI assistant."}
    assert state.text() == engine.tokenizer.apply_chat_template(messages, tokenize=False)


def test_role_blocks_begin_end_and_nesting_error(backend):
    @pl.function
    def turns(s):
        s += pl.user_begin() + "one" + pl.user_end()
        with s.assistant():
            s += "two"
        s += pl.user("three")

    assert [m["content"] for m in turns.run(backend=backend).messages()][1:] == [
        "one",
        "two",
        "three",
    ]

    @pl.function
    def nested(s):
        with s.user():
            s += pl.assistant("x")

    with pytest.raises(ValueError, match="roles do not nest"):
        nested.run(backend=backend)


def test_run_defaults_are_inherited_and_overridden_per_gen(engine, backend):
    @pl.function
    def two(s):
        s += "Numbers: 1, 2," + pl.gen("a") + "\nAgain:" + pl.gen("b", max_tokens=3)

    state = two.run(backend=backend, max_new_tokens=5, ignore_eos=True, **GREEDY)
    a_meta, b_meta = state.get_meta_info("a"), state.get_meta_info("b")
    assert a_meta["completion_tokens"] == 5 and b_meta["completion_tokens"] == 3
    expected_a = greedy(engine, "Numbers: 1, 2,", 5, ignore_eos=True)["text"]
    assert state["a"] == expected_a


def test_regex_dtype_and_pydantic_schema(backend):
    class Pet(BaseModel):
        kind: str
        legs: int

    @pl.function
    def typed(s):
        s += "Phone: " + pl.gen("phone", regex=r"[0-9]{3}-[0-9]{4}")
        s += "\nCount: " + pl.gen_int("count", max_tokens=6)
        s += "\nName: " + pl.gen_string("name", max_tokens=12)
        s += "\nFlag: " + pl.gen("flag", dtype=bool)
        s += "\nPet: " + pl.gen("pet", json_schema=Pet, max_tokens=40)

    state = typed.run(backend=backend, **GREEDY)
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", state["phone"])
    assert re.fullmatch(REGEX_INT, state["count"])
    assert state.parsed("count") == int(state["count"])
    assert state["flag"] in ("True", "False")
    assert state.parsed("flag") is (state["flag"] == "True")
    if state.get_meta_info("name")["finish_reason"]["type"] == "stop":
        assert re.fullmatch(REGEX_STR, state["name"])
        assert state.parsed("name") == state["name"][1:-1]
    pet_meta = state.get_meta_info("pet")
    if pet_meta["finish_reason"]["type"] == "stop":
        pet = state.parsed("pet")
        assert isinstance(pet, Pet) and json.loads(state["pet"])["legs"] == pet.legs


def test_pydantic_schema_gives_a_validated_object(backend):
    class Flag(BaseModel):
        ok: bool

    @pl.function
    def flag(s):
        s += "Answer: " + pl.gen("f", json_schema=Flag, max_tokens=16)

    state = flag.run(backend=backend, **GREEDY)
    assert state.parsed("f") == Flag.model_validate_json(state["f"])
    assert json.loads(state["f"]) == state.parsed("f").model_dump()


def test_bad_gen_arguments_fail_when_built():
    with pytest.raises(RequestError, match="temperature"):
        pl.gen("x", temperature=-1)
    with pytest.raises(RequestError, match="bad regex"):
        pl.gen("x", regex="((")
    with pytest.raises(RequestError, match="only one of"):
        pl.gen("x", regex="a", dtype=int)
    with pytest.raises(TypeError, match="first parameter must be named `s`"):
        pl.function(lambda state: None)


def test_n_samples_fill_the_first_and_keep_all(backend):
    @pl.function
    def many(s):
        s += "Hello" + pl.gen("x", n=3, max_tokens=4, temperature=1.0, seed=7)

    state = many.run(backend=backend)
    assert isinstance(state["x"], list) and len(state["x"]) == 3
    assert state.text() == "Hello" + state["x"][0]


def test_var_scope_captures_what_is_appended(backend):
    @pl.function
    def scoped(s):
        with s.var_scope("block"):
            s += "A=" + pl.gen("a", max_tokens=3, ignore_eos=True) + ";"
        s += " after"

    state = scoped.run(backend=backend, **GREEDY)
    assert state["block"] == "A=" + state["a"] + ";"


def test_errors_are_raised_in_the_caller(backend):
    @pl.function
    def broken(s):
        s += "x"
        raise ZeroDivisionError("in the program")

    with pytest.raises(ZeroDivisionError, match="in the program"):
        broken.run(backend=backend)

    @pl.function
    def picture(s):
        s += pl.user(pl.image(_png()) + "What is this?")

    with pytest.raises(RequestError, match="text-only") as err:
        picture.run(backend=backend)
    assert err.value.field == "image"
    assert err.value.value == backend.get_model_name()
    assert backend.get_model_name().startswith("tiny_llama")
    assert "/" not in str(err.value)  # the model's name, not a cache path


def test_image_sources_are_checked_when_built(tmp_path):
    path = tmp_path / "dot.png"
    path.write_bytes(_png())
    import base64

    a = pl.image(str(path)).source
    b = pl.image(base64.b64encode(_png()).decode()).source
    c = pl.image("data:image/png;base64," + base64.b64encode(_png()).decode()).source
    assert a.content_hash == b.content_hash == c.content_hash
    with pytest.raises(ValueError, match="no such file"):
        pl.image(str(tmp_path / "missing.png"))


def _png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


# ---- select ------------------------------------------------------------------------------

CHOICES = ["Paris", "London", "a city in the north"]


def hand_scores(engine, prefix: str, choices: list[str]) -> tuple[list[list[float]], list]:
    """Each choice's token logprobs, straight from the engine: the tokens of
    ``prefix + choice`` that ``prefix`` alone does not have (when the boundary
    merges, the merged token belongs to the choice)."""
    prefix_ids = engine.tokenizer.encode(prefix)
    out = []
    ids_out = []
    for c in choices:
        ids = engine.tokenizer.encode(prefix + c)
        n = 0
        while n < len(prefix_ids) and ids[n] == prefix_ids[n]:
            n += 1
        r = engine.generate(
            input_ids=ids,
            sampling_params={"max_new_tokens": 0},
            return_logprob=True,
            logprob_start_len=n,
        )
        out.append([lp for lp, _, _ in r["meta_info"]["input_token_logprobs"]])
        ids_out.append(ids[n:])
    return out, ids_out


@pytest.mark.parametrize(
    "method", [token_length_normalized, greedy_token_selection, unconditional_likelihood_normalized]
)
@pytest.mark.parametrize(
    "prefix", ["The capital of France is ", "The capital of France is:\n"], ids=["merge", "clean"]
)
def test_select_picks_the_argmax_of_the_methods_score(engine, backend, method, prefix):
    @pl.function
    def pick(s):
        s += prefix + pl.select("city", CHOICES, choices_method=method)

    state = pick.run(backend=backend)
    scores, ids = hand_scores(engine, prefix, CHOICES)
    unconditional = None
    if method.needs_unconditional:
        unconditional = []
        for toks in ids:
            r = engine.generate(
                input_ids=toks,
                sampling_params={"max_new_tokens": 0},
                return_logprob=True,
                logprob_start_len=0,
            )
            unconditional.append([lp or 0.0 for lp, _, _ in r["meta_info"]["input_token_logprobs"]])
    expected = CHOICES[method(scores, unconditional).index]
    assert state["city"] == expected
    assert state.text() == prefix + expected
    meta = state.get_meta_info("city")
    assert meta["normalized_prompt_logprobs"] == pytest.approx(
        [sum(x) / len(x) for x in scores], abs=1e-4
    )


def test_choice_methods_on_known_logprobs():
    """SGLang's example: the three methods disagree on these scores."""
    lps = [[-0.1, -2.0], [-0.1, -0.5, -0.6], [-0.9, -0.05, -0.05, -0.05, -0.05, -0.05]]
    assert token_length_normalized(lps).index == 2
    assert greedy_token_selection(lps).index == 1
    uncond = [[-0.1, -1.0], [-2.0, -2.0, -2.0], [-0.5, -0.1, -0.1, -0.1, -0.1, -0.1]]
    assert unconditional_likelihood_normalized(lps, uncond).index == 1


def test_gen_with_choices_is_select(backend):
    @pl.function
    def pick(s):
        s += "Yes or no? " + pl.gen("a", choices=["yes", "no"])

    assert pick.run(backend=backend)["a"] in ("yes", "no")


def test_select_reuses_the_cached_prefix(engine, backend):
    prefix = "An agent program asks a question, waits for an answer, and then asks " * 3

    @pl.function
    def pick(s):
        s += prefix + pl.select("x", ["yes", "no", "maybe"])

    engine.flush_cache()
    before = engine.get_stats()["cache_hit_tokens"]
    pick.run(backend=backend)
    n = len(engine.tokenizer.encode(prefix))
    # The three scoring requests each reuse all but a few tokens of the prefix.
    assert engine.get_stats()["cache_hit_tokens"] - before >= 3 * (n - 4)


# ---- fork / join -------------------------------------------------------------------------


def test_fork_branches_share_the_prefix_and_join_gathers(engine, backend):
    shared = "The runtime keeps the conversation in a tree of token runs. " * 3

    @pl.function
    def tips(s):
        s += shared
        forks = s.fork(3)
        forks += lambda i: f"Tip {i}:" + pl.gen("tip", max_tokens=5, ignore_eos=True)
        forks.join()

    engine.flush_cache()
    state = tips.run(backend=backend, **GREEDY)
    tips_out = state["tip"]
    assert isinstance(tips_out, list) and len(tips_out) == 3
    for i, t in enumerate(tips_out):
        assert t == greedy(engine, shared + f"Tip {i}:", 5, ignore_eos=True)["text"]
    n = len(engine.tokenizer.encode(shared))
    state2 = tips.run(backend=backend, **GREEDY)  # the branches' gens hit the cache
    assert state2["tip"] == tips_out

    @pl.function
    def branch_meta(s):
        s += shared
        forks = s.fork(2)
        forks += pl.gen("t", max_tokens=2)
        forks.join()
        s["cached"] = [f.get_meta_info("t")["cached_tokens"] for f in forks]

    engine.flush_cache()
    cached = branch_meta.run(backend=backend, **GREEDY)["cached"]
    assert all(c >= n - 2 for c in cached), (cached, n)


def test_join_concate_and_append(backend):
    @pl.function
    def parts(s):
        s += "Start."
        forks = s.fork(2)
        forks += [" one", " two"]
        forks.join("concate_and_append")
        s += " End."

    assert parts.run(backend=backend).text() == "Start. one two End."


# ---- run modes -------------------------------------------------------------------------


def test_run_batch_equals_single_runs_and_caches_the_traced_prefix(engine, backend):
    few_shot = "Q: What is two plus two?\nA: Two plus two is four.\n\n" * 3

    @pl.function
    def fs(s, question):
        s += few_shot + "Q: " + question + "\nA:" + pl.gen("answer", max_tokens=6)

    assert fs.trace(backend=backend) == few_shot + "Q: "
    questions = ["Yes or no?", "What is the capital?", "Hello, world!", "How are you today?"]
    engine.flush_cache()
    states = fs.run_batch([{"question": q} for q in questions], backend=backend, **GREEDY)
    singles = [fs.run(question=q, backend=backend, **GREEDY)["answer"] for q in questions]
    assert [s["answer"] for s in states] == singles
    assert all(s.get_meta_info("answer")["cached_tokens"] > 0 for s in states)


def test_run_batch_takes_tuples_and_keeps_errors_per_program(backend):
    @pl.function
    def maybe_fail(s, x):
        if x == 2:
            raise RuntimeError("two")
        s += f"{x}" + pl.gen("y", max_tokens=2)

    states = maybe_fail.run_batch([(1,), (2,), (3,)], backend=backend, progress_bar=True)
    assert states[0].error() is None and states[2].error() is None
    assert isinstance(states[1].error(), RuntimeError)
    with pytest.raises(RuntimeError, match="two"):
        states[1].text()


def test_bind_and_calling_a_program_inside_another(backend):
    @pl.function
    def greet(s, name, punct):
        s += f"Hello {name}{punct}"

    bound = greet.bind(punct="!")
    assert bound.run(name="Ada", backend=backend).text() == "Hello Ada!"

    @pl.function
    def outer(s):
        s += "> "
        bound(s, name="Bob")

    assert outer.run(backend=backend).text() == "> Hello Bob!"


def test_streaming_pieces_concatenate(engine, backend):
    state = qa.run(question="Tell me more.", backend=backend, stream=True, **GREEDY)
    pieces = list(state.text_iter())
    assert len(pieces) > 1
    assert "".join(pieces) == state.text()
    final = qa.run(question="Tell me more.", backend=backend, **GREEDY)
    assert state.text() == final.text()
    state = qa.run(question="Tell me more.", backend=backend, stream=True, **GREEDY)
    assert "".join(state.text_iter("answer")) == final["answer"]


def test_async_iteration(backend):
    async def collect():
        state = qa.run(question="Async?", backend=backend, stream=True, **GREEDY)
        return state, [p async for p in state.text_async_iter("answer")]

    state, pieces = asyncio.run(collect())
    assert "".join(pieces) == state["answer"]


def test_set_default_backend_accepts_an_engine(engine):
    pl.set_default_backend(engine)
    try:
        state = qa.run(question="Default?", **GREEDY)
        assert pl.get_default_backend().engine is engine
        assert state["answer"] == qa.run(question="Default?", backend=engine, **GREEDY)["answer"]
    finally:
        pl.set_default_backend(None)


# ---- SGLang parity -----------------------------------------------------------------------


def test_sglang_typed_regexes_are_exported_and_used_by_the_typed_gens():
    # The strings of sglang.lang.ir, importable from the same module path.
    assert REGEX_INT == r"[-+]?[0-9]+[ \n]*"
    assert REGEX_FLOAT == r"[-+]?[0-9]*\.?[0-9]+[ \n]*"
    assert REGEX_BOOL == r"(True|False)"
    assert REGEX_STR == r"\"[\w\d\s]*\""
    assert (pl.REGEX_INT, pl.REGEX_FLOAT, pl.REGEX_BOOL, pl.REGEX_STR) == (
        REGEX_INT,
        REGEX_FLOAT,
        REGEX_BOOL,
        REGEX_STR,
    )
    for number, regex in ((pl.gen_int("n"), REGEX_INT), (pl.gen_float("x"), REGEX_FLOAT)):
        assert number.params["regex"].startswith(regex)
        assert number.params["stop"] == [" ", "\n"]  # SGLang's stops after a number
    assert pl.gen_string("t").params["regex"] == REGEX_STR
    assert pl.gen("b", dtype=bool).params["regex"] == REGEX_BOOL
    assert pl.gen("b", dtype="str").params["regex"] == REGEX_STR


def test_import_plait_does_not_import_torch():
    code = "import sys, plait; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


class RecordingBackend(pl.Backend):
    """Answers every gen with "ok" and records what it was asked."""

    def __init__(self):
        self.requests: list[tuple] = []

    def generate(self, text, sampling_params, **options):
        self.requests.append((text, dict(sampling_params)))
        meta = {"finish_reason": {"type": "stop"}, "prompt_tokens": 1, "completion_tokens": 1}
        return {"text": "ok", "output_ids": [1], "meta_info": meta}

    def generate_stream(self, text, sampling_params, **options):
        yield self.generate(text, sampling_params, **options)


@pl.function
def greet(s, name):
    s += "A long constant preamble that every run of this program starts with. " * 2
    s += "Hello " + name + ": " + pl.gen("reply", max_tokens=4)


def test_global_config_has_sglangs_fields_and_refuses_others():
    from plait.lang.global_config import global_config

    config = pl.global_config
    assert config is global_config
    assert (config.verbosity, config.default_backend) == (0, None)
    assert config.skip_special_tokens_in_output and config.spaces_between_special_tokens_in_out
    assert config.enable_precache_with_tracing and config.enable_parallel_encoding
    with pytest.raises(AttributeError):
        config.verbositty = 2


def test_global_config_default_backend_is_the_default_backend():
    backend = RecordingBackend()
    pl.global_config.default_backend = backend
    try:
        assert pl.get_default_backend() is backend
        assert greet.run(name="Ann")["reply"] == "ok"
        assert backend.requests
    finally:
        pl.global_config.default_backend = None
    assert pl.global_config.default_backend is None


def test_global_config_detokenizing_settings_reach_every_gen(monkeypatch):
    backend = RecordingBackend()
    greet.run(name="Ann", backend=backend)
    assert "skip_special_tokens" not in backend.requests[-1][1]  # the runtime's default
    monkeypatch.setattr(pl.global_config, "skip_special_tokens_in_output", False)
    monkeypatch.setattr(pl.global_config, "spaces_between_special_tokens_in_out", False)
    greet.run(name="Ann", backend=backend)
    params = backend.requests[-1][1]
    assert params["skip_special_tokens"] is False
    assert params["spaces_between_special_tokens"] is False
    assert params["max_new_tokens"] == 4


def test_global_config_precache_with_tracing_switches_the_batch_prefix_request(monkeypatch):
    backend = RecordingBackend()
    greet.run_batch([{"name": "Ann"}, {"name": "Bob"}], backend=backend)
    prefills = [r for r in backend.requests if r[1] == {"max_new_tokens": 0}]
    assert [text for text, _ in prefills] == [greet.trace(backend=backend)]
    monkeypatch.setattr(pl.global_config, "enable_precache_with_tracing", False)
    backend.requests.clear()
    greet.run_batch([{"name": "Ann"}, {"name": "Bob"}], backend=backend)
    assert not [r for r in backend.requests if r[1] == {"max_new_tokens": 0}]
    assert len(backend.requests) == 2


def test_global_config_verbosity_2_prints_each_final_text(monkeypatch, capsys):
    monkeypatch.setattr(pl.global_config, "verbosity", 2)
    state = greet.run(name="Ann", backend=RecordingBackend())
    assert capsys.readouterr().out == state.text() + "\n"


def test_function_takes_num_api_spec_tokens(backend):
    @pl.function(num_api_spec_tokens=64)
    def answer(s, question):
        qa(s, question)

    assert answer.num_api_spec_tokens == 64
    assert answer.bind(question="Hi?").num_api_spec_tokens == 64
    expected = qa.run(question="Hi?", backend=backend, **GREEDY)["answer"]
    # The same requests: plait's backends continue any text, so nothing is speculated.
    assert answer.run(question="Hi?", backend=backend, **GREEDY)["answer"] == expected
    assert pl.function()(qa.func).num_api_spec_tokens is None
    with pytest.raises(ValueError, match="num_api_spec_tokens"):
        pl.function(num_api_spec_tokens=0)(qa.func)


def test_appending_to_one_fork_with_index(engine, backend):
    @pl.function
    def two(s):
        s += "Items:"
        forks = s.fork(2)
        forks[0] += " apples" + pl.gen("x", max_tokens=3, ignore_eos=True)
        forks[1] += " pears" + pl.gen("x", max_tokens=3, ignore_eos=True)
        forks.join()

    state = two.run(backend=backend, **GREEDY)
    assert state["x"] == [
        greedy(engine, "Items: apples", 3, ignore_eos=True)["text"],
        greedy(engine, "Items: pears", 3, ignore_eos=True)["text"],
    ]


def test_a_fork_cannot_be_replaced(backend):
    @pl.function
    def swap(s):
        forks = s.fork(2)
        forks[0] = forks[1]

    with pytest.raises(TypeError, match="cannot be replaced"):
        swap.run(backend=backend)


def test_every_backend_has_get_model_name(backend):
    assert backend.get_model_name() == backend.model_name
    assert RecordingBackend().get_model_name() == "model"


def test_async_iteration_with_meta_data_gives_each_pieces_own_logprobs(backend):
    @pl.function
    def scored(s):
        s += pl.user("Count to five.")
        s += pl.assistant(pl.gen("answer", max_tokens=10, return_logprob=True, ignore_eos=True))

    async def collect():
        state = scored.run(backend=backend, stream=True, **GREEDY)
        items = [item async for item in state.text_async_iter("answer", return_meta_data=True)]
        return state, items

    state, items = asyncio.run(collect())
    assert len(items) > 1 and all(isinstance(i, tuple) and len(i) == 2 for i in items)
    assert "".join(text for text, _ in items) == state["answer"]
    assert items[-1][1]["finish_reason"]["type"] == "length"
    # Each piece carries the logprobs of its own tokens; together they are the whole
    # request's, as one non-streaming run gives them.
    streamed = [lp for _, meta in items for lp in meta["output_token_logprobs"]]
    assert state.get_meta_info("answer")["output_token_logprobs"] == streamed
    whole = scored.run(backend=backend, **GREEDY).get_meta_info("answer")
    assert [t for _, t, _ in streamed] == [t for _, t, _ in whole["output_token_logprobs"]]
    assert [lp for lp, _, _ in streamed] == pytest.approx(
        [lp for lp, _, _ in whole["output_token_logprobs"]], abs=1e-4
    )


_STREAMING_CHILD = """
    import atexit, faulthandler, signal, sys, threading

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test's view if it hangs

    def report():  # registered first, so it runs after plait's own exit handlers
        alive = [t.name for t in threading.enumerate() if t.name == "plait-engine"]
        print("engine threads at exit:", alive, file=sys.stderr, flush=True)

    atexit.register(report)

    import plait as pl

    @pl.function
    def talk(s):
        s += pl.user("Tell me a long story.")
        s += pl.assistant(pl.gen("story", max_tokens=400, ignore_eos=True))

    engine = pl.Engine(model=sys.argv[1], max_total_tokens=2048)
    while True:
        state = talk.run(backend=engine, stream=True, temperature=0)
        for i, piece in enumerate(state.text_iter()):
            if i == 20:
                print("streaming", flush=True)
"""


def test_ctrl_c_while_streaming_raises_keyboard_interrupt_and_stops_the_engine(
    tiny_model_dir, tmp_path
):
    """Ctrl-C in ``for piece in state.text_iter()`` used to end Python with "terminate
    called without an active exception" (SIGABRT): the engine's loop thread was still
    inside a torch op while the interpreter exited."""
    script = tmp_path / "stream.py"
    script.write_text(textwrap.dedent(_STREAMING_CHILD))
    proc = subprocess.Popen(
        [sys.executable, str(script), tiny_model_dir("llama")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline() == "streaming\n"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # say where every thread of the child stands
        proc.send_signal(signal.SIGUSR1)
        time.sleep(2)
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"no exit 120 s after Ctrl-C; {out.count('streaming')} more runs; {err}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert "terminate called" not in err
    assert proc.returncode == -signal.SIGINT, err  # Python's exit for an unhandled Ctrl-C
    assert err.rstrip().splitlines()[-2] == "KeyboardInterrupt", err
    assert "engine threads at exit: []" in err
