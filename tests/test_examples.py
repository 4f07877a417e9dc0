"""``examples/image_chat.py`` end to end on tiny random models: a Llama chats, a tiny
Stable Diffusion draws, a tiny Idefics3 looks. Each test runs the example's ``main``
with command-line arguments, as a user would, and checks what it wrote against the
library's own calls on the same directories.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import pathlib
import sys

import numpy as np
import pytest
from PIL import Image
from tiny_models import make_tiny_sd

import plait as pl
from plait.drawing import prompt_request_text
from plait.multimodal.diffusers_backend import DiffusersGenerator
from plait.multimodal.generation import ImageRequest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
STEPS = 2
TOKENS = 8
ASKED = "Draw one for me, with a full moon."
# The model decides the first two turns with select; "/draw" makes the last one draw.
SAID = ["I love lighthouses at night.", "Tell me about the sea.", "/draw " + ASKED]


@pytest.fixture(scope="module")
def image_chat():
    """examples/image_chat.py, imported as a module."""
    spec = importlib.util.spec_from_file_location("image_chat", EXAMPLES / "image_chat.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["image_chat"] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules["image_chat"]


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory) -> str:
    return make_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="module")
def painter(sd_dir):
    """The generator the example builds, built here directly (CPU, fp32 like the engine)."""
    with DiffusersGenerator(sd_dir, device="cpu", dtype="float32") as gen:
        yield gen


@pytest.fixture(scope="module")
def vlm(idefics3_dir):
    with pl.Engine(model=idefics3_dir, max_total_tokens=4096, max_running_requests=8) as eng:
        yield eng


def arguments(model: str, sd_dir: str, out, *extra: str) -> list[str]:
    args = [model, "--image-model", sd_dir, "--out", str(out), "--steps", str(STEPS)]
    return args + ["--max-tokens", str(TOKENS), *extra]


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def decoded(part: dict) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(part["image_url"]["url"].partition(",")[2])))


def check_decisions(state) -> list:
    """The turns; each unforced decision is select's best-scoring choice."""
    turns = state.ret_value
    assert [t.user for t in turns] == [*SAID[:-1], ASKED]
    for t in turns[:-1]:
        scores = state.get_meta_info(f"decision_{t.index}")["normalized_prompt_logprobs"]
        assert t.decision == ["[draw]", "[chat]"][int(np.argmax(scores))]
        assert (t.reply is None) == (t.decision == "[draw]") == (t.image is not None)
    assert turns[-1].decision == "[draw]"
    return turns


def check_saved_image(turn, painter, out, size=None, first_seed=0) -> None:
    """The file holds an image of the pipeline's default size (or ``size``), the
    generator's own image for the prompt and seed the example reports."""
    assert turn.path == str(out / f"turn{turn.index + 1}.png")
    saved = Image.open(turn.path)
    assert saved.size == (size or painter.facts.default_size)
    assert painter.facts.default_size == (32, 32)
    assert turn.seed == first_seed + turn.index  # turn i draws with seed --seed + i
    request = ImageRequest(
        turn.image_prompt,
        negative_prompt=turn.negative_prompt,
        seed=turn.seed,
        steps=STEPS,
        size=size,
    )
    (expected,) = painter.generate([request])[0]
    assert np.array_equal(pixels(saved), pixels(expected))
    assert np.array_equal(pixels(turn.image), pixels(expected))


def vlm_continuation(vlm, prompt: str, images: list) -> str:
    params = {
        "temperature": 0,
        "max_new_tokens": TOKENS,
        "stop": ["\n", *vlm.chat_template.stop_str],
    }
    return vlm.generate(prompt, params, image_data=images)["text"]


