"""``pl.image`` in programs on the tiny Idefics3: several images a turn, images in
earlier turns staying in the prompt, ``fork``, ``select`` and ``run_batch``, every
kind of source; each program's prompt is what the model's chat template renders for
the same messages, and each generation equals ``Engine.generate`` on that prompt and
its images (the engine is checked against transformers in test_vlm_idefics3.py).
``RuntimeEndpoint`` against a real server sends the images as base64 and gives the
same results; SGLang's own frontend runs an image program against it unmodified."""

from __future__ import annotations

import base64
import json
import subprocess
import sys

import pytest
from http_server import running_server
from pictures import SQUARE, TALL, WIDE, b64, picture_server, png

import plait as pl
from plait.runtime.errors import RequestError
from plait.runtime.server import ServerConfig, create_app

N = 8  # new tokens per gen


ANSWER = {"max_tokens": N, "ignore_eos": True, "return_logprob": True}


@pytest.fixture(scope="module")
def engine(idefics3_dir):
    with pl.Engine(model=idefics3_dir, max_total_tokens=4096, max_running_requests=16) as eng:
        yield eng


@pytest.fixture(scope="module")
def endpoint(engine):
    """A RuntimeEndpoint on a real server over the same engine (its shutdown hook stops
    the engine when the module ends)."""
    with running_server(create_app(engine, ServerConfig(served_model_name="tiny-vlm"))) as url:
        yield pl.RuntimeEndpoint(url)


def output_ids(state, name: str) -> list[int]:
    return [t for _, t, _ in state.get_meta_info(name)["output_token_logprobs"]]


def engine_ids(engine, prompt: str, images: list) -> list[int]:
    """The engine's greedy ids for ``prompt`` and ``images``, with the stop a gen in an
    assistant turn gets."""
    params = {"temperature": 0, "max_new_tokens": N, "ignore_eos": True}
    params["stop"] = list(engine.chat_template.stop_str)
    return engine.generate(prompt, params, image_data=images)["output_ids"]


def text_before(state, name: str, cue: str) -> str:
    """The program's text up to the value of variable ``name``, which follows ``cue``."""
    text = state.text()
    end = text.index(cue) + len(cue)
    assert text[end:].startswith(state[name])
    return text[:end]


CUE = "<end_of_utterance>\nAssistant:"


@pl.function
def compare(s, first, second):
    s += pl.user(pl.image(first) + pl.image(second) + "Which is taller?")
    s += pl.assistant(pl.gen("answer", **ANSWER))


def test_two_images_in_a_turn_render_as_the_template_and_equal_the_engine(engine):
    state = compare.run(first=TALL, second=SQUARE, backend=engine, temperature=0)
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Which is taller?"}]
    prompt = engine.apply_chat_template([{"role": "user", "content": content}])
    assert prompt == "<|im_start|>User:<image><image>Which is taller?<end_of_utterance>\nAssistant:"
    assert state.text() == prompt + state["answer"] + "<end_of_utterance>\n"
    assert output_ids(state, "answer") == engine_ids(engine, prompt, [TALL, SQUARE])
    user = state.messages()[0]
    assert user["role"] == "user"
    assert [p["type"] for p in user["content"]] == ["image_url", "image_url", "text"]
    assert user["content"][2]["text"] == "Which is taller?"


@pl.function
def two_turns(s, first, second):
    s += pl.user("Look at" + pl.image(first))
    s += pl.assistant(pl.gen("one", **ANSWER))
    s += pl.user("And now" + pl.image(second) + "?")
    s += pl.assistant(pl.gen("two", **ANSWER))


def test_earlier_turns_images_stay_in_the_prompt(engine):
    state = two_turns.run(first=WIDE, second=TALL, backend=engine, temperature=0)
    first = "<|im_start|>User: Look at<image><end_of_utterance>\nAssistant:"
    assert state.text().startswith(first + state["one"])
    assert output_ids(state, "one") == engine_ids(engine, first, [WIDE])
    second = text_before(state, "two", "now<image>?" + CUE)
    assert second.count("<image>") == 2 and second.endswith(
        "And now<image>?<end_of_utterance>\nAssistant:"
    )
    assert output_ids(state, "two") == engine_ids(engine, second, [WIDE, TALL])


