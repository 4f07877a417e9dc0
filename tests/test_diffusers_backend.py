"""The diffusers backend against plain diffusers calls on the same tiny random pipeline."""

from __future__ import annotations

import itertools
import logging
import threading
import time

import diffusers
import numpy as np
import pytest
import torch
from tiny_models import make_tiny_sd, make_tiny_sd3

from plait.multimodal.diffusers_backend import (
    SCHEDULERS,
    DiffusersGenerator,
    is_flow_scheduler,
    make_scheduler,
)
from plait.multimodal.generation import GenerationCancelled, ImageGenerationError, ImageRequest

STEPS = 4
SCHEDULER_CLASSES = {
    "euler": (diffusers.EulerDiscreteScheduler, {}),
    "euler_a": (diffusers.EulerAncestralDiscreteScheduler, {}),
    "dpm++_2m": (diffusers.DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "ddim": (diffusers.DDIMScheduler, {}),
    "lcm": (diffusers.LCMScheduler, {}),
}


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory) -> str:
    return make_tiny_sd(tmp_path_factory.mktemp("tiny_sd"), seed=0)


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory) -> str:
    return make_tiny_sd3(tmp_path_factory.mktemp("tiny_sd3"), seed=0)


@pytest.fixture(scope="module")
def generator(sd_dir):
    with DiffusersGenerator(sd_dir, device="cpu") as gen:
        yield gen


def plain_call(path, prompt, *, n=1, seed=0, steps=STEPS, size=(32, 32), guidance=7.5,
               negative_prompt=None, scheduler=None, output_type="np"):  # fmt: skip
    """What the backend promises to equal: a plain pipeline call, CPU generators s + i."""
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(path, local_files_only=True)
    if scheduler is not None:
        cls, options = SCHEDULER_CLASSES[scheduler]
        pipe.scheduler = cls.from_config(pipe.scheduler.config, **options)
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        prompt=[prompt] * n,
        negative_prompt=None if negative_prompt is None else [negative_prompt] * n,
        width=size[0],
        height=size[1],
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=[torch.Generator().manual_seed(seed + i) for i in range(n)],
        output_type=output_type,
    ).images


def plain_batch_call(path, asks: list[ImageRequest]) -> list[np.ndarray]:
    """One plain pipeline call over several requests (prompts and seeds concatenated),
    cut back into each request's images: what a batch promises to equal."""
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        prompt=[r.prompt for r in asks for _ in range(r.n)],
        num_inference_steps=asks[0].steps,
        generator=[torch.Generator().manual_seed(r.seed + i) for r in asks for i in range(r.n)],
        output_type="np",
    ).images
    ends = np.cumsum([r.n for r in asks])
    return list(np.split(images, ends[:-1]))