def test_a_text_model_chats_draws_and_another_model_describes(
    image_chat, engine, vlm, llama_dir, sd_dir, idefics3_dir, painter, tmp_path, capsys
):
    said = [x for s in SAID for x in ("--say", s)]
    state = image_chat.main(
        arguments(llama_dir, sd_dir, tmp_path, "--vision-model", idefics3_dir, *said)
    )
    turns = check_decisions(state)
    turn, drawn = turns[-1], [t.image for t in turns if t.decision == "[draw]"]
    check_saved_image(turn, painter, tmp_path)

    # The image prompt's side request starts with the conversation, served from the
    # radix cache (the select before it left all of it there): only the turn's opening,
    # the question and the answer are computed.
    text, t = state.text(), engine.chat_template
    opening = turn.user + t.suffix("user") + t.prefix("assistant")
    conversation = text[: text.index(opening) + len(opening)]
    n_conversation = engine.generate(conversation, {"max_new_tokens": 0})["meta_info"][
        "prompt_tokens"
    ]
    request = prompt_request_text(conversation + "[draw]", "assistant", t)
    n_request = engine.generate(request, {"max_new_tokens": 0})["meta_info"]["prompt_tokens"]
    assert turn.prompt_tokens == n_request
    assert n_conversation <= turn.cached_tokens < n_request

    # The vision model read the conversation with the drawn image in the drawing turn,
    # and its words are the greedy continuation of exactly that.
    seen = turn.seen.text()
    assert seen.count("<image>") == len(drawn)  # every drawing so far, this one last
    assert seen.rindex("[draw]<image>") > seen.index(ASKED)
    looked = turn.seen.messages()[-1]
    assert looked["role"] == "assistant"
    assert [p["type"] for p in looked["content"]] == ["text", "image_url", "text"]
    assert np.array_equal(pixels(decoded(looked["content"][1])), pixels(turn.image))
    cue = seen[: seen.rindex("What I drew: ") + len("What I drew: ")]
    assert turn.description == vlm_continuation(vlm, cue, drawn)

    # The chat keeps the picture (an image part) and the description (text) in the turn.
    last = state.messages()[-1]
    assert last["role"] == "assistant"
    assert [p["type"] for p in last["content"]] == ["text", "image_url", "text"]
    assert last["content"][0]["text"] == "[draw]"
    assert np.array_equal(pixels(decoded(last["content"][1])), pixels(turn.image))
    assert last["content"][2]["text"] == "\nWhat I drew: " + turn.description

    printed = capsys.readouterr().out
    assert f"you> {SAID[0]}" in printed
    assert f"image prompt: {turn.image_prompt!r}" in printed
    assert f"{turn.cached_tokens} of {turn.prompt_tokens} tokens cached" in printed
    assert f"What I drew: {turn.description.strip()}" in printed


def test_a_vision_model_describes_its_own_drawing_in_the_same_turn(
    image_chat, vlm, sd_dir, idefics3_dir, painter, tmp_path
):
    said = [x for s in SAID for x in ("--say", s)]
    state = image_chat.main(
        arguments(idefics3_dir, sd_dir, tmp_path, "--vision-model", idefics3_dir, *said)
    )
    turns = check_decisions(state)
    turn, drawn = turns[-1], [t.image for t in turns if t.decision == "[draw]"]
    check_saved_image(turn, painter, tmp_path)
    assert turn.seen is None  # no second model: the program's own gen looked

    # The gen after the drawing saw it: its prompt holds the image's placeholder in the
    # drawing turn, and its words are the model's greedy continuation with that image.
    text = state.text()
    cue = text[: text.rindex("What I drew: ") + len("What I drew: ")]
    assert cue.count("<image>") == len(drawn)
    assert cue.endswith(ASKED + "<end_of_utterance>\nAssistant:[draw]<image>\nWhat I drew: ")
    assert turn.description == vlm_continuation(vlm, cue, drawn)
    assert 0 < turn.cached_tokens < turn.prompt_tokens

    drawing = state.messages()[-1]
    assert drawing["role"] == "assistant"
    assert [p["type"] for p in drawing["content"]] == ["text", "image_url", "text"]
    assert np.array_equal(pixels(decoded(drawing["content"][1])), pixels(turn.image))


def test_typed_turns_a_size_and_no_vision_model(
    image_chat, llama_dir, sd_dir, painter, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(SAID) + "\n\nnot read\n"))
    state = image_chat.main(
        arguments(llama_dir, sd_dir, tmp_path, "--size", "48x32", "--seed", "5")
    )
    turns = check_decisions(state)  # the empty line ended the chat
    turn = turns[-1]
    check_saved_image(turn, painter, tmp_path, size=(48, 32), first_seed=5)
    assert turn.description is None and turn.seen is None
    assert [p["type"] for p in state.messages()[-1]["content"]] == ["text", "image_url"]
    assert "What I drew" not in state.text()
    printed = capsys.readouterr().out
    assert "no --vision-model: the assistant will not describe its drawings" in printed
    assert "you> " in printed and f"you> {SAID[0]}" not in printed  # typed, not echoed