@pl.function
def images_in_every_role(s, a, b, c):
    s += pl.system(pl.image(a) + "You describe pictures.")
    s += pl.user("This one:" + pl.image(b))
    s += pl.assistant(pl.image(c) + "Like this" + pl.gen("answer", **ANSWER))


def test_images_in_any_role(engine):
    state = images_in_every_role.run(a=SQUARE, b=WIDE, c=TALL, backend=engine, temperature=0)
    prompt = text_before(state, "answer", "Like this")
    assert prompt.startswith("<|im_start|>System:<image>You describe pictures.")
    assert output_ids(state, "answer") == engine_ids(engine, prompt, [SQUARE, WIDE, TALL])


@pl.function
def opened_by_itself(s, image):
    with s.user():
        s += pl.image(image)
        s += "What is it?"
    s += pl.assistant(pl.gen("answer", **ANSWER))


def test_a_turn_opened_on_its_own_then_an_image_renders_as_the_template(engine):
    state = opened_by_itself.run(image=WIDE, backend=engine, temperature=0)
    content = [{"type": "image"}, {"type": "text", "text": "What is it?"}]
    prompt = engine.apply_chat_template([{"role": "user", "content": content}])
    assert text_before(state, "answer", CUE) == prompt
    assert output_ids(state, "answer") == engine_ids(engine, prompt, [WIDE])


def test_streaming_a_program_with_images(engine):
    state = compare.run(first=TALL, second=SQUARE, backend=engine, temperature=0, stream=True)
    streamed = "".join(state.text_iter())
    assert streamed == state.text()
    assert streamed.startswith("<|im_start|>User:<image><image>Which is taller?")
    prompt = text_before(state, "answer", "taller?" + CUE)
    assert output_ids(state, "answer") == engine_ids(engine, prompt, [TALL, SQUARE])


@pl.function
def branches(s, image):
    s += pl.user(pl.image(image) + "Describe it.")
    forks = s.fork(2)
    forks += lambda i: pl.assistant(("Briefly:", "In detail:")[i] + pl.gen("view", **ANSWER))
    forks += lambda i: pl.user(pl.image(SQUARE) + f"Compare {i}.")
    forks += lambda i: pl.assistant(pl.gen("again", **ANSWER))
    s["branches"] = [f.text() for f in forks]
    cues = [("Briefly:", f"Compare 0.{CUE}"), ("In detail:", f"Compare 1.{CUE}")]
    s["views"] = [
        (text_before(f, "view", c[0]), output_ids(f, "view")) for f, c in zip(forks, cues)
    ]
    s["agains"] = [
        (text_before(f, "again", c[1]), output_ids(f, "again")) for f, c in zip(forks, cues)
    ]
    s["cached"] = [f.get_meta_info("view")["cached_tokens"] for f in forks]


def test_fork_branches_carry_the_image_and_their_own(engine):
    engine.flush_cache()
    state = branches.run(image=WIDE, backend=engine, temperature=0)
    # Each branch starts from the prefix the fork cached, its image included.
    parent = "<|im_start|>User:<image>Describe it.<end_of_utterance>\n"
    shared = engine.generate(parent, {"max_new_tokens": 0}, image_data=WIDE)
    assert min(state["cached"]) >= shared["meta_info"]["prompt_tokens"] - 1
    for prompt, ids in state["views"]:
        assert prompt.count("<image>") == 1
        assert ids == engine_ids(engine, prompt, [WIDE])
    for prompt, ids in state["agains"]:
        assert prompt.count("<image>") == 2
        assert ids == engine_ids(engine, prompt, [WIDE, SQUARE])


@pl.function
def pick(s, image):
    s += pl.user(pl.image(image) + "Is it wide or tall?")
    s += pl.assistant(pl.select("shape", ["wide", "tall", "square"]))


def test_select_scores_the_choices_after_the_image(engine):
    state = pick.run(image=WIDE, backend=engine, temperature=0)
    prefix = text_before(state, "shape", "tall?" + CUE)
    entries = state.get_meta_info("shape")["input_token_logprobs"]
    for choice, mine in zip(["wide", "tall", "square"], entries, strict=True):
        out = engine.generate(
            prefix + choice,
            {"max_new_tokens": 0},
            return_logprob=True,
            logprob_start_len=0,
            image_data=[WIDE],
        )
        tail = out["meta_info"]["input_token_logprobs"][-len(mine) :]
        assert [t for _, t, _ in mine] == [t for _, t in ((lp, t) for lp, t, _ in tail)]
        assert [lp for lp, _, _ in mine] == pytest.approx([lp for lp, _, _ in tail], abs=1e-5)