def run_in_threads(gen, asks: list[ImageRequest]) -> tuple[dict, dict]:
    """Each request from its own thread, all at once: (images, errors) by index."""
    results, errors = {}, {}
    start = threading.Barrier(len(asks))

    def ask(i):
        start.wait()
        try:
            [results[i]] = gen.generate_arrays([asks[i]])
        except GenerationCancelled as e:
            errors[i] = e

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(asks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors


def request(prompt="a red fox in the snow", **kwargs) -> ImageRequest:
    kwargs.setdefault("steps", STEPS)
    kwargs.setdefault("seed", 0)
    return ImageRequest(prompt, **kwargs)


def assert_same(a, b):
    assert torch.equal(torch.as_tensor(np.asarray(a)), torch.as_tensor(np.asarray(b)))


def test_equals_a_plain_pipeline_call_bit_for_bit(generator, sd_dir):
    [ours] = generator.generate_arrays([request(n=2, seed=7, negative_prompt="blurry")])
    theirs = plain_call(sd_dir, "a red fox in the snow", n=2, seed=7, negative_prompt="blurry")
    assert ours.shape == (2, 32, 32, 3) and ours.dtype == np.float32
    assert_same(ours, theirs)
    assert not np.array_equal(ours[0], ours[1])  # seeds 7 and 8


def test_pil_images_equal_the_pipelines_pil_output(generator, sd_dir):
    [images] = generator.generate([request(seed=3, size=(48, 32))])
    [theirs] = plain_call(sd_dir, "a red fox in the snow", seed=3, size=(48, 32), output_type="pil")
    assert len(images) == 1 and images[0].size == (48, 32) and images[0].mode == "RGB"
    assert_same(np.asarray(images[0]), np.asarray(theirs))


def test_defaults_come_from_the_pipeline(generator):
    facts = generator.facts
    assert facts.class_name == "StableDiffusionPipeline"
    assert facts.default_size == (32, 32)  # UNet sample 8 x VAE scale 4
    assert facts.multiple == 8  # the pipeline's own rule, above the VAE's 4
    assert (facts.default_steps, facts.default_guidance) == (50, 7.5)
    [images] = generator.generate([ImageRequest("a fox", seed=1, steps=2)])
    assert images[0].size == (32, 32)


@pytest.mark.parametrize("name", sorted(SCHEDULER_CLASSES))
def test_each_scheduler_equals_the_pipeline_with_that_scheduler(sd_dir, name):
    assert name in SCHEDULERS
    with DiffusersGenerator(sd_dir, device="cpu", scheduler=name) as gen:
        assert type(gen.pipeline.scheduler) is SCHEDULER_CLASSES[name][0]
        [ours] = gen.generate_arrays([request(n=2, seed=11)])
    assert_same(ours, plain_call(sd_dir, "a red fox in the snow", n=2, seed=11, scheduler=name))


def test_schedulers_give_different_images(sd_dir):
    results = {}
    for name in ("euler", "ddim"):
        with DiffusersGenerator(sd_dir, device="cpu", scheduler=name) as gen:
            results[name] = gen.generate_arrays([request(seed=5)])[0]
    assert not np.array_equal(results["euler"], results["ddim"])


def test_unknown_scheduler_names_the_field_and_the_known_names(sd_dir):
    with pytest.raises(ImageGenerationError) as info:
        DiffusersGenerator(sd_dir, device="cpu", scheduler="heun++")
    assert info.value.field == "scheduler" and info.value.value == "heun++"
    for name in SCHEDULERS:
        assert name in str(info.value)


def test_flow_match_is_refused_on_a_noise_prediction_pipeline(sd_dir):
    with pytest.raises(ImageGenerationError, match="flow") as info:
        DiffusersGenerator(sd_dir, device="cpu", scheduler="flow_match")
    assert info.value.field == "scheduler" and "euler" in str(info.value)


def test_concurrent_compatible_requests_share_one_pipeline_call(sd_dir):
    asks = [
        request("a red fox", seed=1),
        request("a blue whale", seed=2, n=2),
        request("a green tree", seed=3),
    ]
    with DiffusersGenerator(sd_dir, device="cpu", batch_wait_s=0.5) as gen:
        results, _ = run_in_threads(gen, asks)
        assert gen.counters == {
            "images_generated": 4,
            "batches": 1,
            "stopped": 0,
            "denoise_steps": len(gen.pipeline.scheduler.timesteps),  # one call's steps
            "offloads": 0,
            "reloads": 0,
        }
    # the threads queued in some order; the batch equals the plain call in that order
    assert any(
        all(
            torch.equal(torch.from_numpy(results[i]), torch.from_numpy(images))
            for i, images in zip(order, plain_batch_call(sd_dir, [asks[i] for i in order]))
        )
        for order in itertools.permutations(range(len(asks)))
    )


def test_a_batched_request_equals_its_unbatched_call_up_to_rounding(sd_dir):
    """CPU kernels (oneDNN convolutions, GroupNorm, the VAE's attention) round differently
    for different batch sizes, by ~1e-6: a batched image is its unbatched call to 1e-5,
    and bit for bit the plain call over the same batch."""
    asks = [request("a red fox", seed=1), request("a blue whale", seed=2, n=2)]
    with DiffusersGenerator(sd_dir, device="cpu", batch_wait_s=0.2) as gen:
        ours = gen.generate_arrays(asks)  # one call: queued in this order
        assert gen.counters["batches"] == 1
    for got, want in zip(ours, plain_batch_call(sd_dir, asks)):
        assert_same(got, want)
    for r, got in zip(asks, ours):
        want = plain_call(sd_dir, r.prompt, n=r.n, seed=r.seed)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_batch_invariant_mode_makes_a_batched_request_its_unbatched_call_bit_for_bit(
    family, sd_dir, sd3_dir
):
    path, scheduler = (sd_dir, None) if family == "sd" else (sd3_dir, "flow_match")
    asks = [
        request("a red fox", seed=1, negative_prompt="dark"),
        request("a blue whale", seed=2, n=2, negative_prompt="blurry"),
        request("a green tree", seed=3, negative_prompt="dull"),
    ]
    options = dict(device="cpu", scheduler=scheduler, batch_invariant=True)
    with DiffusersGenerator(path, batch_wait_s=0.3, **options) as gen:
        batched = gen.generate_arrays(asks)
        assert gen.counters["batches"] == 1
    with DiffusersGenerator(path, max_batch_images=1, **options) as gen:
        alone = [gen.generate_arrays([r])[0] for r in asks]
        assert gen.counters["batches"] == 3  # each request in a call of its own
    for got, want in zip(batched, alone, strict=True):
        assert_same(got, want)
    # the same images as the default mode, to rounding
    with DiffusersGenerator(path, device="cpu", scheduler=scheduler) as gen:
        for r, got in zip(asks, batched, strict=True):
            np.testing.assert_allclose(got, gen.generate_arrays([r])[0], rtol=0, atol=1e-5)


def test_incompatible_requests_run_in_separate_calls(sd_dir):
    asks = [request(seed=1), request(seed=1, steps=STEPS + 1), request(seed=1, negative_prompt="x")]
    with DiffusersGenerator(sd_dir, device="cpu", batch_wait_s=0.2) as gen:
        ours = gen.generate_arrays(asks)
        assert gen.counters["batches"] == 3
    assert_same(ours[1], plain_call(sd_dir, asks[1].prompt, seed=1, steps=STEPS + 1))
    assert_same(ours[2], plain_call(sd_dir, asks[2].prompt, seed=1, negative_prompt="x"))
    assert not np.array_equal(ours[0], ours[1])


def test_max_batch_images_splits_a_batch(sd_dir):
    asks = [request(seed=s, n=2) for s in (1, 2, 3)]
    with DiffusersGenerator(sd_dir, device="cpu", max_batch_images=4) as gen:
        ours = gen.generate_arrays(asks)
        assert gen.counters["batches"] == 2 and gen.counters["images_generated"] == 6
    assert_same(ours[2], plain_call(sd_dir, asks[2].prompt, n=2, seed=3))


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_idle_offload_releases_the_weights_and_reloads_them(sd_dir):
    with DiffusersGenerator(sd_dir, device="cpu", idle_offload_s=0.3) as gen:
        [before] = gen.generate_arrays([request(seed=9)])
        wait_for(lambda: gen.offloaded)
        assert gen.pipeline is None  # on a CPU the weights are released
        assert gen.counters["offloads"] == 1 and gen.counters["reloads"] == 0
        [after] = gen.generate_arrays([request(seed=9)])
        assert gen.counters["reloads"] == 1 and gen.pipeline is not None
        assert_same(before, after)
        wait_for(lambda: gen.counters["offloads"] == 2)


def test_no_idle_offload_by_default(generator):
    time.sleep(0.1)
    assert not generator.offloaded and generator.counters["offloads"] == 0


def count_denoiser_calls(gen, on_call=None) -> list[int]:
    calls = [0]

    def hook(module, args, output):
        calls[0] += 1
        if on_call:
            on_call(calls[0])

    gen.pipeline.unet.register_forward_hook(hook)
    return calls


def test_cancel_stops_a_request_between_steps(sd_dir):
    with DiffusersGenerator(sd_dir, device="cpu") as gen:
        ask = request(steps=50)
        calls = count_denoiser_calls(gen, on_call=lambda n: ask.cancel.set())
        with pytest.raises(GenerationCancelled):
            gen.generate_arrays([ask])
        assert calls[0] == 1  # stopped after the first step
        assert gen.counters["batches"] == 0 and gen.counters["images_generated"] == 0
        [after] = gen.generate_arrays([request(seed=4)])
    assert_same(after, plain_call(sd_dir, "a red fox in the snow", seed=4))


def test_a_request_cancelled_before_it_runs_never_runs(generator):
    ask = request()
    ask.cancel.set()
    done = generator.counters["batches"]
    with pytest.raises(GenerationCancelled):
        generator.generate([ask])
    assert generator.counters["batches"] == done


def test_cancelling_one_request_of_a_batch_keeps_the_others(sd_dir):
    keep, drop = request("a red fox", seed=1, steps=6), request("a blue whale", seed=2, steps=6)
    with DiffusersGenerator(sd_dir, device="cpu", batch_wait_s=0.3) as gen:
        count_denoiser_calls(gen, on_call=lambda n: drop.cancel.set() if n == 2 else None)
        results, errors = run_in_threads(gen, [keep, drop])
        assert gen.counters == {
            "images_generated": 1,
            "batches": 1,
            "stopped": 0,  # the call ran on for the request kept
            "denoise_steps": len(gen.pipeline.scheduler.timesteps),
            "offloads": 0,
            "reloads": 0,
        }
    assert set(results) == {0} and set(errors) == {1}
    # the batch ran on: keep's images are those of the plain call over both, in either order
    assert any(
        torch.equal(torch.from_numpy(results[0]), torch.from_numpy(images))
        for images in (
            plain_batch_call(sd_dir, [keep, drop])[0],
            plain_batch_call(sd_dir, [drop, keep])[1],
        )
    )


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"size": (34, 32)}, "size"),
        ({"size": (32, 30)}, "size"),
        ({"steps": 0}, "steps"),
        ({"steps": -3}, "steps"),
        ({"steps": 100_000}, "steps"),
        ({"n": 9}, "n"),
        ({"n": 0}, "n"),
        ({"guidance": -1.0}, "guidance"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),
    ],
)
def test_bad_requests_name_the_field_and_the_generator_goes_on(generator, sd_dir, kwargs, field):
    with pytest.raises(ImageGenerationError) as info:
        generator.generate([request(**kwargs)])
    assert info.value.field == field
    [ours] = generator.generate_arrays([request(seed=2)])
    assert_same(ours, plain_call(sd_dir, "a red fox in the snow", seed=2))


