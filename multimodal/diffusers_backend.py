"""A local diffusers text-to-image pipeline as an :class:`ImageGenerator`.

``DiffusersGenerator(path)`` loads any pipeline directory that
``AutoPipelineForText2Image`` knows (SD 1.x/2.x, SDXL, SD3, Flux, PixArt, Sana, ...)
without touching the network, on the engine's device and dtype, with the scheduler
chosen by name (:data:`SCHEDULERS`).

One worker thread owns the pipeline. ``generate`` (from any thread) queues its
requests; the worker waits ``batch_wait_s`` for more, then runs every queued request
with the same settings (size, steps, guidance, whether a negative prompt is given) in
one pipeline call, up to ``max_batch_images`` images.

Seeds. Image ``i`` of a request with seed ``s`` comes from a CPU
``torch.Generator().manual_seed(s + i)``. A request run alone equals, bit for bit, this
plain call (``output_type="pil"`` gives the same pictures)::

    pipe(prompt=[p] * n, negative_prompt=[q] * n or None, num_images_per_prompt=1,
         width=w, height=h, num_inference_steps=steps, guidance_scale=g,
         generator=[torch.Generator().manual_seed(s + i) for i in range(n)],
         output_type="np")

A batch equals the same call over the batch's prompts and generators, concatenated in
queue order, so each request gets the same noise as alone. Its images differ from the
unbatched ones only by the rounding of kernels that depend on the batch size (oneDNN
convolutions, GEMM row tails, channels-last group norm: ~1e-6 in [0, 1]); with
``batch_invariant=True`` those layers run sample by sample
(:mod:`plait.multimodal.batch_invariant`) and a batched image equals its unbatched one
bit for bit, at some cost in speed.

Memory. After ``idle_offload_s`` seconds without requests the weights leave the
accelerator for host memory (on a CPU they are released, and read again from the
directory, memory-mapped, on the next request). ``model_cpu_offload`` and
``sequential_cpu_offload`` hand the placement to diffusers on an accelerator.
"""

from __future__ import annotations

import copy
import gc
import inspect
import logging
import math
import secrets
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from plait.multimodal.batch_invariant import make_batch_invariant
from plait.multimodal.generation import GenerationCancelled, ImageGenerationError, ImageRequest
from plait.runtime.device import resolve_device, resolve_dtype

if TYPE_CHECKING:
    from PIL import Image

logger = logging.getLogger(__name__)

# name -> (diffusers scheduler class, options over the pipeline's scheduler config)
SCHEDULERS: dict[str, tuple[str, dict]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++_2m": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2},
    ),
    "ddim": ("DDIMScheduler", {}),
    "lcm": ("LCMScheduler", {}),
    "flow_match": ("FlowMatchEulerDiscreteScheduler", {}),
}
FLOW_SCHEDULERS = frozenset({"flow_match"})
MAX_SEED = 2**63  # image i of a request seeds s + i: a torch.Generator takes < 2**64


def is_flow_scheduler(scheduler) -> bool:
    """Whether a scheduler integrates a flow-matching (velocity) model (SD3, Flux, ...)."""
    config = getattr(scheduler, "config", {})
    return type(scheduler).__name__.startswith("FlowMatch") or (
        config.get("prediction_type") == "flow_prediction" or bool(config.get("use_flow_sigmas"))
    )


def make_scheduler(name: str | None, current):
    """The scheduler called ``name``, built from the config of the pipeline's own
    scheduler ``current``; ``None`` or ``"default"`` keeps ``current``. A name that does
    not suit the pipeline (flow matching vs noise prediction) is refused."""
    if name is None or name == "default":
        return current
    if name not in SCHEDULERS:
        raise ImageGenerationError(
            "scheduler", name, f"unknown; known names: default, {', '.join(SCHEDULERS)}"
        )
    flow = is_flow_scheduler(current)
    if (name in FLOW_SCHEDULERS) != flow:
        kind = "flow-matching" if flow else "noise-prediction (not flow-matching)"
        fits = sorted(FLOW_SCHEDULERS) if flow else sorted(set(SCHEDULERS) - FLOW_SCHEDULERS)
        raise ImageGenerationError(
            "scheduler",
            name,
            f"this is a {kind} pipeline; it runs with: default, {', '.join(fits)}",
        )
    import diffusers

    class_name, options = SCHEDULERS[name]
    return getattr(diffusers, class_name).from_config(current.config, **options)


