"""The Scheduler: continuous batching over one ModelRunner, put together from
its parts (see the package docstring for the life of a request)."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from plait.multimodal.embedding_cache import EmbeddingCache
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
        image_cache: EmbeddingCache | None = None,
        image_settings: Hashable = None,
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
            images = ImageSplicer(runner.embed, runner.encode_images, image_cache, image_settings)
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
        """Drop every cached prefix (and image embedding); refused (False) while
        requests are running."""
        if self.batcher.running:
            return False
        self.kv.flush()
        if self.batcher.images is not None:
            self.batcher.images.cache.clear()
        return True

    def close(self) -> None:
        self.grammar.close()

    # ---- what the engine reads ---------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Live figures: queues, KV slots, the prefix cache and, for a vision-language
        model, the vision-embedding cache and the images encoded."""
        free = self.allocator.num_free
        cache = self.cache
        stats = {
            "num_running_reqs": len(self.running),
            "num_waiting_reqs": len(self.waiting),
            "kv_slots_free": free,
            "kv_slots_used": self.allocator.size - free,
            "num_forward_passes": self.num_forward_passes,
            "cache_tokens": cache.total_size,
            "cache_hit_tokens": cache.stats.hit_tokens,
            "cache_query_tokens": cache.stats.query_tokens,
            "cache_hit_rate": cache.stats.hit_rate,
        }
        images = self.batcher.images
        if images is not None:
            stats.update(images.cache.stats().as_dict(), num_images_encoded=images.num_encoded)
        return stats

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
