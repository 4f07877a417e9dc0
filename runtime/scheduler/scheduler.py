"""The Scheduler: continuous batching over one ModelRunner, put together from
its parts (see the package docstring for the life of a request)."""

from __future__ import annotations

from typing import Any

from plait.radix import NullCache, PrefixCache, RadixCache
from plait.runtime.kv_pool import SlotAllocator
from plait.runtime.model_runner import ModelRunner
from plait.runtime.request import Req
from plait.runtime.scheduler.batching import Batcher
from plait.runtime.scheduler.grammar import GrammarSteps
from plait.runtime.scheduler.images import ImageSplicer
from plait.runtime.scheduler.kv import KVBook
from plait.runtime.scheduler.output import OutputProcessor


class Scheduler:
    def __init__(
        self,
        runner: ModelRunner,
        tokenizer: Any,
        *,
        eos_token_ids: tuple[int, ...],
        chunked_prefill_size: int,
        max_running_requests: int,
        schedule_policy: str = "lpm",
        disable_radix_cache: bool = False,
    ):
        self.runner = runner
        device, context_len = runner.device, runner.context_len
        allocator = SlotAllocator(runner.max_total_tokens, device)
        cache: PrefixCache = (NullCache if disable_radix_cache else RadixCache)(
            allocator.free, device
        )
        self.kv = KVBook(cache, allocator, max_running_requests, context_len, device)
        images = None
        if runner.vision is not None:
            images = ImageSplicer(runner.embed, runner.encode_images)
        self.batcher = Batcher(
            self.kv,
            chunked_prefill_size=chunked_prefill_size,
            max_running_requests=max_running_requests,
            schedule_policy=schedule_policy,
            images=images,
        )
        self.grammar = GrammarSteps(tokenizer, runner.cfg.vocab_size, eos_token_ids, context_len)
        self.output = OutputProcessor(self.kv, self.grammar, tokenizer, eos_token_ids, context_len)
        self.num_forward_passes = 0

    # ---- the loop ----------------------------------------------------------------------

    def step(self) -> bool:
        """Run one batch; False when there was nothing to run."""
        plan = self.batcher.plan()
        if not plan:
            return False
        batch = self.batcher.build(plan)
        # Masks are filled on the grammar thread while the model runs.
        masks = self.grammar.start_masks([p.req for p in plan if p.samples])
        logits = self.runner.forward(batch)
        self.num_forward_passes += 1
        self.output.process(plan, logits, masks)
        self.batcher.drop_finished()
        return True

    # ---- requests in and out ---------------------------------------------------------

    def add(self, req: Req) -> None:
        """Queue a request. Text its grammar forces before any sampling is appended
        at once, so the prompt's prefill computes it too."""
        if req.matcher is not None and req.params.max_new_tokens > 0:
            try:
                self.output.start_constrained(req)
            except Exception as e:  # this request's grammar failed; nobody else is hurt
                self.output.fail(req, "grammar", e)
            if req.finished:
                req.sink(req.make_output())
                return
        self.batcher.waiting.append(req)

    def abort(self, rid: str, message: str = "aborted") -> bool:
        req = self.batcher.remove(rid)
        if req is None:
            return False
        self.output.finish(req, {"type": "abort", "message": message})
        req.sink(req.make_output())
        return True

    def abort_all(self, message: str) -> None:
        for req in list(self.waiting) + list(self.running):
            self.abort(req.rid, message)

    def has_work(self) -> bool:
        return bool(self.batcher.waiting or self.batcher.running)

    def flush_cache(self) -> bool:
        """Drop every cached prefix; refused (False) while requests are running."""
        if self.batcher.running:
            return False
        self.kv.flush()
        return True

    def close(self) -> None:
        self.grammar.close()

    # ---- what the engine reads ---------------------------------------------------------

    @property
    def waiting(self):
        return self.batcher.waiting

    @property
    def running(self) -> list[Req]:
        return self.batcher.running

    @property
    def cache(self) -> PrefixCache:
        return self.kv.cache

    @property
    def allocator(self) -> SlotAllocator:
        return self.kv.allocator

    @property
    def available_slots(self) -> int:
        return self.kv.available_slots
