"""``pl.gen_image``: a program draws with a real (tiny, random) diffusers pipeline, through
plait's diffusers backend (``DiffusersGenerator``).

With a prompt, the image is the pipeline's own output for that prompt and seed.
Without, the model writes ``{"prompt", "negative_prompt"}`` in a side request that
starts with the conversation (served from the prefix cache) and stays out of the
program's text; the image joins the state as an image of the current role, so on
the tiny Idefics3 a following ``gen`` sees it. Fork branches each draw, run_batch
draws per run, and the generator is chosen per call, per run or by default.
"""

from __future__ import annotations

import base64
import io
import json
import threading

import jsonschema
import numpy as np
import pytest
from http_server import running_server
from pictures import SQUARE
from PIL import Image
from tiny_models import make_tiny_sd

import plait as pl
from plait.drawing import PROMPT_INSTRUCTION, PROMPT_SCHEMA, prompt_request_text
from plait.multimodal.diffusers_backend import DiffusersGenerator
from plait.multimodal.generation import GenerationCancelled, ImageGenerationError
from plait.runtime.errors import RequestError
from plait.runtime.server import ServerConfig, create_app

STEPS = 2
SIDE = 32  # pixels: the tiny pipeline's default image (tiny_models.make_tiny_sd)


# ---- a tiny random StableDiffusionPipeline ----------------------------------------------


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory) -> str:
    return make_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="module")
def pipeline(sd_dir):
    """The tiny pipeline, loaded back from its directory as diffusers loads any."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(sd_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_image(pipe, prompt: str, seed: int, negative_prompt: str | None = None):
    """The pipeline's own output: a plain diffusers call."""
    import torch

    return pipe(
        prompt,
        negative_prompt=negative_prompt,
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(seed),
    ).images[0]


@pytest.fixture(scope="module")
def generator(sd_dir):
    """plait's diffusers backend on the same directory (what ``plait serve --image-model``
    and examples/image_chat.py use), one request per pipeline call: concurrent drawings
    (fork branches, run_batch) then each equal their own plain call bit for bit (batched
    calls differ by kernel rounding; tests/test_diffusers_backend.py covers them)."""
    with DiffusersGenerator(sd_dir, name="tiny-sd", device="cpu", max_batch_images=1) as gen:
        yield gen


@pytest.fixture(autouse=True)
def no_default_generator():
    yield
    pl.set_default_generator(None)


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def same_picture(a, b) -> bool:
    return a.size == b.size and np.array_equal(pixels(a), pixels(b))


def decoded(part: dict) -> Image.Image:
    url = part["image_url"]["url"]
    return Image.open(io.BytesIO(base64.b64decode(url.partition(",")[2])))


# ---- programs ---------------------------------------------------------------------------


@pl.function
def draw_given(s):
    s += pl.user("Draw me a cat.")
    s += pl.assistant(pl.gen_image("pic", "a red cat on a blue chair", seed=3, steps=STEPS))


def test_with_a_prompt_the_image_is_the_pipelines_own(engine, generator, pipeline):
    state = draw_given.run(backend=engine, generator=generator)
    assert same_picture(state["pic"], pipeline_image(pipeline, "a red cat on a blue chair", 3))
    assert state["pic_prompt"] == "a red cat on a blue chair"
    assert state.get_meta_info("pic_prompt") is None  # the model wrote nothing
    assert state.get_meta_info("pic")["seed"] == 3
    # A text-only model: the image is in the messages, not in the prompt text.
    assert "<image>" not in state.text()
    turn = state.messages()[-1]
    assert turn["role"] == "assistant" and [p["type"] for p in turn["content"]] == ["image_url"]
    assert same_picture(decoded(turn["content"][0]), state["pic"])


def test_size_negative_prompt_and_guidance_reach_the_pipeline(engine, generator, pipeline):
    import torch

    @pl.function
    def wide(s):
        s += pl.user("Draw a wide one.")
        with s.assistant():
            s += "Here:" + pl.gen_image(
                "pic",
                "a long train",
                size="48x32",
                negative_prompt="blur",
                guidance=3.0,
                seed=4,
                steps=STEPS,
            )

    state = wide.run(backend=engine, generator=generator)
    expected = pipeline(
        "a long train",
        negative_prompt="blur",
        width=48,
        height=32,
        guidance_scale=3.0,
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(4),
    ).images[0]
    assert state["pic"].size == (48, 32)
    assert same_picture(state["pic"], expected)
    content = state.messages()[-1]["content"]
    assert [p["type"] for p in content] == ["text", "image_url"]
    assert content[0]["text"] == "Here:"


