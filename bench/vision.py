"""``plait bench vision``: images in, on random weights at SmolVLM-256M-Instruct's shapes.

No real vision-language weights can be fetched here, so the model is random at
the real model's shapes (``bench/vision_model.py``; ``--tiny`` for a small one),
built once into a cache folder with its processor. Two workloads, greedy with
``ignore_eos`` so every run decodes the same number of tokens:

- **chat**: 8 sessions x 4 turns, two distinct images shared among the sessions
  (the image in each session's first user turn), 32 new tokens a turn; each
  turn's prompt is the whole conversation so far plus a new user message, the
  8 sessions one batch. plait keeps the conversation in its prefix cache; HF
  transformers ``generate`` (same weights, dtype and threads) re-sends it, images
  included. Goal: turns 2-4 at least 5x faster than HF.
- **repeat**: 32 requests about one image, then 32 about 32 distinct images,
  one at a time, streamed: time to first token of the first request against the
  repeated ones (goal: at least 3x better), and the images the encoder ran (goal:
  once per distinct image, in both workloads).

Printed: the thread count, per-turn seconds, the ratios with PASS / MISS per
goal, and the peak resident memory.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from plait.bench.common import engine_options, hf_generate, peak_rss_mb, set_threads

WORKLOADS = {"vision": "images in: multi-turn image chat and repeated images against HF"}

CHAT_GOAL = 5.0  # HF / plait seconds, turns 2-4
TTFT_GOAL = 3.0  # first request's time to first token / a repeated one's
HF_TTFT_REQUESTS = 4  # HF's time to first token, for reference: the median of this many

SIZES = {  # full run, --quick
    "chat": (
        {"sessions": 8, "turns": 4, "new_tokens": 32},
        {"sessions": 4, "turns": 3, "new_tokens": 8},
    ),
    "repeat": ({"requests": 32, "new_tokens": 4}, {"requests": 4, "new_tokens": 2}),
}
QUESTIONS = (
    "What do you see in this picture?",
    "How many boats are there?",
    "Which colours stand out?",
    "Is it day or night?",
    "What is written on the sign by the door?",
    "Describe the top left corner.",
)


def picture(side: int, seed: int) -> Any:
    """A deterministic square picture: a colour gradient with noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, side)[None, :, None] * rng.integers(0, 256, 3)
    noise = rng.integers(0, 64, (side, side, 3))
    return Image.fromarray((ramp * 0.75 + noise).clip(0, 255).astype(np.uint8))


def user_turn(text: str, image: bool) -> str:
    """SmolVLM's layout of a user turn and the answer cue."""
    return ("User:<image>" if image else "User: ") + text + "<end_of_utterance>\nAssistant:"


def clean(reply: str) -> str:
    """An answer as the next turn's prompt carries it (no "<", so no image token)."""
    return " ".join(reply.replace("<", " ").split())


# ---- chat ----------------------------------------------------------------------------------

# A backend runs one batch: (prompts, one image per prompt, new tokens) -> answers and the
# prompt tokens the prefix cache supplied (0 where there is no cache).
Batch = Callable[[list[str], list[Any], int], tuple[list[str], int]]


@dataclass
class ChatRun:
    seconds: list[float] = field(default_factory=list)  # per turn
    cached: list[int] = field(default_factory=list)  # cached prompt tokens per turn


def chat(batch: Batch, images: list[Any], size: dict[str, int]) -> ChatRun:
    """``sessions`` chats advancing together, session ``s`` about ``images[s % 2]``."""
    sessions = size["sessions"]
    prompts = [
        "<|im_start|>" + user_turn(f"{QUESTIONS[0]} (chat {s})", image=True)
        for s in range(sessions)
    ]
    shown = [images[s % len(images)] for s in range(sessions)]
    run = ChatRun()
    for turn in range(size["turns"]):
        t0 = time.perf_counter()
        answers, cached = batch(prompts, shown, size["new_tokens"])
        run.seconds.append(time.perf_counter() - t0)
        run.cached.append(cached)
        question = QUESTIONS[(turn + 1) % len(QUESTIONS)]
        prompts = [
            p + " " + clean(a) + "<end_of_utterance>\n" + user_turn(question, image=False)
            for p, a in zip(prompts, answers)
        ]
    return run


def plait_batch(engine: Any) -> Batch:
    def run(prompts: list[str], images: list[Any], n: int) -> tuple[list[str], int]:
        params = {"max_new_tokens": n, "temperature": 0, "ignore_eos": True}
        outs = engine.generate(prompts, params, image_data=images)
        return [o["text"] for o in outs], sum(o["meta_info"]["cached_tokens"] for o in outs)

    return run


