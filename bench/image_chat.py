"""``plait bench image-chat``: images out, an agent that draws after a long chat.

The language model is the one of ``--model`` (SmolLM2 by default); the diffusion
pipeline has random weights at SD-Turbo's shapes (``bench/image_chat_model.py``;
``--tiny`` for a small one), built once into a cache folder and loaded by
``DiffusersGenerator``. Four measures:

- **prompt**: a DSL program replays a ~4k-token multi-turn chat, lets the model
  answer the last user turn (the previous turn, which computes the conversation),
  then calls ``pl.gen_image`` without a prompt: the model writes the image prompt
  under ``drawing.PROMPT_SCHEMA`` in a side request on the conversation. Its time
  with the radix cache warm, against the same request recomputed (cache flushed)
  and HF transformers recomputing it and generating as many tokens greedily.
  Goal: warm at least 5x faster than HF.
- **overhead**: ``DiffusersGenerator.generate_arrays`` against the bare pipeline
  call with the same arguments on the same folder, one request at a time; the
  outputs must be equal. Goal: at most 3% slower.
- **batching**: 8 threads each ask for one image at once, with
  ``max_batch_images=8`` (one pipeline call) and 1 (one by one). Goal: at least
  1.3x the throughput.
- **memory**: the resident memory with the LLM and the generator loaded, and
  after the generator's idle offload (on a CPU the weights are released).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Any

import plait as pl
from plait.bench.common import (
    engine_options,
    hf_generate,
    load_hf_model,
    load_hf_tokenizer,
    peak_rss_mb,
    rss_mib,
    set_threads,
)
from plait.bench.image_chat_model import GUIDANCE, STEPS

WORKLOADS = {
    "image-chat": "images out: image prompt after a long chat, diffusion overhead, batching, memory"
}

PROMPT_GOAL = 5.0  # HF seconds / plait seconds to the image prompt, cache warm
OVERHEAD_GOAL = 3.0  # percent over the bare pipeline call
BATCH_GOAL = 1.3  # images/s batched / one by one
CONCURRENT = 8  # requests at once in the batching measure
BATCH_WAIT_S = 0.05  # how long the batching generator waits for more requests

SIZES = {  # full run, --quick
    "reply_tokens": (32, 4),  # the assistant's answer before "now draw it"
    "prompt_reps": (2, 1),  # runs of the agent (and of each baseline): the best counts
    "overhead_reps": (3, 2),  # timed calls of each, alternating
    "batch_rounds": (1, 1),  # rounds of CONCURRENT requests, each mode
}

SYSTEM = "You are an illustrator who plans pictures for a children's book with the author."
TURNS = (
    (
        "The book follows a small fox who lives at the edge of a pine forest above a "
        "fishing village. Every chapter ends with one full-page picture. The fox is "
        "curious, a little clumsy, and always carries a blue scarf that her grandmother "
        "knitted for her before the long winter.",
        "A lovely start. For the fox I would keep a warm orange coat, a white chest and "
        "the blue scarf as the one strong cool colour, so that she stands out against "
        "the greens and browns of the forest. The village can sit below in soft greys.",
    ),
    (
        "In this chapter she climbs down to the harbour at dawn, because she heard the "
        "gulls talking about a lighthouse keeper who feeds animals. The boats are still "
        "tied along the pier, nets hang to dry, and the sea is calm and pale.",
        "Dawn gives us a pale pink and gold sky and long shadows. I would place the fox "
        "small in the lower left, on the wooden steps down to the pier, looking toward "
        "the lighthouse on the far right, with the boats leading the eye between them.",
    ),
    (
        "The keeper is an old woman with a red coat and a lantern. She is kind but does "
        "not talk much. She has a cat who does not trust the fox at first, and the two "
        "of them sit on opposite ends of the bench by the door of the lighthouse.",
        "Then the red coat and the lantern answer the fox's blue scarf across the page. "
        "The cat can sit high on the bench, tail curled, watching the fox with narrow "
        "eyes; the keeper between them, pouring milk into two saucers.",
    ),
    (
        "Younger readers like to find small details. Could we hide things in each "
        "picture: a snail on a rope, a lost mitten, a kite stuck in a mast, the letters "
        "of the fox's name painted on a crate? The style should stay soft watercolour.",
        "Yes: watercolour with ink lines, paper texture showing through, and six hidden "
        "details per page, never more, so that the main scene stays calm. I will keep a "
        "list of them per chapter so that they can come back later in the story.",
    ),
)
LAST_REQUEST = (
    "For this chapter's last page: the fox, the keeper and the cat share breakfast on "
    "the lighthouse steps while the fishing boats leave the harbour. What would you draw?"
)


def conversation(tokenizer: Any, target_tokens: int) -> list[tuple[str, str]]:
    """Turns of the chat before the last request, cycling through ``TURNS`` (each
    time as the next chapter) until they hold about ``target_tokens`` tokens."""
    turns: list[tuple[str, str]] = []
    total = len(tokenizer.encode(SYSTEM + LAST_REQUEST))
    chapter = 1
    while total < target_tokens:
        for user, assistant in TURNS:
            if total >= target_tokens:
                break
            user = f"Chapter {chapter}. {user}"
            total += len(tokenizer.encode(user + assistant)) + 10  # + the turn markers
            turns.append((user, assistant))
        chapter += 1
    return turns


@pl.function
def image_chat(s, turns, reply_tokens, size, seed):
    """The agent program: the chat, the model's answer, then a picture it prompts."""
    s += pl.system(SYSTEM)
    for user, assistant in turns:
        s += pl.user(user)
        s += pl.assistant(assistant)
    s += pl.user(LAST_REQUEST)
    s += pl.assistant(pl.gen("reply", max_tokens=reply_tokens, ignore_eos=True))
    s += pl.user("Now draw it for me.")
    picture = pl.gen_image("picture", size=(size, size), seed=seed, steps=STEPS, guidance=GUIDANCE)
    s += pl.assistant(picture)