@dataclass(frozen=True)
class PipelineFacts:
    """What the generator needs to know about a pipeline to check and batch requests,
    kept while the weights are released."""

    class_name: str
    default_size: tuple[int, int]  # (width, height)
    multiple: int  # width and height must be multiples of this
    default_steps: int
    default_guidance: float
    params: frozenset[str]  # the pipeline call's parameter names
    max_steps: int | None  # the scheduler's own limit (LCM), if any

    @classmethod
    def of(cls, pipe) -> PipelineFacts:
        signature = inspect.signature(pipe.__call__).parameters
        scale = int(getattr(pipe, "vae_scale_factor", 8))
        denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
        config = getattr(denoiser, "config", {})
        if getattr(pipe, "patch_size", None):  # SD3
            patch = int(pipe.patch_size)
        elif hasattr(pipe, "_pack_latents"):  # Flux packs 2x2 latent patches
            patch = 2
        else:  # a UNet takes any latent size; a DiT its patch size
            patch = int(config.get("patch_size", 1) or 1) if hasattr(pipe, "transformer") else 1
        # the SD, SDXL and PixArt pipelines also want multiples of 8, whatever their VAE
        multiple = math.lcm(8, scale * patch)
        sample = getattr(pipe, "default_sample_size", None) or config.get("sample_size", 64)
        side = (sample[0] if isinstance(sample, (list, tuple)) else sample) * scale
        steps = (
            signature["num_inference_steps"].default if "num_inference_steps" in signature else 50
        )
        guidance = signature["guidance_scale"].default if "guidance_scale" in signature else 0.0
        scheduler_config = pipe.scheduler.config
        max_steps = (
            scheduler_config.get("original_inference_steps")
            if type(pipe.scheduler).__name__ == "LCMScheduler"
            else None
        )
        return cls(
            class_name=type(pipe).__name__,
            default_size=(side, side),
            multiple=multiple,
            default_steps=int(steps),
            default_guidance=float(guidance or 0.0),
            params=frozenset(signature),
            max_steps=max_steps,
        )


class _Cancelled(Exception):
    """Raised inside the denoising loop when every request of the batch was cancelled."""


class _Job:
    """One queued request: its settings key and, once done, its images or error."""

    def __init__(self, request: ImageRequest, key: tuple, seed: int):
        self.request, self.key, self.seed = request, key, seed
        self.done = threading.Event()
        self.images: np.ndarray | None = None
        self.error: BaseException | None = None
        self._lock = threading.Lock()

    def finish(self, images: np.ndarray | None = None, error: BaseException | None = None) -> bool:
        """Record the outcome; False if the job had already finished (cancelled)."""
        with self._lock:
            if self.done.is_set():
                return False
            self.images, self.error = images, error
            self.done.set()
            return True

    def cancel(self) -> None:
        self.finish(error=GenerationCancelled(f"request {self.request.prompt[:40]!r} cancelled"))

    @property
    def cancelled(self) -> bool:
        return self.request.cancel.is_set()

    def wait(self) -> np.ndarray:
        while not self.done.wait(0.02):
            if self.cancelled:
                self.cancel()
        if self.error is not None:
            raise self.error
        return self.images