@pl.function
def chat_then_draw(s):
    s += pl.system("You are a painter who talks about pictures.")
    s += pl.user("I love lighthouses at night, with waves and a full moon.")
    s += pl.assistant(pl.gen("reply", max_tokens=12, ignore_eos=True))
    s += pl.user("Now draw it for me.")
    s += pl.assistant(pl.gen_image("pic", seed=5, steps=STEPS))


def test_without_a_prompt_the_model_writes_it_from_the_cached_conversation(
    engine, generator, pipeline
):
    engine.flush_cache()
    state = chat_then_draw.run(backend=engine, generator=generator, temperature=0)
    text = state.text()
    t = engine.chat_template
    conversation = text[: -len(t.suffix("assistant"))]  # the image turn adds no text
    assert conversation.endswith("Now draw it for me." + t.suffix("user") + t.prefix("assistant"))
    assert PROMPT_INSTRUCTION not in text  # the prompt request stays out of the text

    # The prompt request starts with the conversation: the cache serves at least all
    # the reply's request read (the random reply itself may tokenize differently as
    # text), so only the last turns and the question are computed.
    meta = state.get_meta_info("pic_prompt")
    request = prompt_request_text(conversation, "assistant", t)
    n_request = engine.generate(request, {"max_new_tokens": 0})["meta_info"]["prompt_tokens"]
    assert meta["prompt_tokens"] == n_request
    n_before_reply = state.get_meta_info("reply")["prompt_tokens"]
    assert n_before_reply <= meta["cached_tokens"] < n_request

    # The model's answer parses against the schema and is what the engine writes.
    same = engine.generate(
        request,
        {"temperature": 0, "max_new_tokens": 128, "json_schema": json.dumps(PROMPT_SCHEMA)},
    )
    answer = json.loads(same["text"])
    jsonschema.validate(answer, PROMPT_SCHEMA)
    assert state["pic_prompt"] == answer["prompt"].strip()
    negative = answer["negative_prompt"].strip() or None
    assert state.get_meta_info("pic")["negative_prompt"] == negative

    # The image is the pipeline's for that prompt, and the assistant's turn holds it.
    assert same_picture(state["pic"], pipeline_image(pipeline, state["pic_prompt"], 5, negative))
    turn = state.messages()[-1]
    assert turn["role"] == "assistant"
    assert same_picture(decoded(turn["content"][0]), state["pic"])


def test_streaming_a_program_that_draws(engine, generator):
    state = chat_then_draw.run(backend=engine, generator=generator, temperature=0, stream=True)
    streamed = "".join(state.text_iter())
    assert streamed == state.text()
    assert state["pic_prompt"] == state.get_meta_info("pic")["prompt"]
    assert state["pic"].size == (SIDE, SIDE)


@pl.function
def draw_twice(s):
    s += pl.system("You draw castles.")
    s += pl.user("A castle in the clouds, at dawn, with flags on every tower.")
    forks = s.fork(2)
    forks += lambda i: pl.assistant(pl.gen_image("pic", seed=i, steps=STEPS))
    s["branches"] = [
        (f.get_meta_info("pic_prompt"), f.get_meta_info("pic"), f["pic"]) for f in forks
    ]


def test_a_branch_finds_the_whole_conversation_cached(engine, generator, pipeline):
    """The fork caches the parent's text, so each branch's prompt request computes
    only the instruction turn: its cached tokens cover the whole conversation."""
    engine.flush_cache()
    state = draw_twice.run(backend=engine, generator=generator, temperature=0)
    parent = state.text()
    assert parent.endswith("flags on every tower." + engine.chat_template.suffix("user"))
    n_parent = engine.generate(parent, {"max_new_tokens": 0})["meta_info"]["prompt_tokens"]
    drawn = state["branches"]
    for seed, (request, used, picture) in enumerate(drawn):
        assert n_parent - 1 <= request["cached_tokens"] < request["prompt_tokens"]
        assert used["seed"] == seed
        expected = pipeline_image(pipeline, used["prompt"], seed, used["negative_prompt"])
        assert same_picture(picture, expected)
    assert drawn[0][1]["prompt"] == drawn[1][1]["prompt"]  # greedy: the same prompt
    assert not same_picture(drawn[0][2], drawn[1][2])  # each branch its own seed and image