# ---- 1. the image prompt ---------------------------------------------------------------


@dataclass
class Call:
    """One generating request of a program: what it sent, what came back, how long."""

    text: str
    params: dict
    options: dict
    out: dict
    seconds: float


def recording_backend(engine: Any) -> Any:
    """An EngineBackend that records, and times, the requests under a JSON schema (the
    image prompt requests)."""
    from plait.backend import EngineBackend

    class Recording(EngineBackend):
        def __init__(self) -> None:
            super().__init__(engine)
            self.calls: list[Call] = []

        def generate(self, text, sampling_params, **options):
            t0 = time.perf_counter()
            out = super().generate(text, sampling_params, **options)
            seconds = time.perf_counter() - t0
            if isinstance(sampling_params, dict) and "json_schema" in sampling_params:
                self.calls.append(Call(text, dict(sampling_params), options, out, seconds))
            return out

    return Recording()


@dataclass
class PromptRun:
    prompt_tokens: int  # of the image prompt request: the conversation and the question
    new_tokens: int
    warm: list[float]  # seconds per run, the conversation cached by the previous turn
    warm_cached: int
    cold: list[float]  # seconds per run, cache flushed
    cold_cached: int
    same_answer: bool  # warm and cold wrote the same prompt
    image_prompt: str
    call: Call  # the warm request, for HF to replay


def image_prompt(
    engine: Any, generator: Any, turns: list, size: int, reply_tokens: int, reps: int
) -> PromptRun:
    """``reps`` runs of the agent, each from an empty cache, and of its image prompt
    request recomputed after a flush."""
    backend = recording_backend(engine)
    # warm-up: a short chat compiles the schema's grammar and draws once
    image_chat.run([], 2, size, 1, backend=backend, generator=generator, temperature=0)
    warm_s, cold_s = [], []
    for _ in range(reps):
        engine.flush_cache()
        state = image_chat.run(
            turns, reply_tokens, size, 0, backend=backend, generator=generator, temperature=0
        )
        if state["picture"].size != (size, size):
            raise RuntimeError(f"the program drew {state['picture'].size}, not {size}x{size}")
        warm = backend.calls[-1]
        warm_s.append(warm.seconds)
        engine.flush_cache()
        t0 = time.perf_counter()
        cold = backend.generate(warm.text, warm.params, **warm.options)
        cold_s.append(time.perf_counter() - t0)
    meta, cold_meta = warm.out["meta_info"], cold["meta_info"]
    return PromptRun(
        prompt_tokens=meta["prompt_tokens"],
        new_tokens=meta["completion_tokens"],
        warm=warm_s,
        warm_cached=meta["cached_tokens"],
        cold=cold_s,
        cold_cached=cold_meta["cached_tokens"],
        same_answer=cold["text"] == warm.out["text"],
        image_prompt=state["picture_prompt"],
        call=warm,
    )


