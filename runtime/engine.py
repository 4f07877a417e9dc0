"""Engine: the in-process runtime, mirroring SGLang's offline engine.

    engine = plait.Engine(model="smollm2")
    out = engine.generate("The capital of France is", {"max_new_tokens": 8, "temperature": 0})
    out["text"], out["output_ids"], out["meta_info"]

One loop thread owns the model and the scheduler; callers (threads, asyncio
tasks, the HTTP server) hand it requests through a queue and receive result
dicts through per-request sinks (sinks.py). Every call is one GenerateInput
(inputs.py), built from the keyword arguments or given as it is; it is
validated in the caller's thread, so bad input raises there and never reaches
the loop.
"""

from __future__ import annotations

import asyncio
import atexit
import dataclasses
import functools
import logging
import pathlib
import queue
import random
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import fields
from typing import Any

import torch

from plait.multimodal.embedding_cache import EmbeddingCache
from plait.multimodal.vision import process_prompt, processor_settings
from plait.runtime.chat_template import ChatTemplate
from plait.runtime.config import EngineConfig, ModelConfig
from plait.runtime.constrained import GrammarCompiler, TokenizerInfo
from plait.runtime.detokenizer import IncrementalDetokenizer
from plait.runtime.device import resolve_device, resolve_dtype
from plait.runtime.errors import RequestError
from plait.runtime.inputs import GenerateInput, InputLimits, PromptInput, image_data_lists
from plait.runtime.kv_pool import KVPool
from plait.runtime.loader import (
    default_cache_dir,
    load_config,
    load_image_inputs,
    load_tokenizer,
    load_weights,
    resolve_model,
)
from plait.runtime.model_runner import ModelRunner
from plait.runtime.request import Req, Sink
from plait.runtime.sampling_params import SamplingParams
from plait.runtime.scheduler import Scheduler
from plait.runtime.sinks import (
    LoopSink,
    QueueSink,
    aiter_pieces,
    await_final,
    iter_pieces,
    wait_final,
)

logger = logging.getLogger(__name__)

_ENGINE_OPTIONS = {f.name for f in fields(EngineConfig)}
_live_engines: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _shutdown_live_engines() -> None:
    """Stop every engine's loop thread before the interpreter finalizes. A daemon thread
    still inside a torch op while the process exits makes the C++ runtime abort
    ("terminate called without an active exception"), e.g. after Ctrl-C."""
    for engine in list(_live_engines):
        engine.shutdown()


class EngineShutdownError(RuntimeError):
    pass


# Engine.generate's arguments after ``prompt``, at their defaults.
_DEFAULT_ARGS = (None, None, False, None, None, False, False, None)


def _as_input(prompt: Any, image_data: Any, extra_key: Any, *args: Any) -> GenerateInput:
    """The GenerateInput of a generate call: given as ``prompt``, or built from the
    keyword arguments (SGLang's API)."""
    if not isinstance(prompt, GenerateInput):
        inp = GenerateInput(prompt, *args, extra_key=extra_key)
        inp.images = image_data_lists(image_data, inp.prompt, inp.input_ids)
        return inp
    if args != _DEFAULT_ARGS or image_data is not None or extra_key is not None:
        raise TypeError("give a GenerateInput alone, or the keyword arguments without one")
    return prompt


def display_name(model: str) -> str:
    """A model's name as callers see it, never the path of its weights."""
    name = str(model).rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]
    return name.removesuffix(".gguf")