class DiffusersGenerator:
    """Text to images with the diffusers pipeline saved in ``path`` (see the module doc).

    Counters: ``images_generated``, ``batches`` (pipeline calls finished),
    ``stopped`` (pipeline calls stopped between steps: all their requests cancelled),
    ``denoise_steps`` (steps run, over all calls), ``offloads`` and ``reloads``.
    """

    def __init__(
        self,
        path: str,
        *,
        name: str | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        scheduler: str | None = None,
        max_batch_images: int = 8,
        batch_wait_s: float = 0.005,
        idle_offload_s: float | None = None,
        model_cpu_offload: bool = False,
        sequential_cpu_offload: bool = False,
        batch_invariant: bool = False,
    ):
        if max_batch_images < 1:
            raise ImageGenerationError("max_batch_images", max_batch_images, "must be at least 1")
        if idle_offload_s is not None and idle_offload_s < 0:
            raise ImageGenerationError("idle_offload_s", idle_offload_s, "must be >= 0 or None")
        self.path = str(path)
        self.name = name or self.path.rstrip("/").rsplit("/", 1)[-1]
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.scheduler_name = scheduler
        self.max_batch_images = max_batch_images
        self.batch_wait_s = batch_wait_s
        self.idle_offload_s = idle_offload_s
        self.batch_invariant = batch_invariant
        on_accelerator = self.device.type != "cpu"
        if (model_cpu_offload or sequential_cpu_offload) and not on_accelerator:
            logger.warning(
                "cpu offload options are ignored on %s: the weights are on it", self.device
            )
        self.model_cpu_offload = model_cpu_offload and on_accelerator
        self.sequential_cpu_offload = sequential_cpu_offload and on_accelerator

        self.images_generated = self.batches = self.stopped = self.denoise_steps = 0
        self.offloads = self.reloads = 0
        self._pipe = None
        self._offloaded = False  # the weights are away: in host memory, or released on a CPU
        self._load()
        self.facts = PipelineFacts.of(self._pipe)
        # the callers' threads count prompt tokens on a copy: the worker's tokenizer is busy
        self._tokenizer = copy.deepcopy(getattr(self._pipe, "tokenizer", None))
        self._tokenizer_lock = threading.Lock()

        self._cond = threading.Condition()
        self._pending: list[_Job] = []
        self._closed = False
        self._last_use = time.monotonic()
        self._worker = threading.Thread(
            target=self._work, name=f"diffusers:{self.name}", daemon=True
        )
        self._worker.start()

    # ---- public --------------------------------------------------------------------------

    def generate(self, requests: list[ImageRequest]) -> list[list[Image.Image]]:
        """``request.n`` PIL images per request, in order (thread-safe)."""
        from diffusers.image_processor import VaeImageProcessor

        return [VaeImageProcessor.numpy_to_pil(a) for a in self.generate_arrays(requests)]

    def generate_arrays(self, requests: list[ImageRequest]) -> list[np.ndarray]:
        """Like ``generate``, as float arrays in [0, 1] of shape (n, height, width, 3): the
        pipeline's ``output_type="np"``."""
        jobs = [self._job(r) for r in requests]  # every check before anything is queued
        with self._cond:
            if self._closed:
                raise RuntimeError(f"generator {self.name!r} is closed")
            self._pending.extend(jobs)
            self._cond.notify_all()
        try:
            return [job.wait() for job in jobs]
        except BaseException:
            for job in jobs:  # nobody will collect the others
                job.cancel()
            raise

    @property
    def counters(self) -> dict[str, int]:
        return {
            "images_generated": self.images_generated,
            "batches": self.batches,
            "stopped": self.stopped,
            "denoise_steps": self.denoise_steps,
            "offloads": self.offloads,
            "reloads": self.reloads,
        }

    @property
    def offloaded(self) -> bool:
        return self._offloaded

    @property
    def pipeline(self):
        """The loaded diffusers pipeline (None while released); only the worker calls it."""
        return self._pipe

    def close(self) -> None:
        """Stop the worker, cancel what is queued, release the weights."""
        with self._cond:
            self._closed = True
            pending, self._pending = self._pending, []
            self._cond.notify_all()
        for job in pending:
            job.cancel()
        if self._worker is not threading.current_thread():
            self._worker.join()
        self._pipe = None
        gc.collect()

    def __enter__(self) -> DiffusersGenerator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- checks ----------------------------------------------------------------------------

    def _job(self, request: ImageRequest) -> _Job:
        request.check()
        facts = self.facts
        width, height = request.size or facts.default_size
        if width % facts.multiple or height % facts.multiple:
            raise ImageGenerationError(
                "size",
                f"{width}x{height}",
                f"{facts.class_name} needs width and height that are multiples of {facts.multiple}",
            )
        steps = request.steps or facts.default_steps
        if facts.max_steps is not None and steps > facts.max_steps:
            raise ImageGenerationError(
                "steps", steps, f"the LCM scheduler runs at most {facts.max_steps} steps"
            )
        guidance = facts.default_guidance if request.guidance is None else float(request.guidance)
        if request.negative_prompt is not None and "negative_prompt" not in facts.params:
            raise ImageGenerationError(
                "negative_prompt", request.negative_prompt, f"{facts.class_name} takes none"
            )
        for field_name in ("prompt", "negative_prompt"):
            self._warn_if_truncated(field_name, getattr(request, field_name))
        if request.seed is not None and not (
            isinstance(request.seed, int) and 0 <= request.seed < MAX_SEED
        ):
            raise ImageGenerationError("seed", request.seed, f"must be 0 to {MAX_SEED - 1}")
        seed = request.seed if request.seed is not None else secrets.randbelow(MAX_SEED)
        key = (width, height, steps, guidance, request.negative_prompt is not None)
        return _Job(request, key, seed)

    def _warn_if_truncated(self, field_name: str, text: str | None) -> None:
        """The text encoder reads at most its tokenizer's ``model_max_length`` tokens; the
        pipeline drops the rest (and says so in diffusers' own log). Say it here too."""
        limit = getattr(self._tokenizer, "model_max_length", None)
        if not text or limit is None or limit > 100_000:
            return
        with self._tokenizer_lock:
            count = len(self._tokenizer(text, verbose=False).input_ids)  # the warning is ours
        if count > limit:
            logger.warning(
                "%s has %d tokens; the text encoder reads %d, the rest is dropped: %r",
                field_name,
                count,
                limit,
                text[:80] + "...",
            )

    # ---- loading and the memory policy ------------------------------------------------------

    def _load(self) -> None:
        from diffusers import AutoPipelineForText2Image
        from diffusers.utils import deprecation_utils

        # diffusers renamed torch_dtype to dtype (and warns about the old name)
        dtype_arg = "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"
        try:
            pipe = AutoPipelineForText2Image.from_pretrained(
                self.path, local_files_only=True, **{dtype_arg: self.dtype}
            )
        except (OSError, ValueError) as e:
            raise ImageGenerationError(
                "path", self.path, f"not a text-to-image diffusers pipeline directory ({e})"
            ) from e
        pipe.scheduler = make_scheduler(self.scheduler_name, pipe.scheduler)
        pipe.set_progress_bar_config(disable=True)
        if self.batch_invariant:
            for part in pipe.components.values():
                if isinstance(part, torch.nn.Module):
                    make_batch_invariant(part)
        if self.sequential_cpu_offload:
            pipe.enable_sequential_cpu_offload(device=self.device)
        elif self.model_cpu_offload:
            pipe.enable_model_cpu_offload(device=self.device)
        else:
            pipe.to(self.device)
        self._pipe = pipe

    def _offload(self) -> None:
        """Idle: the weights leave the accelerator (released, on a CPU)."""
        if self._offloaded or self.model_cpu_offload or self.sequential_cpu_offload:
            return  # diffusers already keeps them in host memory between calls
        if self.device.type == "cpu":
            self._pipe = None
            gc.collect()
        else:
            self._pipe.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        self._offloaded = True
        self.offloads += 1
        logger.info("%s: idle for %.1f s, weights offloaded", self.name, self.idle_offload_s)

    def _bring_back(self) -> None:
        if not self._offloaded:
            return
        if self._pipe is None:
            self._load()
        else:
            self._pipe.to(self.device)
        self._offloaded = False
        self.reloads += 1

    # ---- the worker ----------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if not batch:
                self._offload()
                continue
            self._run(batch)
            self._last_use = time.monotonic()

    def _idle_timeout(self) -> float | None:
        if self.idle_offload_s is None or self._offloaded:
            return None
        return max(0.0, self._last_use + self.idle_offload_s - time.monotonic())

    def _next_batch(self) -> list[_Job] | None:
        """The next jobs to run together; [] when idle long enough to offload, None once
        closed."""
        with self._cond:
            while not self._pending:
                if self._closed:
                    return None
                timeout = self._idle_timeout()
                if timeout == 0.0:
                    return []
                self._cond.wait(timeout)
            deadline = time.monotonic() + self.batch_wait_s
            while not self._closed and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            if self._closed:
                return None
            batch, rest, images = [], [], 0
            key = None
            for job in self._pending:
                if job.done.is_set() or job.cancelled:
                    job.cancel()
                elif key is None or (
                    job.key == key and images + job.request.n <= self.max_batch_images
                ):
                    key = job.key
                    batch.append(job)
                    images += job.request.n
                else:
                    rest.append(job)
            self._pending = rest
            return batch

    def _run(self, jobs: list[_Job]) -> None:
        try:
            self._bring_back()
            images = self._pipe(**self._call_args(jobs)).images
        except _Cancelled:
            self._pipe.maybe_free_model_hooks()
            self.stopped += 1
            return
        except BaseException as e:  # the batch fails; the generator goes on
            logger.exception("%s: pipeline call failed", self.name)
            for job in jobs:
                job.finish(error=e)
            return
        self.batches += 1
        start = 0
        for job in jobs:
            n = job.request.n
            if job.finish(images=images[start : start + n]):
                self.images_generated += n
            start += n

    def _call_args(self, jobs: list[_Job]) -> dict:
        width, height, steps, guidance, has_negative = jobs[0].key
        args = dict(
            prompt=[job.request.prompt for job in jobs for _ in range(job.request.n)],
            num_images_per_prompt=1,
            width=width,
            height=height,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=[
                torch.Generator().manual_seed(job.seed + i)
                for job in jobs
                for i in range(job.request.n)
            ],
            output_type="np",
        )
        if has_negative:
            args["negative_prompt"] = [
                job.request.negative_prompt for job in jobs for _ in range(job.request.n)
            ]

        def stop_if_cancelled() -> None:
            self.denoise_steps += 1
            for job in jobs:
                if job.cancelled:
                    job.cancel()
            if all(job.done.is_set() for job in jobs):
                raise _Cancelled

        params = self.facts.params
        if "callback_on_step_end" in params:

            def on_step_end(pipe, step, timestep, tensors):
                stop_if_cancelled()
                return {}

            args["callback_on_step_end"] = on_step_end
        elif "callback" in params:  # older pipelines (PixArt)
            args["callback"] = lambda step, timestep, latents: stop_if_cancelled()
            args["callback_steps"] = 1
        return {k: v for k, v in args.items() if k in params}