@pl.function
def branches(s):
    s += pl.user("Draw two animals.")
    forks = s.fork(2)
    forks += lambda i: pl.assistant(pl.gen_image("pic", ("a cat", "a dog")[i], seed=7, steps=STEPS))
    s["drawn"] = [(f["pic"], f["pic_prompt"], f.messages()[-1]) for f in forks]
    s["parent_has_pic"] = "pic" in s


def test_fork_branches_draw_separately(engine, generator, pipeline):
    state = branches.run(backend=engine, generator=generator)
    assert not state["parent_has_pic"]
    (cat, cat_prompt, cat_turn), (dog, dog_prompt, dog_turn) = state["drawn"]
    assert (cat_prompt, dog_prompt) == ("a cat", "a dog")
    assert same_picture(cat, pipeline_image(pipeline, "a cat", 7))
    assert same_picture(dog, pipeline_image(pipeline, "a dog", 7))
    assert not same_picture(cat, dog)
    assert same_picture(decoded(cat_turn["content"][0]), cat)
    assert same_picture(decoded(dog_turn["content"][0]), dog)


@pl.function
def draw_subject(s, subject):
    s += pl.user(f"Draw {subject}.")
    s += pl.assistant(pl.gen_image("pic", f"a painting of {subject}", seed=11, steps=STEPS))


def test_run_batch_draws_per_run(engine, generator, pipeline):
    states = draw_subject.run_batch(
        [{"subject": "a boat"}, {"subject": "a tree"}], backend=engine, generator=generator
    )
    for state, subject in zip(states, ["a boat", "a tree"]):
        assert same_picture(state["pic"], pipeline_image(pipeline, f"a painting of {subject}", 11))


@pytest.fixture
def three_generators(sd_dir):
    """Three diffusers backends on the tiny pipeline, named d, r and c."""
    generators = [DiffusersGenerator(sd_dir, name=n, device="cpu") for n in ("d", "r", "c")]
    yield generators
    for g in generators:
        g.close()


def test_the_call_beats_the_run_which_beats_the_default(engine, three_generators, pipeline):
    default, per_run, per_call = three_generators

    @pl.function
    def draw(s, painter=None):
        s += pl.user("Draw.")
        s += pl.assistant(pl.gen_image("pic", "a hill", seed=1, steps=STEPS, generator=painter))

    pl.set_default_generator(default)
    assert pl.get_default_generator() is default
    states = [
        draw.run(backend=engine),
        draw.run(backend=engine, generator=per_run),
        draw.run(painter=per_call, backend=engine, generator=per_run),
    ]
    assert [s.get_meta_info("pic")["generator"] for s in states] == ["d", "r", "c"]
    assert [g.counters["images_generated"] for g in three_generators] == [1, 1, 1]
    for state in states:  # the same directory: the same picture whichever drew it
        assert same_picture(state["pic"], pipeline_image(pipeline, "a hill", 1))


class WaitsForCancel:
    """A generator that draws nothing until its request is cancelled."""

    name = "waits"

    def __init__(self):
        self.started = threading.Event()

    def generate(self, requests):
        self.started.set()
        if requests[0].cancel.wait(30):
            raise GenerationCancelled("cancelled")
        return [[Image.new("RGB", (8, 8))]]


def test_interrupting_the_program_cancels_the_drawing(engine):
    waits = WaitsForCancel()
    state = draw_given.run(backend=engine, generator=waits, stream=True)
    assert waits.started.wait(30)
    state.executor.interrupt()
    with pytest.raises(GenerationCancelled):
        state.sync()


def test_no_generator_is_a_clear_error(engine):
    pl.set_default_generator(None)
    with pytest.raises(RuntimeError, match=r"pl\.set_default_generator\(generator\)"):
        draw_given.run(backend=engine)


