"""Image chat: a multi-turn agent that chats, decides with ``select`` whether to draw,
draws with ``gen_image`` from the conversation, and (given a vision model) says what it
drew.

The image prompt is not written by this script: ``gen_image`` without a prompt asks the
chat model for one in a side request that starts with the whole conversation, which
the radix cache already holds, so only the question and the answer are computed. The
script prints that request's cached tokens next to the prompt it produced.

A vision-language model then looks at the drawing. If it is the chat model itself, the
program's next ``gen`` sees the image in the same turn; if it is another model, the
conversation (with every image drawn so far) is replayed to it. Either way its words
join the chat as the assistant's, so later turns know what the picture shows.

    python examples/image_chat.py --image-model /models/sd-turbo          # type; empty line ends
    python examples/image_chat.py --image-model /models/sd-turbo \\
        --vision-model /models/SmolVLM-256M-Instruct --steps 2 \\
        --say "I love lighthouses at night." --say "Draw one for me, with a full moon."

The model decides with ``select`` whether a turn draws; a user turn that starts with
``/draw`` always does.

The image model is a diffusers text-to-image pipeline directory (``pip install -e
".[diffusion]"``); it runs on the chat engine's device and dtype.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import pathlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import plait as pl

SYSTEM = (
    "You are a friendly painter who chats with the user. Begin every answer with [draw] "
    "when the user asks for a picture, and with [chat] otherwise."
)
DRAW, CHAT = "[draw]", "[chat]"
FORCE = "/draw"  # a user turn starting with it is drawn, whatever the model would choose
SEEN = "\nWhat I drew: "  # the assistant's words after its picture
SAME_MODEL = "same"  # ``vision=SAME_MODEL``: the chat model looks at its own drawings


@dataclass
class Turn:
    """What one turn did; image fields are None on a chat turn."""

    index: int
    user: str
    decision: str  # DRAW or CHAT
    reply: str | None = None
    image: Any = None  # a PIL image
    image_prompt: str | None = None
    negative_prompt: str | None = None
    seed: int | None = None
    prompt_tokens: int | None = None  # of the side request that wrote the image prompt
    cached_tokens: int | None = None  # of those, served by the prefix cache
    description: str | None = None
    seen: pl.ProgramState | None = None  # the other vision model's run, when one looked
    path: str | None = None  # where main saved the image


@pl.function
def look(s, history, opening, picture, max_tokens):
    """On a vision model: the chat so far, then the drawing turn, continued in words."""
    for message in history:
        content = message["content"]
        parts = content if isinstance(content, list) else [{"type": "text", "text": content}]
        with getattr(s, message["role"])():  # s.user(), s.assistant(), ...
            for part in parts:
                s += part["text"] if part["type"] == "text" else pl.image(part["image_url"]["url"])
    with s.assistant():
        s += opening + pl.image(picture) + SEEN
        s += pl.gen("description", max_tokens=max_tokens, stop="\n")


@pl.function
def image_chat(
    s,
    turns: Iterable[str],
    vision: Any = None,
    first_seed: int = 0,
    size: str | None = None,
    steps: int | None = None,
    max_tokens: int = 96,
    vision_temperature: float = 0.0,
    on_turn: Callable[[Turn], None] | None = None,
):
    """Chat over ``turns``; turn ``i`` draws with seed ``first_seed + i``. ``vision``:
    None (no description), SAME_MODEL, or the backend of another vision model. Returns
    the turns (a list of Turn)."""
    s += pl.system(SYSTEM)
    done = []
    for i, text in enumerate(turns):
        forced = text.startswith(FORCE)
        if forced:
            text = text[len(FORCE) :].strip() or "Draw a picture."
        s += pl.user(text)
        with s.assistant():
            # With /draw, select has one choice; its request still caches the conversation.
            s += pl.select(f"decision_{i}", [DRAW] if forced else [DRAW, CHAT])
            turn = Turn(index=i, user=text, decision=s[f"decision_{i}"])
            if turn.decision == CHAT:
                s += " " + pl.gen(f"reply_{i}", max_tokens=max_tokens)
                turn.reply = s[f"reply_{i}"]
            else:
                s += pl.gen_image(f"image_{i}", seed=first_seed + i, size=size, steps=steps)
                turn.image, turn.image_prompt = s[f"image_{i}"], s[f"image_{i}_prompt"]
                drawn = s.get_meta_info(f"image_{i}")
                turn.negative_prompt, turn.seed = drawn["negative_prompt"], drawn["seed"]
                asked = s.get_meta_info(f"image_{i}_prompt")  # the request for the prompt
                turn.prompt_tokens = asked["prompt_tokens"]
                turn.cached_tokens = asked["cached_tokens"]
                if vision == SAME_MODEL:  # the next gen sees the image just appended
                    s += SEEN + pl.gen(f"description_{i}", max_tokens=max_tokens, stop="\n")
                    turn.description = s[f"description_{i}"]
                elif vision is not None:
                    turn.seen = look.run(
                        history=s.messages(),  # the turns before this one
                        opening=turn.decision,
                        picture=turn.image,
                        max_tokens=max_tokens,
                        backend=vision,
                        temperature=vision_temperature,
                    )
                    turn.description = turn.seen["description"]
                    s += SEEN + turn.description
        done.append(turn)
        if on_turn is not None:
            on_turn(turn)
    return done


# ---- the command line ---------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default="smollm2", help="the chat LLM (default: smollm2)")
    p.add_argument("--image-model", required=True, metavar="DIR", help="a diffusers pipeline")
    p.add_argument("--vision-model", metavar="DIR", help="a vision-language model that looks")
    p.add_argument("--say", action="append", metavar="TEXT", help="a user turn (repeatable)")
    p.add_argument("--out", default="image_chat_out", metavar="DIR", help="where images go")
    p.add_argument("--seed", type=int, default=0, help="turn i draws with seed SEED + i")
    p.add_argument("--size", metavar="WxH", help="image size (default: the pipeline's)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the pipeline's)")
    p.add_argument("--max-tokens", type=int, default=96, help="tokens per reply")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--device", help="the engines' and the pipeline's device (default: auto)")
    return p.parse_args(argv)


def typed_turns() -> Iterator[str]:
    """User turns from the keyboard, until an empty line or end of input."""
    print(f"Type a message ({FORCE} ... to ask for a drawing); an empty line ends.")
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            return
        if not text:
            return
        yield text


def show_and_save(out: pathlib.Path, echo: bool) -> Callable[[Turn], None]:
    """Print a turn (with the user's words when they were scripted); save its image."""

    def show(turn: Turn) -> None:
        if echo:
            print(f"you> {turn.user}")
        if turn.decision == CHAT:
            print(f"assistant> {turn.reply.strip()}")
            return
        turn.path = str(out / f"turn{turn.index + 1}.png")
        turn.image.save(turn.path)
        print(f"assistant> [drew {turn.path}, {turn.image.width}x{turn.image.height}]")
        print(f"  image prompt: {turn.image_prompt!r}")
        print(f"  negative prompt: {turn.negative_prompt!r}, seed {turn.seed}")
        print(f"  prompt request: {turn.cached_tokens} of {turn.prompt_tokens} tokens cached")
        if turn.description is not None:
            print(f"assistant> What I drew: {turn.description.strip()}")

    return show


def main(argv: list[str] | None = None) -> pl.ProgramState:
    """Run the chat the arguments describe; the final state (its ``ret_value``: the
    turns)."""
    from plait.multimodal.diffusers_backend import DiffusersGenerator

    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    options = {"device": args.device} if args.device else {}
    with contextlib.ExitStack() as stack:  # closes what was opened, in reverse order
        engine = stack.enter_context(pl.Engine(model=args.model, **options))
        painter = stack.enter_context(
            DiffusersGenerator(args.image_model, device=engine.device, dtype=engine.dtype)
        )
        vision = None
        if args.vision_model is None:
            print("no --vision-model: the assistant will not describe its drawings")
        elif os.path.realpath(args.vision_model) == os.path.realpath(args.model):
            vision = SAME_MODEL
        else:
            vision = stack.enter_context(pl.Engine(model=args.vision_model, **options))
        return image_chat.run(
            turns=args.say if args.say else typed_turns(),
            vision=vision,
            first_seed=args.seed,
            size=args.size,
            steps=args.steps,
            max_tokens=args.max_tokens,
            vision_temperature=args.temperature,
            on_turn=show_and_save(out, echo=bool(args.say)),
            backend=engine,
            generator=painter,
            temperature=args.temperature,
        )


if __name__ == "__main__":
    main()
