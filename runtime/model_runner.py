"""ModelRunner: the model, its KV pool, the request-to-token table and the
attention backend, put together for one device; it owns all that device state.

``forward(batch)`` applies one ForwardBatch: it writes the batch's slot
indices into the request-to-token table, prepares the attention backend,
runs the model and returns fp32 logits for ``batch.logits_indices``. Nothing
else writes the table or the model's attributes.

A vision-language model's runner also holds its vision model (``vision``):
``encode_images`` runs it, ``embed`` looks token ids up in the embedding table;
the scheduler splices the two into a step's ``input_embeds``.
"""

from __future__ import annotations

import logging

import torch

from plait.kernels import kernel_set
from plait.multimodal.vision import VisionModel
from plait.runtime.attention import create_backend
from plait.runtime.batch import ForwardBatch
from plait.runtime.config import ModelConfig
from plait.runtime.kv_pool import KVPool, ReqToTokenPool
from plait.runtime.models.llama import LlamaFamilyModel, MRotaryEmbedding, RotaryEmbedding

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(
        self,
        cfg: ModelConfig,
        state_dict: dict[str, torch.Tensor],
        *,
        device: torch.device,
        dtype: torch.dtype,
        max_total_tokens: int,
        context_len: int,
        max_running_requests: int,
        attention_backend: str = "auto",
        vision: VisionModel | None = None,
    ):
        self.cfg, self.device, self.dtype = cfg, device, dtype
        self.context_len = context_len
        self.max_total_tokens = max_total_tokens  # KV slots in the pool
        self.max_running_requests = max_running_requests  # rows of the table
        ops = kernel_set(device, dtype)
        rope = MRotaryEmbedding if cfg.mrope_section else RotaryEmbedding
        rotary = rope(cfg, context_len, device)  # fp32 tables
        # Build on the meta device (no random init), then allocate and fill from the checkpoint.
        with torch.device("meta"):
            model = LlamaFamilyModel(cfg, ops, rotary)
        model = model.to_empty(device=device).to(dtype=dtype)
        model.load_hf_state_dict(state_dict)
        self.model = model.eval()
        self.vision = vision.to(device=device, dtype=dtype) if vision is not None else None
        if attention_backend == "auto":
            attention_backend = "cpu" if ops.fused else "torch"
        self.attention_backend = attention_backend
        self.kv_pool = KVPool(
            cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, max_total_tokens, dtype, device
        )
        self.req_to_token = ReqToTokenPool(max_running_requests, context_len, device)
        self.attn = create_backend(
            attention_backend,
            kv_pool=self.kv_pool,
            req_to_token=self.req_to_token,
            num_heads=cfg.num_heads,
            num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            sliding_window=cfg.sliding_window,
        )
        logger.info(
            "model %s on %s/%s (%s glue ops, %s attention); KV pool %d tokens (%.1f MiB)",
            cfg.architecture,
            device,
            dtype,
            "fused" if ops.fused else "torch",
            attention_backend,
            max_total_tokens,
            self.kv_pool.nbytes / 2**20,
        )

    @torch.inference_mode()
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Embedding-table rows [T, hidden] of token ids (a fresh tensor)."""
        return self.model.embed_tokens(input_ids)

    @torch.inference_mode()
    def encode_images(self, pixels: list[dict]) -> list[torch.Tensor]:
        """The vision model's embeddings of images, in the language model's dtype."""
        if self.vision is None:
            raise RuntimeError(f"{self.cfg.architecture} has no vision model")
        return [e.to(self.dtype) for e in self.vision.encode(pixels)]

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        self.req_to_token.write(batch.write_rows, batch.write_cols, batch.write_slots)
        self.attn.prepare(batch)
        positions = batch.positions if batch.mrope_positions is None else batch.mrope_positions
        hidden = self.model(batch.input_ids, positions, self.attn, batch.input_embeds)
        return self.model.logits(hidden.index_select(0, batch.logits_indices))