def test_size_error_says_the_multiple(generator):
    with pytest.raises(ImageGenerationError, match="multiples of 8"):
        generator.generate([request(size=(36, 32))])


def test_one_bad_request_queues_nothing(generator):
    done = generator.counters["batches"]
    with pytest.raises(ImageGenerationError):
        generator.generate([request(), request(size=(33, 33))])
    assert generator.counters["batches"] == done


def test_lcm_steps_over_its_schedule_are_refused(sd_dir):
    with DiffusersGenerator(sd_dir, device="cpu", scheduler="lcm") as gen:
        with pytest.raises(ImageGenerationError, match="LCM") as info:
            gen.generate([request(steps=60)])
        assert info.value.field == "steps"
        assert len(gen.generate([request(steps=2)])[0]) == 1


def test_a_long_prompt_is_truncated_with_a_warning(generator, sd_dir, caplog):
    prompt = "a very long description of a fox " * 10  # ~340 characters: one token each
    with caplog.at_level(logging.WARNING, logger="plait.multimodal.diffusers_backend"):
        [ours] = generator.generate_arrays([request(prompt, seed=6)])
    [record] = [r for r in caplog.records if "the rest is dropped" in r.getMessage()]
    assert "prompt has 262 tokens; the text encoder reads 77" in record.getMessage()
    assert_same(ours, plain_call(sd_dir, prompt, seed=6))
    # only the first 77 tokens count: a different tail gives the same image
    [same] = generator.generate_arrays([request(prompt + " and a whale", seed=6)])
    assert_same(ours, same)