def hf_image_prompt(model_path: str, call: Call, new_tokens: int, reps: int) -> list[float]:
    """HF transformers' seconds to recompute the request's text and generate
    ``new_tokens`` greedily (no grammar), ``reps`` times."""
    import torch

    model, tokenizer = load_hf_model(model_path), load_hf_tokenizer(model_path)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    seconds = []
    with torch.inference_mode():
        hf_generate(model, torch.tensor([tokenizer.encode("warm up")]), 2, pad)
        for _ in range(reps):
            t0 = time.perf_counter()
            ids = torch.tensor([tokenizer.encode(call.text)])
            hf_generate(model, ids, new_tokens, pad)
            seconds.append(time.perf_counter() - t0)
    return seconds


# ---- 2. diffusion overhead ---------------------------------------------------------------


@dataclass
class OverheadRun:
    plait: list[float]
    bare: list[float]
    equal: bool
    faults: dict[str, list[int]]  # minor page faults of the process per call, by caller

    @property
    def percent(self) -> float:
        """Over the bare call, best of each: other processes only ever add time."""
        return (min(self.plait) / min(self.bare) - 1) * 100

    @property
    def median_percent(self) -> float:
        return (statistics.median(self.plait) / statistics.median(self.bare) - 1) * 100


def overhead(generator: Any, path: str, size: int, reps: int) -> OverheadRun:
    """``generate_arrays`` against the bare call the generator's docs say it equals."""
    import numpy as np
    import torch
    from diffusers import AutoPipelineForText2Image

    from plait.multimodal.generation import ImageRequest

    bare_pipe = AutoPipelineForText2Image.from_pretrained(path, local_files_only=True)
    bare_pipe.set_progress_bar_config(disable=True)
    prompt = "a small fox in a blue scarf on the lighthouse steps, watercolour"

    def bare(seed: int) -> Any:
        return bare_pipe(
            prompt=[prompt],
            num_images_per_prompt=1,
            width=size,
            height=size,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            generator=[torch.Generator().manual_seed(seed)],
            output_type="np",
        ).images

    def plait(seed: int) -> Any:
        request = ImageRequest(prompt, size=(size, size), steps=STEPS, guidance=GUIDANCE, seed=seed)
        return generator.generate_arrays([request])[0]

    bare(99), plait(99)  # warm-up
    run = OverheadRun([], [], True, {"plait": [], "bare": []})
    for seed in range(reps):
        outs = {}
        # alternate who goes first, so a drift in the machine's load hits both alike
        order = ((plait, run.plait, "plait"), (bare, run.bare, "bare"))
        for fn, times, name in order if seed % 2 == 0 else order[::-1]:
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            outs[fn] = fn(seed)
            times.append(time.perf_counter() - t0)
            run.faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
        run.equal &= bool(np.array_equal(outs[plait], outs[bare], equal_nan=True))
    return run


# ---- 3. batching -------------------------------------------------------------------------


def concurrent(generator: Any, size: int, rounds: int) -> tuple[float, list, int]:
    """Seconds for ``rounds`` rounds of CONCURRENT threads asking for one image each
    at once; the last round's images, and the pipeline calls made."""
    from plait.multimodal.generation import ImageRequest

    def request(i: int) -> ImageRequest:
        prompt = f"picture {i}: a fox, a keeper and a cat at breakfast"
        return ImageRequest(prompt, size=(size, size), steps=STEPS, guidance=GUIDANCE, seed=i)

    def one_round() -> list:
        images: list = [None] * CONCURRENT
        start = threading.Barrier(CONCURRENT)

        def ask(i: int) -> None:
            start.wait()
            images[i] = generator.generate_arrays([request(i)])[0]

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(CONCURRENT)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return images

    generator.generate_arrays([request(99)])  # warm-up (and a reload after an idle offload)
    batches = generator.batches
    t0 = time.perf_counter()
    for _ in range(rounds):
        images = one_round()
    return time.perf_counter() - t0, images, generator.batches - batches