def hf_batch(model: Any, processor: Any) -> Batch:
    import torch

    tok = processor.tokenizer
    tok.padding_side = "left"
    pad = tok.pad_token_id

    def run(prompts: list[str], images: list[Any], n: int) -> tuple[list[str], int]:
        inputs = processor(
            text=prompts, images=[[im] for im in images], return_tensors="pt", padding=True
        )
        ids = inputs.pop("input_ids")
        with torch.inference_mode():
            out = hf_generate(model, ids, n, pad, **inputs)
        return tok.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True), 0

    return run


# ---- repeat --------------------------------------------------------------------------------


class EncodeCounter:
    """Images run through the vision model: the engine's ``num_images_encoded`` stat
    where it has one, else a count kept by wrapping the encoder the scheduler calls."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.counted = 0
        if "num_images_encoded" not in engine.get_stats():
            splicer = engine.scheduler.batcher.images
            encode = splicer.encode

            def counting(pixels: list[dict]) -> Any:
                self.counted += len(pixels)
                return encode(pixels)

            splicer.encode = counting
            self.wrapped = True
        else:
            self.wrapped = False

    def __call__(self) -> int:
        if self.wrapped:
            return self.counted
        return int(self.engine.get_stats()["num_images_encoded"])


def time_to_first_token(engine: Any, prompt: str, image: Any, n: int) -> float:
    """Seconds from the call to the first streamed chunk (image processing included)."""
    t0 = time.perf_counter()
    first = None
    params = {"max_new_tokens": n, "temperature": 0, "ignore_eos": True}
    for _ in engine.generate(prompt, params, image_data=image, stream=True):
        if first is None:
            first = time.perf_counter() - t0
    assert first is not None, "the stream gave no chunk"
    return first


@dataclass
class RepeatRun:
    same: list[float]  # TTFT of the requests about one image, the first one first
    distinct: list[float]  # TTFT of the requests about distinct images
    encoded_same: int
    encoded_distinct: int


def ask(i: int) -> str:
    """The ``i``-th question of the repeat workload, about one image."""
    return "<|im_start|>" + user_turn(f"Question {i}: {QUESTIONS[i % len(QUESTIONS)]}", True)


def hf_time_to_first_token(batch: Batch, side: int, requests: int) -> float:
    """HF's median seconds to a first token (processor and one generated token) over
    ``requests`` requests about the repeat workload's image: without a cache, every
    request costs what the first does."""
    one = picture(side, 100)
    seconds = []
    for i in range(requests):
        t0 = time.perf_counter()
        batch([ask(i)], [one], 1)
        seconds.append(time.perf_counter() - t0)
    return statistics.median(seconds)


def repeat(engine: Any, count: EncodeCounter, side: int, size: dict[str, int]) -> RepeatRun:
    n, k = size["new_tokens"], size["requests"]

    one = picture(side, 100)
    before = count()
    same = [time_to_first_token(engine, ask(i), one, n) for i in range(k)]
    encoded_same = count() - before
    before = count()
    distinct = [time_to_first_token(engine, ask(i), picture(side, 200 + i), n) for i in range(k)]
    return RepeatRun(same, distinct, encoded_same, count() - before)


# ---- driver --------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``plait bench vision``; ``--model`` is not used (the model is built)."""
    parser.add_argument(
        "--tiny", action="store_true", help="a tiny random Idefics3 instead of SmolVLM's shapes"
    )
    parser.add_argument(
        "--longest-edge",
        type=int,
        default=None,
        help="the processor scales images to this longest edge and cuts tiles from it; "
        "SmolVLM-256M's own setting is 2048 (4x4 tiles + a global view); default: one tile "
        "(512, or 64 with --tiny)",
    )
    parser.add_argument(
        "--cache-dir", default=None, help="where the random model is saved (default: plait's cache)"
    )