def test_a_closed_generator_refuses_requests(sd_dir):
    gen = DiffusersGenerator(sd_dir, device="cpu")
    gen.close()
    with pytest.raises(RuntimeError, match="closed"):
        gen.generate([request()])


def test_not_a_pipeline_directory(tmp_path):
    with pytest.raises(ImageGenerationError) as info:
        DiffusersGenerator(str(tmp_path), device="cpu")
    assert info.value.field == "path"


def test_cpu_offload_options_are_ignored_on_a_cpu(sd_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="plait.multimodal.diffusers_backend"):
        gen = DiffusersGenerator(sd_dir, device="cpu", model_cpu_offload=True)
    with gen:
        assert not gen.model_cpu_offload
        assert "ignored" in caplog.text
        assert len(gen.generate([request()])[0]) == 1


def test_flow_matching_pipelines_take_only_flow_schedulers():
    flow = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    assert is_flow_scheduler(flow)
    kept = make_scheduler("flow_match", flow)
    assert type(kept) is diffusers.FlowMatchEulerDiscreteScheduler and kept.config.shift == 3.0
    assert make_scheduler(None, flow) is flow and make_scheduler("default", flow) is flow
    with pytest.raises(ImageGenerationError, match="flow-matching pipeline") as info:
        make_scheduler("euler", flow)
    assert info.value.field == "scheduler" and "flow_match" in str(info.value)
    assert not is_flow_scheduler(diffusers.DDIMScheduler())


