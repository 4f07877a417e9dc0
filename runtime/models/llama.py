"""The Llama family in one page of torch: Llama (SmolLM2), Qwen2, Mistral.

What differs between them is configuration, not code: grouped-query
attention (num_kv_heads), q/k/v biases (Qwen2), tied or untied embeddings,
RoPE theta and scaling, and a sliding window (Mistral). Projections that read
the same input are fused (q|k|v and gate|up) into one matmul each.

The forward runs over a flattened ragged batch (see ForwardBatch) and reads
and writes K/V only through the attention backend, which the runner has
prepared for the batch. The glue between the matmuls (norms, RoPE, SiLU)
goes through ``self.ops``, a plait.kernels KernelSet the runner picks for its
device and dtype (fused compiled ops on CPU in float32, torch references
elsewhere); ops and rotary tables are given at construction.
The residual stream is updated in place and each residual add is fused with
the norm after it:

    h = norm_0(x)
    per layer i:  x += attn(h); h = post_norm_i(x); x += mlp(h); h = norm_{i+1}(x)

where norm_{L} is the final norm.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from plait import switches
from plait.kernels import KernelSet
from plait.runtime.attention.base import AttentionBackend
from plait.runtime.config import ModelConfig

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")


def _onednn_packs(weight: torch.Tensor) -> bool:
    """Whether a matmul weight goes to oneDNN's packed layout (CPU, fp32; PLAIT_ONEDNN=0 opts out)."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and switches.ONEDNN.value()
    )


class Linear(nn.Module):
    """y = x W^T (+ b) for a checkpoint weight W [out, in], kept in the layout that
    multiplies fastest where the model runs.

    On CPU in fp32, ``load`` reorders W once into oneDNN's blocked layout (an opaque
    tensor, ``self.packed``) and frees the plain copy. On a 2-core AVX2 machine with
    SmolLM2-135M's shapes that is 2.3x faster than MKL at 8 rows, 1.8x at 32 and 1.15x
    at 256, and the same (within 3%) at one row. Elsewhere W is stored [in, out] and
    multiplied as x @ W (MKL runs one row 1.35x faster in that layout than [out, in]).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.packed: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        if self.bias is None:
            return x @ self.weight
        return torch.addmm(self.bias, x, self.weight)

    @torch.no_grad()
    def load(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Load from the [out, in] layout checkpoints use."""
        if bias is not None:
            self.bias.copy_(bias)
        if _onednn_packs(self.weight):
            plain = weight.to(self.weight.dtype).contiguous()
            self.packed = torch.ops.mkldnn._reorder_linear_weight(plain, None)
            self.weight = None  # the packed copy is the only one
        else:
            self.weight.copy_(weight.t())


class RMSNorm(nn.Module):
    """An RMSNorm's weight and epsilon; the model applies it through its KernelSet
    (``rms_norm``, or ``add_rms_norm`` fused with the residual add before it)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps


def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies for the config's RoPE type, and the cos/sin scale."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are slowed by `factor`, short ones kept, the band between blended.
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(medium, blended, scaled)
    return inv_freq, 1.0


class RotaryEmbedding:
    """cos/sin tables for every position, computed once in fp32 (on the CPU, then
    moved to ``device``); calling it picks the rows [T, head_dim] of a batch's
    positions, shared by all layers. Not a module: moving or casting the model
    leaves the tables alone."""

    def __init__(self, cfg: ModelConfig, max_positions: int, device: torch.device | str = "cpu"):
        inv_freq, scale = rope_inv_freq(cfg)
        pos = torch.arange(max_positions, dtype=torch.float32, device="cpu")
        freqs = pos[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = (emb.cos() * scale).to(device)
        self.sin = (emb.sin() * scale).to(device)

    def __call__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos.index_select(0, positions), self.sin.index_select(0, positions)


class MRotaryEmbedding(RotaryEmbedding):
    """Multimodal RoPE (Qwen2-VL): a token has three positions (temporal, height, width)
    and each rotary frequency follows one of them: the first ``mrope_section[0]``
    frequencies the temporal position, the next ``mrope_section[1]`` the height, the
    rest the width (the same split on both halves of the head). The tables are plain
    RoPE's; positions ``[3, T]`` pick each column from its axis' row. A batch given
    ``[T]`` positions (all three axes equal: text) is plain RoPE."""

    def __init__(self, cfg: ModelConfig, max_positions: int, device: torch.device | str = "cpu"):
        super().__init__(cfg, max_positions, device)
        section = cfg.mrope_section
        if sum(section) * 2 != cfg.head_dim:
            raise ValueError(f"mrope_section {section} does not cover head_dim {cfg.head_dim}")
        half = torch.cat([torch.full((n,), i % 3) for i, n in enumerate(section)])
        self.axis = torch.cat((half, half)).to(device)  # [head_dim]: the axis of each column

    def __call__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if positions.dim() == 1:
            return super().__call__(positions)
        index = self.axis.expand(1, positions.shape[1], -1)  # [1, T, head_dim]
        cos = self.cos[positions].gather(0, index)[0]
        sin = self.sin[positions].gather(0, index)[0]
        return cos, sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        )
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = Linear(
            cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias
        )
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn: AttentionBackend,
        ops: KernelSet,
    ) -> torch.Tensor:
        T, H, Hkv, D = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x)
        # q and k heads sit side by side: rotate them in one pass, in place.
        ops.rope_(qkv, cos, sin, H + Hkv, D)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        out = attn.forward(q.view(T, H, D), k.view(T, Hkv, D), v.view(T, Hkv, D), self.layer)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.inter = cfg.intermediate_size
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor, ops: KernelSet) -> torch.Tensor:
        return self.down_proj(ops.silu_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn: AttentionBackend,
        ops: KernelSet,
        next_norm: RMSNorm,
    ) -> torch.Tensor:
        """x: the residual stream (updated in place); h: this layer's normed input.
        Returns the next layer's normed input (``next_norm`` of the new x)."""
        post = self.post_attention_layernorm
        h = ops.add_rms_norm(x, self.self_attn(h, cos, sin, attn, ops), post.weight, post.eps)
        return ops.add_rms_norm(x, self.mlp(h, ops), next_norm.weight, next_norm.eps)


