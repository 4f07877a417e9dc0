"""A request as the scheduler sees it, and the result dicts it sends back.

Result dicts have SGLang's shape: ``text``, ``output_ids`` and ``meta_info``
(id, prompt_tokens, completion_tokens, cached_tokens, finish_reason,
e2e_latency and, when asked, the logprobs as ``[logprob, token_id, text|None]``
triples).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Any

import torch

from plait.multimodal.vision import ImageItem, image_key_ids
from plait.runtime.constrained import CompiledResult, GrammarSpec, Matcher
from plait.runtime.detokenizer import IncrementalDetokenizer
from plait.runtime.sampling_params import SamplingParams

# A sink receives each result dict (or an exception) for one request.
Sink = Callable[[Any], None]


class Req:
    def __init__(
        self,
        rid: str,
        input_ids: list[int],
        params: SamplingParams,
        *,
        sink: Sink,
        detokenizer: IncrementalDetokenizer,
        generator: torch.Generator | None,
        stream: bool = False,
        return_logprob: bool = False,
        logprob_start_len: int | None = None,
        top_logprobs_num: int = 0,
        return_text_in_logprobs: bool = False,
        jump_forward: bool = True,
        image_items: list[ImageItem] | None = None,
        mrope: tuple[torch.Tensor | None, int] = (None, 0),
        cache_namespace: Hashable | None = None,
    ):
        self.rid = rid
        self.input_ids = input_ids
        self.params = params
        self.sink = sink
        self.detok = detokenizer
        self.generator = generator
        self.stream = stream
        self.return_logprob = return_logprob
        self.top_logprobs_num = top_logprobs_num if return_logprob else 0
        self.return_text_in_logprobs = return_text_in_logprobs
        # Input logprobs cover prompt positions [logprob_start, len(input_ids)).
        n = len(input_ids)
        start = n - 1 if logprob_start_len is None or logprob_start_len < 0 else logprob_start_len
        self.logprob_start = min(max(start, 0), n) if return_logprob else n
        # Images: their placeholder positions in input_ids and their embeddings (spliced
        # in by the scheduler). The prefix cache keys the request by ``key_ids``: the
        # prompt with each image's placeholders replaced by an id derived from the image's
        # content hash, so the same image in the same place shares a prefix and another
        # image diverges at its first placeholder. The model still sees input_ids.
        self.image_items: list[ImageItem] = image_items or []
        self.key_ids: list[int] = image_key_ids(input_ids, self.image_items)
        # Prefixes are shared only within one namespace (a request's extra_key).
        self.cache_namespace = cache_namespace
        # M-RoPE models (Qwen2-VL): the prompt's [3, T] rotary positions when it has images
        # (None: token i is at i on all three axes), and the delta added to the index of
        # each generated token (scheduler/mrope.py).
        self.mrope_positions, self.mrope_delta = mrope

        # Constrained decoding (set_grammar): the compiled grammar and this request's
        # place in it. Jump-forward is off when logprobs are asked for (forced tokens
        # get none).
        self.grammar_future: Future[CompiledResult] | None = None
        self.grammar_spec: GrammarSpec | None = None
        self.grammar: CompiledResult | None = None
        self.matcher: Matcher | None = None
        self.jump_forward = jump_forward and not return_logprob
        self.forced_tokens = 0  # output tokens appended by jump-forward, without a decode step
        self.closed_tokens = 0  # output tokens appended by budget-aware closing
        self.closing: Any = None  # budget-aware closing state (constrained/closing.py)

        self.output_ids: list[int] = []
        self.row: int | None = None  # row of the request-to-token table while running
        self.cached_tokens = 0  # prompt tokens found in the prefix cache at admission
        self.tree_len = 0  # leading tokens whose KV slots the prefix cache owns
        self.last_node: Any = None  # the locked cache node covering those tokens
        self.num_computed = 0  # tokens whose KV is in the pool
        self.reserved_left = 0  # KV slots promised at admission and not yet allocated
        self.finish_reason: dict[str, Any] | None = None
        self.input_logprobs: list[list[Any]] = []
        self.input_top_logprobs: list[Any] = []
        self.output_logprobs: list[list[Any]] = []
        self.output_top_logprobs: list[Any] = []
        self._sent_ids = 0
        self._sent_input_logprobs = 0
        self._sent_output_logprobs = 0
        self.created = time.perf_counter()
        self.given_rid = rid  # the rid the caller gave (``x`` for the parts of an n=2 ``x``)
        self.capped_max_new_tokens: int | None = None  # set when the context capped it

    def set_grammar(self, grammar: CompiledResult) -> None:
        self.grammar = grammar
        self.matcher = grammar.grammar.matcher()

    @property
    def fill_len(self) -> int:
        return len(self.input_ids) + len(self.output_ids)

    def cache_key(self, end: int) -> list[int]:
        """The prefix cache's key of the first ``end`` tokens (prompt, then output)."""
        n = len(self.key_ids)
        if end <= n:
            return self.key_ids[:end]
        return self.key_ids + self.output_ids[: end - n]

    def fill_ids(self, start: int, end: int) -> list[int]:
        n = len(self.input_ids)
        if end <= n:
            return self.input_ids[start:end]
        if start >= n:
            return self.output_ids[start - n : end - n]
        return self.input_ids[start:] + self.output_ids[: end - n]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def stream_due(self) -> bool:
        """A streamed request sends a piece every ``stream_interval`` new tokens."""
        return len(self.output_ids) - self._sent_ids >= self.params.stream_interval

    @property
    def kv_needed(self) -> int:
        """KV slots this request may use beyond its cached prefix."""
        return len(self.input_ids) + self.params.max_new_tokens - self.cached_tokens

    # ---- results -------------------------------------------------------------

    def triple(self, logprob: float | None, token_id: int, decode: Callable[[int], str]) -> list:
        return [logprob, token_id, decode(token_id) if self.return_text_in_logprobs else None]

    def make_output(self) -> dict[str, Any]:
        """The next result dict: the whole result when not streaming, else the new piece."""
        final = self.finished
        if self.stream:
            text = self.detok.release(final)
            ids = self.output_ids[self._sent_ids :]
            self._sent_ids = len(self.output_ids)
        else:
            text, ids = self.detok.text, list(self.output_ids)
        meta: dict[str, Any] = {
            "id": self.rid,
            "prompt_tokens": len(self.input_ids),
            "completion_tokens": len(self.output_ids),
            "cached_tokens": self.cached_tokens,
            "finish_reason": self.finish_reason,
            "e2e_latency": time.perf_counter() - self.created,
        }
        if self.capped_max_new_tokens is not None:
            meta["capped_max_new_tokens"] = self.capped_max_new_tokens
        if self.grammar is not None:
            meta["grammar_backend"] = self.grammar.backend
            if self.grammar.fallback_reason:
                meta["grammar_fallback"] = self.grammar.fallback_reason
            # Each forced token is a decode step (one forward pass) not run.
            meta["forced_tokens"] = meta["forward_passes_saved"] = self.forced_tokens
            meta["closed_tokens"] = self.closed_tokens
        if self.return_logprob:
            meta.update(self._logprobs_piece())
        return {"text": text, "output_ids": ids, "meta_info": meta}

    def _logprobs_piece(self) -> dict[str, Any]:
        i0, o0 = (self._sent_input_logprobs, self._sent_output_logprobs) if self.stream else (0, 0)
        self._sent_input_logprobs = len(self.input_logprobs)
        self._sent_output_logprobs = len(self.output_logprobs)
        return {
            "input_token_logprobs": self.input_logprobs[i0:],
            "output_token_logprobs": self.output_logprobs[o0:],
            "input_top_logprobs": self.input_top_logprobs[i0:],
            "output_top_logprobs": self.output_top_logprobs[o0:],
        }
