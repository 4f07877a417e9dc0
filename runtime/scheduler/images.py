"""ImageSplicer: the input embeddings of a step whose rows include image placeholders.

A step computes rows ``[start, start + extend)`` of each planned request. Rows
that are placeholder positions of one of the request's images take that image's
embedding rows; every other row is the embedding table's row for its token.
Chunked prefill may cut an image anywhere: only the placeholders inside the
step's range are written, so a chunk takes the matching slice of the image's
embeddings (found by bisecting the image's sorted positions).

Images are encoded when a step first needs them, all the new images of the
step in one vision-model call; an image whose placeholders all come from the
prefix cache is never encoded. Encoder outputs go through the vision-embedding
cache (``EmbeddingCache``, keyed by content hash and processor settings), so an
image seen before, by this request or another, is not encoded again. Encoding
drops the image's pixel tensors.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from plait.multimodal.embedding_cache import EmbeddingCache, cache_key
from plait.multimodal.vision import ImageItem

if TYPE_CHECKING:
    from plait.runtime.scheduler.batching import Planned


class ImageSplicer:
    def __init__(
        self,
        embed: Callable[[torch.Tensor], torch.Tensor],
        encode: Callable[[list[dict[str, Any]]], list[torch.Tensor]],
        cache: EmbeddingCache | None = None,
        settings: Hashable = None,
    ):
        self.embed = embed  # token ids [T] -> embedding-table rows [T, hidden]
        self.encode = encode  # the vision model's encode
        self.cache = cache if cache is not None else EmbeddingCache(0)  # 0: keeps nothing
        self.settings = settings  # the processor settings that shaped the pixels
        self.num_encoded = 0  # images run through the vision model

    def input_embeds(self, plan: Sequence[Planned], input_ids: torch.Tensor) -> torch.Tensor | None:
        """The step's input embeddings [T, hidden], or None when no row is an image
        placeholder (the model then looks the ids up itself). ``p.start`` of each
        planned request must be set (rows laid out in plan order)."""
        # (first batch row of the request minus its start, image, slice of its positions)
        touched: list[tuple[int, ImageItem, int, int]] = []
        offset = 0
        for p in plan:
            start, end = p.start, p.start + p.extend
            for item in p.req.image_items:
                lo = bisect_left(item.positions, start)
                hi = bisect_left(item.positions, end)
                if lo < hi:
                    touched.append((offset - start, item, lo, hi))
            offset += p.extend
        if not touched:
            return None
        with torch.inference_mode():
            new = [item for _, item, _, _ in touched if item.embeddings is None]
            if new:
                self._set_embeddings(list(dict.fromkeys(new)))  # in first-use order
            embeds = self.embed(input_ids)
            for base, item, lo, hi in touched:
                rows = torch.tensor(
                    [base + q for q in item.positions[lo:hi]],
                    dtype=torch.int64,
                    device=embeds.device,
                )
                embeds.index_copy_(0, rows, item.embeddings[lo:hi].to(embeds.dtype))
        return embeds

    def _set_embeddings(self, items: list[ImageItem]) -> None:
        """Each item's embeddings, from the cache or from one encoder call for the
        images the cache lacks (each distinct image once)."""

        def encode(positions: list[int]) -> list[torch.Tensor]:
            self.num_encoded += len(positions)
            return self.encode([items[i].pixels for i in positions])

        keys = [cache_key(item.content_hash, self.settings) for item in items]
        for item, rows in zip(items, self.cache.get_or_encode(keys, encode)):
            item.set_embeddings(rows)