def test_run_batch_gives_each_program_its_images(engine):
    states = compare.run_batch(
        [{"first": TALL, "second": SQUARE}, {"first": WIDE, "second": TALL}],
        backend=engine,
        temperature=0,
    )
    for state, images in zip(states, [[TALL, SQUARE], [WIDE, TALL]], strict=True):
        prompt = text_before(state, "answer", "taller?" + CUE)
        assert output_ids(state, "answer") == engine_ids(engine, prompt, images)


def test_every_kind_of_source_is_the_same_image(tmp_path, no_proxy):
    path = tmp_path / "wide.png"
    WIDE.save(path)
    encoded = b64(png(WIDE))
    with picture_server({"/wide.png": png(WIDE)}) as base:
        url = f"{base}/wide.png"
        sources = [
            WIDE,
            png(WIDE),
            str(path),
            path,
            encoded,
            "data:image/png;base64," + encoded,
            url,
        ]
        hashes = {pl.image(source).source.content_hash for source in sources}
    assert len(hashes) == 1
    with pytest.raises(ValueError, match="not a readable image"):
        pl.image(b"not an image")


def test_an_image_on_a_text_model_is_refused(tiny_model_dir):
    with pl.Engine(model=tiny_model_dir("llama"), max_total_tokens=256) as eng:
        with pytest.raises(RequestError, match="text-only") as err:
            compare.run(first=WIDE, second=TALL, backend=eng)
        assert err.value.field == "image" and err.value.value == eng.model_name


# ---- over HTTP ---------------------------------------------------------------------------------


def test_the_endpoint_knows_the_model_takes_images(endpoint, engine):
    assert endpoint.supports_images
    assert endpoint.chat_template.image_first_prefix == engine.chat_template.image_first_prefix


@pytest.mark.parametrize("program", [compare, two_turns, pick], ids=lambda f: f.__name__)
def test_same_results_over_http(engine, endpoint, program):
    args = {"image": WIDE} if program is pick else {"first": TALL, "second": SQUARE}
    local = program.run(backend=engine, temperature=0, **args)
    remote = program.run(backend=endpoint, temperature=0, **args)
    assert remote.text() == local.text()
    assert remote.messages() == local.messages()


def test_the_endpoint_sends_images_as_base64(endpoint, monkeypatch):
    sent = []
    original = endpoint._request

    def spy(method, path, body=None, raw=False):
        sent.append(body)
        return original(method, path, body, raw)

    monkeypatch.setattr(endpoint, "_request", spy)
    compare.run(first=TALL, second=SQUARE, backend=endpoint, temperature=0)
    images = sent[-1]["image_data"]
    assert len(images) == 2
    assert base64.b64decode(images[0]) == png(TALL)  # a PNG keeps the pixels


# SGLang's frontend, in a process of its own (importing sglang patches transformers). Its
# RuntimeEndpoint sends one image per request as base64 image_data (it refuses more).
SGLANG_PROGRAM = """
import json, sys
import sglang as sgl

@sgl.function
def describe(s, path):
    s += sgl.user(sgl.image(path) + "What is in the picture?")
    s += sgl.assistant(sgl.gen("answer", max_tokens=8, temperature=0, ignore_eos=True))

sgl.set_default_backend(sgl.RuntimeEndpoint(sys.argv[1]))
state = describe.run(path=sys.argv[2])
print(json.dumps({"text": state.text(), "answer": state["answer"]}))
"""


def test_sglangs_frontend_runs_an_image_program(endpoint, engine, tmp_path):
    path = tmp_path / "wide.png"
    WIDE.save(path)
    cmd = [sys.executable, "-c", SGLANG_PROGRAM, endpoint.base_url, str(path)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    prompt = out["text"][: out["text"].rindex(out["answer"])]
    assert prompt.count("<image>") == 1  # SGLang's default template writes "<image>"
    params = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}
    assert out["answer"] == engine.generate(prompt, params, image_data=WIDE)["text"]