# ---- driver ------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``plait bench image-chat``; ``--model`` is the language model."""
    parser.add_argument(
        "--tiny", action="store_true", help="a tiny random pipeline instead of SD-Turbo's shapes"
    )
    parser.add_argument(
        "--size",
        type=int,
        default=None,
        help="image side in pixels (SD-Turbo's own is 512; default: 128, or 32 with --tiny)",
    )
    parser.add_argument(
        "--conversation-tokens",
        type=int,
        default=4096,
        help="about how many tokens the chat holds before the image prompt",
    )
    parser.add_argument(
        "--idle-offload-s",
        type=float,
        default=2.0,
        help="the batching generator's idle_offload_s (the memory measure waits for it)",
    )
    parser.add_argument(
        "--pipeline-dir",
        default=None,
        help="where the random pipeline is saved (default: a folder in plait's cache; "
        "--cache-dir is the language model's)",
    )


def main(args: argparse.Namespace) -> int:
    import gc
    import pathlib

    from plait.bench import image_chat_model as pipeline_model
    from plait.multimodal.diffusers_backend import DiffusersGenerator
    from plait.runtime.engine import Engine
    from plait.runtime.loader import default_cache_dir

    threads = set_threads(args.threads)
    size = args.size or (32 if args.tiny else 128)
    quick = 1 if args.quick else 0
    reply_tokens, prompt_reps, reps, rounds = (SIZES[k][quick] for k in SIZES)
    cache = (
        pathlib.Path(args.pipeline_dir)
        if args.pipeline_dir
        else default_cache_dir() / "bench-image-chat"
    )
    path = pipeline_model.pipeline_dir(cache, args.tiny)

    rss_start = rss_mib()
    engine = Engine(model=args.model, **engine_options(args, threads))
    rss_llm = rss_mib()
    batched = DiffusersGenerator(
        path, max_batch_images=CONCURRENT, idle_offload_s=args.idle_offload_s
    )
    turns = conversation(engine.tokenizer, args.conversation_tokens)
    prompt = image_prompt(engine, batched, turns, size, reply_tokens, prompt_reps)

    batched_s, batched_images, batched_calls = concurrent(batched, size, rounds)
    rss_both, peak_both = rss_mib(), peak_rss_mb()
    waited = _wait_for_offload(batched, args.idle_offload_s + 60)
    gc.collect()
    rss_offloaded = rss_mib()
    offloads = batched.offloads

    with DiffusersGenerator(path, max_batch_images=1) as single:
        single_s, single_images, single_calls = concurrent(single, size, rounds)
        # batched again after one by one (A B A): a drift in the load hits both alike
        again_s, _, again_calls = concurrent(batched, size, rounds)
        batched.close()
        over = overhead(single, path, size, reps)
    batched_s, batched_calls = (batched_s + again_s) / 2, (batched_calls + again_calls) / 2
    model_path, device, dtype = engine.source.model_path, engine.device, engine.dtype
    engine.shutdown()
    del engine
    gc.collect()
    hf_s = None
    if not args.skip_hf:
        hf_s = hf_image_prompt(model_path, prompt.call, prompt.new_tokens, prompt_reps)

    print(f"plait bench image-chat: LLM {args.model} ({model_path})")
    print(f"pipeline: {pipeline_model.describe(args.tiny, size)}")
    print(f"pipeline dir: {path}")
    print(f"torch threads: {threads}; device: {device}; dtype: {str(dtype).removeprefix('torch.')}")
    _report_prompt(prompt, hf_s, len(turns), reply_tokens)
    _report_overhead(over, reps)
    _report_batching(rounds, batched_s, batched_calls, single_s, single_calls)
    diff = max(float(abs(a - b).max()) for a, b in zip(batched_images, single_images))
    print(f"batched vs one-by-one images: max |difference| {diff:.1e} (same seeds)")
    print(
        f"\n== memory (resident, MiB): at start {rss_start:.0f}; LLM loaded {rss_llm:.0f}; "
        f"LLM + generator after {CONCURRENT} images {rss_both:.0f} (peak so far "
        f"{peak_both:.0f}); after the generator's idle offload {rss_offloaded:.0f}"
    )
    offload_note = f"after {waited:.1f} s idle" if waited is not None else "not seen"
    print(
        f"idle offload (idle_offload_s={args.idle_offload_s:g}): {offloads} offload(s), "
        f"{offload_note}; freed {rss_both - rss_offloaded:.0f} MiB"
    )
    return 0