def test_bad_values_fail_where_the_program_names_them():
    with pytest.raises(ImageGenerationError, match="steps"):
        pl.gen_image("pic", "x", steps=0)
    with pytest.raises(ImageGenerationError, match="size"):
        pl.gen_image("pic", "x", size="big")
    with pytest.raises(ImageGenerationError, match="prompt"):
        pl.gen_image("pic", "   ")
    with pytest.raises(RequestError, match="prompt_max_tokens"):
        pl.gen_image("pic", prompt_max_tokens=4)
    with pytest.raises(TypeError, match="ImageGenerator"):
        pl.gen_image("pic", generator=object())
    with pytest.raises(TypeError, match="ImageGenerator"):
        pl.set_default_generator("not a generator")


def test_tracing_stops_at_gen_image(engine):
    t = engine.chat_template
    prefix = draw_given.trace(backend=engine)
    assert prefix.endswith("Draw me a cat." + t.suffix("user") + t.prefix("assistant"))


@pytest.fixture(scope="module")
def endpoint(llama_dir):
    """A RuntimeEndpoint on a real server over its own engine (stopped with it)."""
    eng = pl.Engine(model=llama_dir, max_total_tokens=4096, max_running_requests=16)
    with running_server(create_app(eng, ServerConfig(served_model_name="tiny"))) as url:
        yield pl.RuntimeEndpoint(url)


def test_the_same_program_through_http(engine, endpoint, generator):
    """On a RuntimeEndpoint the prompt request goes through /generate: the same text,
    prompt and image as in process, the conversation served from the cache."""
    local = chat_then_draw.run(backend=engine, generator=generator, temperature=0)
    remote = chat_then_draw.run(backend=endpoint, generator=generator, temperature=0)
    assert remote.text() == local.text()
    assert remote["pic_prompt"] == local["pic_prompt"]
    assert same_picture(remote["pic"], local["pic"])
    meta, local_meta = remote.get_meta_info("pic_prompt"), local.get_meta_info("pic_prompt")
    assert meta["prompt_tokens"] == local_meta["prompt_tokens"]
    assert meta["cached_tokens"] >= local_meta["cached_tokens"] > 0


# ---- on a vision model: the next gen sees the drawn image -------------------------------


@pytest.fixture(scope="module")
def vlm(idefics3_dir):
    with pl.Engine(model=idefics3_dir, max_total_tokens=4096, max_running_requests=8) as eng:
        yield eng


N = 8
ANSWER = {"max_tokens": N, "ignore_eos": True, "return_logprob": True}


@pl.function
def draw_and_look(s, picture):
    s += pl.user(pl.image(picture) + "Draw this again, bigger.")
    s += pl.assistant(pl.gen_image("pic", seed=2, steps=STEPS))
    s += pl.user("What did you draw?")
    s += pl.assistant(pl.gen("answer", **ANSWER))


def test_a_vision_model_sees_the_drawn_image(vlm, generator, pipeline):
    state = draw_and_look.run(picture=SQUARE, backend=vlm, generator=generator, temperature=0)
    text = state.text()
    cue = "What did you draw?<end_of_utterance>\nAssistant:"
    prompt = text[: text.index(cue) + len(cue)]
    assert prompt.count("<image>") == 2  # the user's picture and the drawn one
    assistant_turn = prompt[prompt.index("bigger.") :]
    assert "Assistant:<image><end_of_utterance>" in assistant_turn
    params = {"temperature": 0, "max_new_tokens": N, "ignore_eos": True}
    params["stop"] = list(vlm.chat_template.stop_str)
    expected = vlm.generate(prompt, params, image_data=[SQUARE, state["pic"]])["output_ids"]
    got = [t for _, t, _ in state.get_meta_info("answer")["output_token_logprobs"]]
    assert got == expected
    # The prompt was written with the user's picture in view, and drawn from it.
    assert state.get_meta_info("pic_prompt")["prompt_tokens"] > 0
    assert same_picture(
        state["pic"],
        pipeline_image(
            pipeline, state["pic_prompt"], 2, state.get_meta_info("pic")["negative_prompt"]
        ),
    )
    turn = state.messages()[-3]
    assert turn["role"] == "assistant"
    assert same_picture(decoded(turn["content"][0]), state["pic"])