class Engine:
    def __init__(self, model: str = "smollm2", **options: Any):
        unknown = sorted(set(options) - _ENGINE_OPTIONS)
        if unknown:
            raise TypeError(
                f"Engine got unknown options {unknown}; known: {sorted(_ENGINE_OPTIONS)}"
            )
        started = time.perf_counter()
        self.config = cfg = EngineConfig(model=model, **options)
        if cfg.log_level is not None:
            logging.getLogger("plait").setLevel(cfg.log_level.upper())
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)

        self.source = resolve_model(model, cache_dir=cfg.cache_dir)
        hf_config = load_config(self.source)
        self.model_config = mc = ModelConfig.from_hf(hf_config)
        self.tokenizer = load_tokenizer(self.source)
        self.eos_token_ids = self._eos_ids(mc)
        self.context_len = min(
            cfg.context_length or mc.max_position_embeddings, mc.max_position_embeddings
        )
        per_token = KVPool.bytes_per_token(mc.num_layers, mc.num_kv_heads, mc.head_dim, self.dtype)
        self.max_total_tokens = cfg.max_total_tokens or int(
            cfg.kv_cache_memory_gb * 2**30 // per_token
        )
        self.model_name = display_name(model)
        # A vision-language model's processor (ImageInputs); None for a text model.
        self.image_inputs = load_image_inputs(self.source) if mc.has_vision else None
        self.input_limits = InputLimits(
            vocab_size=mc.vocab_size,
            context_len=self.context_len,
            max_total_tokens=self.max_total_tokens,
            max_top_logprobs_num=cfg.max_top_logprobs_num,
            model_name=self.model_name,
            supports_images=mc.has_vision,
            image_token=self.image_inputs.image_token if self.image_inputs else None,
        )

        weights, vision = load_weights(self.source, self.dtype)
        self.runner = ModelRunner(
            mc,
            weights,
            device=self.device,
            dtype=self.dtype,
            max_total_tokens=self.max_total_tokens,
            context_len=self.context_len,
            max_running_requests=cfg.max_running_requests,
            attention_backend=cfg.attention_backend,
            vision=vision,
        )
        del weights
        self.scheduler = Scheduler(
            self.runner,
            self.tokenizer,
            eos_token_ids=self.eos_token_ids,
            chunked_prefill_size=cfg.chunked_prefill_size,
            max_running_requests=cfg.max_running_requests,
            schedule_policy=cfg.schedule_policy,
            disable_radix_cache=cfg.disable_radix_cache,
            image_cache=EmbeddingCache(cfg.mm_cache_bytes) if mc.has_vision else None,
            image_settings=processor_settings(self.image_inputs) if mc.has_vision else None,
        )
        self._grammar_compiler: GrammarCompiler | None = None
        self._grammar_lock = threading.Lock()
        self._rng = random.Random(cfg.random_seed)
        # Requests in flight, rid -> the rid the caller gave (``x`` for ``x-0``, ``x-1``
        # of an n=2 request): a rid names one request at a time.
        self._inflight: dict[str, str] = {}
        self._rids_lock = threading.Lock()
        self._inbox: queue.Queue = queue.Queue()
        self._closed = False
        self._loop_error: BaseException | None = None
        self._profiler: Any = None  # a torch profiler recording the loop thread
        self._thread = threading.Thread(target=self._loop, name="plait-engine", daemon=True)
        self._thread.start()
        _live_engines.add(self)
        logger.info(
            "engine ready in %.1f s: %s (%s) on %s in %s; KV cache %d tokens (%.2f GiB), "
            "context %d",
            time.perf_counter() - started,
            model,
            mc.architecture,
            self.device,
            str(self.dtype).removeprefix("torch."),
            self.max_total_tokens,
            self.max_total_tokens * per_token / 2**30,
            self.context_len,
        )

    def _eos_ids(self, mc: ModelConfig) -> tuple[int, ...]:
        ids = set(mc.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        try:
            from transformers import GenerationConfig

            gen = GenerationConfig.from_pretrained(self.source.model_path)
            eos = gen.eos_token_id
            ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        except OSError:
            pass  # no generation_config.json
        return tuple(sorted(ids))

    # ---- public API ------------------------------------------------------------

    def generate(
        self,
        prompt: str | list[str] | GenerateInput | None = None,
        sampling_params: dict | SamplingParams | list | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        return_logprob: bool = False,
        logprob_start_len: int | None = None,
        top_logprobs_num: int | None = None,
        return_text_in_logprobs: bool = False,
        stream: bool = False,
        rid: str | list[str] | None = None,
        image_data: Any = None,
        extra_key: str | list[str | None] | None = None,
    ) -> dict | list[dict] | Iterator[dict]:
        """Generate for one prompt (a dict) or a list of prompts (a list of dicts,
        run as one batch). ``n > 1`` gives a list of n results per prompt.
        ``stream=True`` returns an iterator of incremental result dicts. A
        :class:`GenerateInput` may stand for all the arguments:
        ``engine.generate(GenerateInput(prompt=..., ...))``.

        ``image_data`` (vision-language models; the prompt writes e.g. ``<image>`` where
        each goes): one image or a list per prompt, for a batch one entry per prompt;
        an image is what ``plait.multimodal.image.load_image`` reads. ``extra_key``
        (one, or one per prompt): requests share cached prefixes only with requests
        of the same key (a tenant's, say)."""
        inp = _as_input(
            prompt,
            image_data,
            extra_key,
            sampling_params,
            input_ids,
            return_logprob,
            logprob_start_len,
            top_logprobs_num,
            return_text_in_logprobs,
            stream,
            rid,
        )
        reqs, single = self._make_requests(inp, sinks=None)
        try:  # compiled off the loop thread; a bad grammar raises here
            for r in reqs:
                if r.grammar_future is not None:
                    r.set_grammar(r.grammar_future.result())
        except BaseException:
            self._cancel_grammars(reqs)
            raise
        if inp.stream:
            return self._stream(reqs)
        self._submit(reqs)
        results = [wait_final(r.sink.queue) for r in reqs]
        return results[0] if single else results

    async def async_generate(
        self,
        prompt: str | list[str] | GenerateInput | None = None,
        sampling_params: dict | SamplingParams | list | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        return_logprob: bool = False,
        logprob_start_len: int | None = None,
        top_logprobs_num: int | None = None,
        return_text_in_logprobs: bool = False,
        stream: bool = False,
        rid: str | list[str] | None = None,
        image_data: Any = None,
        extra_key: str | list[str | None] | None = None,
    ) -> dict | list[dict] | AsyncIterator[dict]:
        """The asyncio form of generate; with ``stream=True`` it returns an async
        iterator of incremental result dicts. It too takes a GenerateInput."""
        inp = _as_input(
            prompt,
            image_data,
            extra_key,
            sampling_params,
            input_ids,
            return_logprob,
            logprob_start_len,
            top_logprobs_num,
            return_text_in_logprobs,
            stream,
            rid,
        )
        loop = asyncio.get_running_loop()
        queues: list[asyncio.Queue] = []

        def make_sink() -> Sink:
            q: asyncio.Queue = asyncio.Queue()
            queues.append(q)
            return LoopSink(loop, q)

        # Tokenizing (and compiling a grammar) can take long: off the event loop.
        reqs, single = await loop.run_in_executor(
            None, functools.partial(self._make_requests, inp, sinks=make_sink)
        )
        try:
            for r in reqs:
                if r.grammar_future is not None:
                    r.set_grammar(await asyncio.wrap_future(r.grammar_future))
        except BaseException:  # a bad grammar, or the caller went away: stop compiling
            self._cancel_grammars(reqs)
            raise
        self._submit(reqs)
        if inp.stream:
            return aiter_pieces(queues[0], functools.partial(self.abort, reqs[0].rid))
        try:
            results = [await await_final(q) for q in queues]
        except BaseException:  # cancelled: free what the requests hold
            for r in reqs:
                self.abort(r.rid)
            raise
        return results[0] if single else results

    def abort(self, rid: str) -> bool:
        """Abort a request in any state; everything it holds is freed. ``rid`` may also
        be the rid given to an n > 1 or batch request (all its parts abort). False when
        no request of that rid is in flight."""
        with self._rids_lock:
            rids = [r for r, given in self._inflight.items() if rid in (r, given)]
        for r in rids:
            self._inbox.put(("abort", r))
        return bool(rids)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Render messages with the model's own chat template."""
        return self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False, **kwargs
        )

    @functools.cached_property
    def chat_template(self) -> ChatTemplate:
        """The role layout of the model's chat template (what the DSL writes per turn),
        with a vision-language model's image placeholder (what the DSL writes per image)."""
        template = ChatTemplate.from_tokenizer(self.tokenizer)
        if self.image_inputs is not None:
            template = dataclasses.replace(template, image_token=self.image_inputs.image_token)
        return template

    def get_stats(self) -> dict[str, Any]:
        """Live figures: running/waiting requests, KV slots, prefix cache hit rate."""
        return self._call(self._stats)

    @property
    def grammar_compiler(self) -> GrammarCompiler:
        """The grammar compiler (built on first use: its tokenizer tables take a moment)."""
        with self._grammar_lock:
            if self._grammar_compiler is None:
                cfg = self.config
                info = TokenizerInfo.from_hf(
                    self.tokenizer, self.model_config.vocab_size, list(self.eos_token_ids)
                )
                cache = pathlib.Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
                self._grammar_compiler = GrammarCompiler(
                    info,
                    primary=cfg.grammar_backend,
                    cache_dir=cache / "grammars",
                    compile_timeout_s=cfg.grammar_compile_timeout_s,
                )
            return self._grammar_compiler

    def flush_cache(self) -> bool:
        """Drop all cached prefixes. Returns False (and does nothing) while requests run."""
        return self._call(self.scheduler.flush_cache)

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._inbox.put(("stop", None))
        self._thread.join(timeout=30)
        self.scheduler.close()
        if self._grammar_compiler is not None:
            self._grammar_compiler.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def __del__(self) -> None:
        # Not contextlib.suppress: at interpreter exit that module may be torn down.
        try:  # noqa: SIM105
            self.shutdown()
        except Exception:
            pass

    # ---- profiling -------------------------------------------------------------

    def start_profile(
        self,
        activities: tuple[str, ...] = ("CPU",),
        record_shapes: bool = False,
        with_stack: bool = False,
        profile_memory: bool = False,
    ) -> None:
        """Start a torch profiler on the loop thread, where every forward pass runs; it
        records until ``stop_profile``. ``activities``: "CPU" and/or "GPU"."""
        self._call(self._start_profile, activities, record_shapes, with_stack, profile_memory)

    def stop_profile(self, trace_path: str) -> None:
        """Stop the profiler and write its Chrome trace (JSON) to ``trace_path``."""
        self._call(self._stop_profile).export_chrome_trace(trace_path)

    def _start_profile(self, activities, record_shapes, with_stack, profile_memory) -> None:
        if self._profiler is not None:
            raise RuntimeError("a profile is already being recorded")
        kinds = {"CPU": torch.profiler.ProfilerActivity.CPU}
        kinds["GPU"] = torch.profiler.ProfilerActivity.CUDA
        profiler = torch.profiler.profile(
            activities=[kinds[a] for a in activities],
            record_shapes=record_shapes,
            with_stack=with_stack,
            profile_memory=profile_memory,
        )
        profiler.start()
        self._profiler = profiler

    def _stop_profile(self) -> Any:
        profiler, self._profiler = self._profiler, None
        if profiler is None:
            raise RuntimeError("no profile is being recorded")
        profiler.stop()
        return profiler

    # ---- requests --------------------------------------------------------------

    def _make_requests(
        self, inp: GenerateInput, sinks: Callable[[], Sink] | None
    ) -> tuple[list[Req], bool]:
        """The scheduler requests of ``inp`` (``n`` per prompt), each with its own sink
        (from ``sinks``, else a QueueSink), and whether ``inp`` was one prompt giving
        one result. Raises RequestError for bad input, before any request runs."""
        if self._closed:
            raise EngineShutdownError("engine is shut down")
        process = None  # a vision-language model's processor, run in the caller's thread
        if self.image_inputs is not None:
            process = functools.partial(process_prompt, self.image_inputs)
        prompts, single = inp.check(self.tokenizer.encode, self.input_limits, process)
        reqs: list[Req] = []
        for p in prompts:
            grammar = self.grammar_compiler.submit(p.grammar) if p.grammar is not None else None
            base_rid = p.rid or uuid.uuid4().hex
            for k in range(p.params.n):
                rid = f"{base_rid}-{k}" if p.params.n > 1 else base_rid
                req = self._make_req(rid, p, k, inp, sinks() if sinks else QueueSink())
                req.grammar_future = grammar
                req.grammar_spec = p.grammar
                req.capped_max_new_tokens = p.capped_max_new_tokens
                req.given_rid = p.given_rid if p.given_rid is not None else req.rid
                reqs.append(req)
        return reqs, single and len(reqs) == 1

    def _make_req(self, rid: str, p: PromptInput, k: int, inp: GenerateInput, sink: Sink) -> Req:
        params = p.params
        generator = None
        if not params.is_greedy:
            seed = params.seed + k if params.seed is not None else self._rng.randrange(2**62)
            generator = torch.Generator(self.device).manual_seed(seed)
        detok = IncrementalDetokenizer(
            self.tokenizer,
            params.stop,
            params.skip_special_tokens,
            stop_regex=params.stop_regex,
            no_stop_trim=params.no_stop_trim,
            spaces_between_special_tokens=params.spaces_between_special_tokens,
        )
        return Req(
            rid,
            p.input_ids,
            params,
            sink=sink,
            detokenizer=detok,
            generator=generator,
            stream=inp.stream,
            return_logprob=inp.return_logprob,
            logprob_start_len=inp.logprob_start_len,
            top_logprobs_num=inp.top_logprobs_num or 0,
            return_text_in_logprobs=inp.return_text_in_logprobs,
            jump_forward=not self.config.disable_jump_forward,
            image_items=p.image_items,
            mrope=(p.mrope_positions, p.mrope_delta),
            cache_namespace=p.cache_namespace,
        )

    def _cancel_grammars(self, reqs: list[Req]) -> None:
        """The requests end before running: stop compiles nobody else waits for."""
        for r in reqs:
            if r.grammar_future is not None and not r.grammar_future.done():
                self.grammar_compiler.cancel(r.grammar_spec)

    def _submit(self, reqs: list[Req]) -> None:
        if self._loop_error is not None:
            raise EngineShutdownError(f"engine loop died: {self._loop_error!r}")
        self._register(reqs)
        self._inbox.put(("add", reqs))

    def _register(self, reqs: list[Req]) -> None:
        """Claim the requests' rids; a rid already in flight is refused, so an abort (or
        a client's disconnect) can only ever reach the request it belongs to."""
        with self._rids_lock:
            taken = set(self._inflight) | set(self._inflight.values())
            for r in reqs:
                if r.rid in taken or r.given_rid in taken:
                    raise RequestError(
                        "rid", r.given_rid, "a request with this rid is already in flight"
                    )
            for r in reqs:
                self._inflight[r.rid] = r.given_rid
                r.sink.on_final = functools.partial(self._release, r.rid)

    def _release(self, rid: str) -> None:
        with self._rids_lock:
            self._inflight.pop(rid, None)

    def _stream(self, reqs: list[Req]) -> Iterator[dict]:
        """The pieces of a streamed request, submitted when the first is asked for."""
        req = reqs[0]
        self._submit(reqs)
        yield from iter_pieces(req.sink.queue, functools.partial(self.abort, req.rid))

    # ---- the loop thread -------------------------------------------------------

    def _call(self, fn, *args):
        """Run fn on the loop thread and return its result."""
        if self._closed:
            raise EngineShutdownError("engine is shut down")
        done: queue.Queue = queue.Queue()
        self._inbox.put(("call", (fn, args, done)))
        ok, value = done.get()
        if not ok:
            raise value
        return value

    def _stats(self) -> dict[str, Any]:
        return {"max_total_num_tokens": self.max_total_tokens, **self.scheduler.stats()}

    def _handle(self, kind: str, payload: Any) -> bool:
        try:
            return self._handle_one(kind, payload)
        except Exception:  # the loop thread must survive whatever one message does
            logger.exception("engine failed to handle %r", kind)
            return True

    def _handle_one(self, kind: str, payload: Any) -> bool:
        if kind == "add":
            for req in payload:
                self.scheduler.add(req)
        elif kind == "abort":
            self.scheduler.abort(payload)
        elif kind == "call":
            fn, args, done = payload
            try:
                done.put((True, fn(*args)))
            except Exception as e:  # reported to the caller
                done.put((False, e))
        elif kind == "stop":
            self.scheduler.abort_all("engine shut down")
            return False
        return True

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        running = True
        while running:
            block = not self.scheduler.has_work()
            try:
                kind, payload = self._inbox.get(block=block)
                running = self._handle(kind, payload)
                while running:
                    kind, payload = self._inbox.get_nowait()
                    running = self._handle(kind, payload)
            except queue.Empty:
                pass
            if not running:
                break
            try:
                self.scheduler.step()
            except Exception as e:
                logger.exception("engine step failed; aborting the requests in flight")
                self._fail_all(e)

    def _fail_all(self, error: Exception) -> None:
        s = self.scheduler
        for req in list(s.waiting) + list(s.running):
            s.abort(req.rid, f"engine error: {error!r}")