def _wait_for_offload(generator: Any, limit_s: float) -> float | None:
    """Seconds until the generator's idle offload, or None if it did not come."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit_s:
        if generator.offloaded:
            return time.perf_counter() - t0
        time.sleep(0.05)
    return None


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def _seconds(runs: list[float]) -> str:
    """The best of ``runs`` (other processes only ever add time), and all of them."""
    every = ", ".join(f"{x:.3f}" for x in runs)
    return f"{min(runs):.3f} s" + (f" (best of {every})" if len(runs) > 1 else "")


def _report_prompt(run: PromptRun, hf_s: list[float] | None, turns: int, reply_tokens: int) -> None:
    print(
        f"\n== image prompt: a {turns}-turn chat, the model's {reply_tokens}-token "
        f"reply, then gen_image without a prompt; the prompt request holds "
        f"{run.prompt_tokens} tokens and writes {run.new_tokens} (JSON schema, greedy)"
    )
    print(f"image prompt: {run.image_prompt[:100]!r}")
    warm, cold = min(run.warm), min(run.cold)
    print(
        f"plait, cache warm (previous turn): {_seconds(run.warm)}, {run.warm_cached} cached tokens"
    )
    print(
        f"plait, recomputed (cache flushed): {_seconds(run.cold)}, {run.cold_cached} cached "
        f"tokens; {cold / warm:.2f}x the warm time; same answer: {run.same_answer}"
    )
    if hf_s is None:
        print("HF not run (--skip-hf)")
        return
    hf = min(hf_s)
    print(
        f"HF transformers, recomputed, {run.new_tokens} tokens greedy: {_seconds(hf_s)}; "
        f"HF/recomputed {hf / cold:.2f}x"
    )
    ratio = hf / warm
    print(f"HF / warm: {ratio:.2f}x (goal >= {PROMPT_GOAL:g}x) {_verdict(ratio >= PROMPT_GOAL)}")


def _report_overhead(run: OverheadRun, reps: int) -> None:
    print(f"\n== diffusion overhead: one request at a time, {reps} alternating calls each")
    print(
        f"DiffusersGenerator.generate_arrays best {min(run.plait):.3f} s, median "
        f"{statistics.median(run.plait):.3f} s; bare pipeline call best {min(run.bare):.3f} s, "
        f"median {statistics.median(run.bare):.3f} s; outputs equal: {run.equal}"
    )
    print(
        "minor page faults per call (median; the generator's pipeline runs on its worker "
        f"thread): generator {statistics.median(run.faults['plait']):.0f}, bare "
        f"{statistics.median(run.faults['bare']):.0f}"
    )
    ok = run.percent <= OVERHEAD_GOAL and run.equal
    print(
        f"overhead: {run.percent:+.1f}% best of each, {run.median_percent:+.1f}% median "
        f"(goal <= {OVERHEAD_GOAL:g}%) {_verdict(ok)}"
    )


def _report_batching(
    rounds: int, batched_s: float, batched_calls: float, single_s: float, single_calls: int
) -> None:
    images = rounds * CONCURRENT
    print(
        f"\n== batching: {rounds} round(s) of {CONCURRENT} threads asking for one image each "
        "at once; batched before and after one by one, the mean of the two"
    )
    print(
        f"max_batch_images={CONCURRENT} (batch_wait_s={BATCH_WAIT_S:g}): {batched_s:.2f} s, "
        f"{images / batched_s:.2f} images/s, {batched_calls:g} pipeline calls"
    )
    print(
        f"max_batch_images=1: {single_s:.2f} s, {images / single_s:.2f} images/s, "
        f"{single_calls} pipeline calls"
    )
    ratio = single_s / batched_s
    print(f"throughput: {ratio:.2f}x (goal >= {BATCH_GOAL:g}x) {_verdict(ratio >= BATCH_GOAL)}")