def main(args: argparse.Namespace) -> int:
    import pathlib

    from plait.bench.vision_model import describe, model_dir
    from plait.runtime.engine import Engine
    from plait.runtime.loader import default_cache_dir

    threads = set_threads(args.threads)
    edge = args.longest_edge or (64 if args.tiny else 512)
    cache = pathlib.Path(args.cache_dir) if args.cache_dir else default_cache_dir() / "bench-vision"
    path = model_dir(cache, args.tiny, edge)
    chat_size, repeat_size = (dict(SIZES[w][1 if args.quick else 0]) for w in ("chat", "repeat"))
    images = [picture(edge, 1), picture(edge, 2)]

    engine = Engine(model=path, **engine_options(args, threads))
    device, dtype = engine.device, engine.dtype
    count = EncodeCounter(engine)
    warm_up = "<|im_start|>" + user_turn("warm up", image=True)
    engine.generate(warm_up, {"max_new_tokens": 2}, image_data=picture(edge, 3))
    before = count()
    plait_chat = chat(plait_batch(engine), images, chat_size)
    chat_encoded = count() - before
    rep = repeat(engine, count, edge, repeat_size)
    plait_rss = peak_rss_mb()
    stats = engine.get_stats()
    engine.shutdown()
    del engine

    hf_chat, hf_ttft = None, None
    if not args.skip_hf:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        processor = AutoProcessor.from_pretrained(path)
        hf = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).eval()
        batch = hf_batch(hf, processor)
        batch([warm_up], [picture(edge, 3)], 2)
        hf_chat = chat(batch, images, chat_size)
        hf_ttft = hf_time_to_first_token(batch, edge, HF_TTFT_REQUESTS)

    print(f"plait bench vision: {describe(args.tiny, edge)}")
    print(f"model dir: {path}")
    print(
        f"torch threads: {threads}; device: {device}; dtype: "
        f"{str(dtype).removeprefix('torch.')}; greedy, ignore_eos"
    )
    _report_chat(chat_size, plait_chat, hf_chat, chat_encoded, len(images))
    _report_repeat(repeat_size, rep, hf_ttft)
    if "mm_cache_hits" in stats:
        print(
            f"vision-embedding cache (whole plait run): {stats['mm_cache_hits']} hits, "
            f"{stats['mm_cache_misses']} misses, {stats['mm_cache_entries']} entries, "
            f"{stats['mm_cache_bytes'] / 2**20:.1f} MiB"
        )
    print(
        f"peak RSS: plait {plait_rss:.0f} MiB (before HF loads); whole run {peak_rss_mb():.0f} MiB"
    )
    return 0


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def _report_chat(
    size: dict[str, int], plait: ChatRun, hf: ChatRun | None, encoded: int, distinct: int
) -> None:
    print(
        f"\n== chat: {size['sessions']} sessions x {size['turns']} turns, {distinct} images, "
        f"{size['new_tokens']} new tokens a turn"
    )
    print(f"{'turn':>4s} {'plait s':>9s} {'cached tok':>11s} {'HF s':>9s} {'HF/plait':>9s}")
    for t, (secs, cached) in enumerate(zip(plait.seconds, plait.cached)):
        hf_s = f"{hf.seconds[t]:9.2f}" if hf else f"{'-':>9s}"
        ratio = f"{hf.seconds[t] / secs:8.2f}x" if hf else f"{'-':>9s}"
        print(f"{t + 1:4d} {secs:9.2f} {cached:11d} {hf_s} {ratio}")
    later = sum(plait.seconds[1:])
    if hf is None:
        print(f"turns 2-{size['turns']}: plait {later:.3f} s; HF not run (--skip-hf)")
    else:
        hf_later = sum(hf.seconds[1:])
        ratio = hf_later / later
        print(
            f"turns 2-{size['turns']}: plait {later:.3f} s, HF {hf_later:.3f} s: {ratio:.2f}x "
            f"(goal >= {CHAT_GOAL:g}x) {_verdict(ratio >= CHAT_GOAL)}"
        )
    print(
        f"chat images encoded: {encoded} for {distinct} distinct images "
        f"(goal: once each) {_verdict(encoded == distinct)}"
    )


def _report_repeat(size: dict[str, int], run: RepeatRun, hf_ttft: float | None) -> None:
    k = size["requests"]
    print(
        f"\n== repeat: {k} requests about one image, then {k} about {k} images, "
        f"{size['new_tokens']} new tokens each, one at a time"
    )
    first, later = run.same[0], statistics.median(run.same[1:])
    cold = statistics.median(run.distinct)
    print(
        f"time to first token: first {first:.3f} s; repeated image (median of {k - 1}) "
        f"{later:.3f} s; distinct images (median of {k}) {cold:.3f} s"
    )
    if hf_ttft is not None:
        print(
            f"HF time to first token (median of {HF_TTFT_REQUESTS} requests about one image, "
            f"no cache): {hf_ttft:.3f} s"
        )
    ratio = first / later
    print(
        f"repeated-image TTFT: {ratio:.2f}x better than the first "
        f"(goal >= {TTFT_GOAL:g}x) {_verdict(ratio >= TTFT_GOAL)}"
    )
    ok = run.encoded_same == 1 and run.encoded_distinct == k
    print(
        f"repeat images encoded: {run.encoded_same} for 1 image, {run.encoded_distinct} for "
        f"{k} images (goal: once each) {_verdict(ok)}"
    )