class LlamaFamilyModel(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: KernelSet, rotary: RotaryEmbedding):
        super().__init__()
        self.cfg = cfg
        self.ops = ops
        self.rotary = rotary
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # Kept apart from the embedding even when tied: the lookup wants [vocab, hidden],
        # the output matmul [hidden, vocab].
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionBackend,
        input_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final hidden states (after the last norm) of every token of a batch: [T, hidden].
        ``positions`` is [T], or [3, T] for M-RoPE; ``attn`` is prepared for the batch; ``input_embeds`` [T, hidden], when given,
        replaces the embedding lookup of ``input_ids``."""
        ops = self.ops
        if input_embeds is None:
            x = self.embed_tokens(input_ids)  # a fresh tensor: the residual stream
        else:
            x = input_embeds.to(self.embed_tokens.weight.dtype, copy=True)
        cos, sin = (t.to(x.dtype) for t in self.rotary(positions))
        first = self.layers[0].input_layernorm
        h = ops.rms_norm(x, first.weight, first.eps)
        norms = [layer.input_layernorm for layer in self.layers[1:]] + [self.norm]
        for layer, next_norm in zip(self.layers, norms):
            h = layer(x, h, cos, sin, attn, ops, next_norm)
        return h

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits in fp32 for the given hidden rows."""
        return self.lm_head(hidden).float()

    @torch.inference_mode()
    def load_hf_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Copy weights named as in transformers' Llama/Qwen2/Mistral into this model,
        fusing q|k|v and gate|up. Fails loudly on a missing or unexpected tensor."""
        sd = {k.removeprefix("model."): v for k, v in sd.items()}
        used: set[str] = set()

        def take(name: str) -> torch.Tensor:
            if name not in sd:
                raise KeyError(f"checkpoint has no tensor {name!r}")
            used.add(name)
            return sd[name]

        def cat(*names: str) -> torch.Tensor:
            return torch.cat([take(n) for n in names], dim=0)

        self.embed_tokens.weight.copy_(take("embed_tokens.weight"))
        self.norm.weight.copy_(take("norm.weight"))
        for i, layer in enumerate(self.layers):
            p = f"layers.{i}."
            a = p + "self_attn."
            layer.input_layernorm.weight.copy_(take(p + "input_layernorm.weight"))
            layer.post_attention_layernorm.weight.copy_(take(p + "post_attention_layernorm.weight"))
            qkv_bias = None
            if self.cfg.attention_bias:
                qkv_bias = cat(a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias")
            layer.self_attn.qkv_proj.load(
                cat(a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"), qkv_bias
            )
            layer.self_attn.o_proj.load(take(a + "o_proj.weight"))
            m = p + "mlp."
            gate_up_bias = down_bias = None
            if self.cfg.mlp_bias:
                gate_up_bias = cat(m + "gate_proj.bias", m + "up_proj.bias")
                down_bias = take(m + "down_proj.bias")
            layer.mlp.gate_up_proj.load(
                cat(m + "gate_proj.weight", m + "up_proj.weight"), gate_up_bias
            )
            layer.mlp.down_proj.load(take(m + "down_proj.weight"), down_bias)
        if self.cfg.tie_word_embeddings:
            used.add("lm_head.weight")
            self.lm_head.load(self.embed_tokens.weight)
        else:
            self.lm_head.load(take("lm_head.weight"))
        unexpected = sorted(k for k in sd if k not in used and "rotary_emb" not in k)
        if unexpected:
            raise KeyError(
                f"checkpoint tensors not used by {self.cfg.architecture}: {unexpected[:5]}"
            )