def test_without_a_seed_each_call_draws_a_new_one(generator):
    first, second = generator.generate_arrays([request(seed=None), request(seed=None)])
    assert not np.array_equal(first, second)


def test_a_flow_matching_transformer_pipeline(sd3_dir):
    with DiffusersGenerator(sd3_dir, device="cpu", scheduler="flow_match") as gen:
        facts = gen.facts
        assert facts.class_name == "StableDiffusion3Pipeline"
        assert (facts.default_size, facts.multiple) == ((32, 32), 8)  # VAE 4 x patch 2
        [ours] = gen.generate_arrays([request(n=2, seed=5, size=(48, 32), negative_prompt="dull")])
        with pytest.raises(ImageGenerationError, match="multiples of 8") as info:
            gen.generate([request(size=(36, 32))])
        assert info.value.field == "size"
    pipe = diffusers.AutoPipelineForText2Image.from_pretrained(sd3_dir, local_files_only=True)
    assert type(pipe) is diffusers.StableDiffusion3Pipeline
    pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(
        prompt=["a red fox in the snow"] * 2,
        negative_prompt=["dull"] * 2,
        width=48,
        height=32,
        num_inference_steps=STEPS,
        generator=[torch.Generator().manual_seed(5 + i) for i in range(2)],
        output_type="np",
    ).images
    assert ours.shape == (2, 32, 48, 3)
    assert_same(ours, theirs)


def test_a_noise_prediction_scheduler_is_refused_on_a_flow_pipeline(sd3_dir):
    with pytest.raises(ImageGenerationError, match="flow-matching pipeline") as info:
        DiffusersGenerator(sd3_dir, device="cpu", scheduler="euler")
    assert info.value.field == "scheduler"


def test_a_failing_pipeline_call_fails_its_batch_and_the_generator_goes_on(sd_dir):
    with DiffusersGenerator(sd_dir, device="cpu") as gen:
        failures = [1]

        def fail_once(module, args):
            if failures[0]:
                failures[0] -= 1
                raise RuntimeError("out of memory (simulated)")

        gen.pipeline.unet.register_forward_pre_hook(fail_once)
        with pytest.raises(RuntimeError, match="simulated"):
            gen.generate([request(seed=4), request(seed=5)])
        assert gen.counters["batches"] == 0
        [after] = gen.generate_arrays([request(seed=4)])
        assert gen.counters["batches"] == 1
    assert_same(after, plain_call(sd_dir, "a red fox in the snow", seed=4))
