"""Configuration objects: the model's shape (read from a HF config) and the
engine's options. Both are frozen; derived values are properties."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from plait.runtime.attention import ATTENTION_BACKENDS
from plait.runtime.loader import VISION_LANGUAGE_ARCHITECTURES

_ROPE_TYPES = ("default", "linear", "llama3")
# Qwen2 language models (q/k/v biases), also as the text side of Qwen2-VL / Qwen2.5-VL.
_QWEN2_TEXT = ("qwen2", "qwen2_vl_text", "qwen2_5_vl_text")
# Language models with M-RoPE, and transformers' sections when a config gives none.
_MROPE_TEXT = ("qwen2_vl_text", "qwen2_5_vl_text")
_DEFAULT_MROPE_SECTION = (16, 24, 24)
GRAMMAR_BACKENDS = ("llguidance", "outlines")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    rope_theta: float
    rope_scaling: dict[str, Any] | None = None
    sliding_window: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # M-RoPE (Qwen2-VL): how many rotary frequencies follow the temporal, height and
    # width positions, in that order; None for plain RoPE.
    mrope_section: tuple[int, ...] | None = None

    @property
    def has_vision(self) -> bool:
        """A vision-language model: this is the shape of its language model."""
        return self.architecture in VISION_LANGUAGE_ARCHITECTURES

    @classmethod
    def from_hf(cls, hf: Any) -> ModelConfig:
        """Read a transformers config (v4 or v5 field layout). For a vision-language
        model, the shape of its language model (``text_config``)."""
        arch = (getattr(hf, "architectures", None) or [type(hf).__name__])[0]
        if arch in VISION_LANGUAGE_ARCHITECTURES:
            text = cls.from_hf(hf.text_config)
            # lm_head.weight is always in the loaded weights (tied or not): load it as is.
            return dataclasses.replace(text, architecture=arch, tie_word_embeddings=False)
        heads = hf.num_attention_heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
        # transformers 5 keeps RoPE settings in `rope_parameters`; 4.x in rope_theta/rope_scaling.
        rope = dict(getattr(hf, "rope_parameters", None) or {})
        theta = rope.pop("rope_theta", None) or getattr(hf, "rope_theta", None) or 10000.0
        scaling = rope or dict(getattr(hf, "rope_scaling", None) or {})
        mrope = scaling.pop("mrope_section", None)
        if mrope is None and getattr(hf, "model_type", "") in _MROPE_TEXT:
            mrope = _DEFAULT_MROPE_SECTION
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type not in _ROPE_TYPES:
            raise ValueError(
                f"rope type {rope_type!r} of {arch} is not supported; supported: {_ROPE_TYPES}"
            )
        scaling = None if rope_type == "default" else {**scaling, "rope_type": rope_type}
        sliding = getattr(hf, "sliding_window", None)
        if getattr(hf, "model_type", "") == "qwen2" and not getattr(
            hf, "use_sliding_window", False
        ):
            sliding = None
        eos = getattr(hf, "eos_token_id", None)
        eos_ids = (
            tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        )
        return cls(
            architecture=arch,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            rms_norm_eps=hf.rms_norm_eps,
            max_position_embeddings=hf.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases; Llama/Mistral only when attention_bias is set.
            attention_bias=bool(getattr(hf, "attention_bias", False))
            or getattr(hf, "model_type", "") in _QWEN2_TEXT,
            mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            rope_theta=float(theta),
            rope_scaling=scaling,
            sliding_window=sliding,
            eos_token_ids=eos_ids,
            mrope_section=tuple(mrope) if mrope else None,
        )


@dataclass(frozen=True)
class EngineConfig:
    """Options of an Engine; every field can be passed to ``plait.Engine(...)``."""

    model: str = "smollm2"
    device: str | None = None  # None: CUDA when present, else CPU
    dtype: str | None = None  # None: bf16 on CUDA, fp32 on CPU
    attention_backend: str = "auto"  # auto: "cpu" (fused kernels) on CPU in fp32, else "torch"
    # KV cache size: max_total_tokens wins; else kv_cache_memory_gb.
    max_total_tokens: int | None = None
    kv_cache_memory_gb: float = 1.0
    context_length: int | None = None  # default: the model's max_position_embeddings
    max_running_requests: int = 64
    chunked_prefill_size: int = 2048
    schedule_policy: str = "lpm"
    disable_radix_cache: bool = False
    # Vision-embedding cache budget (GiB) of an image model's encoder outputs; 0 keeps none.
    mm_cache_memory_gb: float = 0.5
    # Constrained decoding: the primary grammar backend (the others are fallbacks),
    # the deadline of a slow (outlines) compile, and jump-forward over forced text.
    grammar_backend: str = "llguidance"
    grammar_compile_timeout_s: float = 10.0
    disable_jump_forward: bool = False
    # The most top logprobs one request may ask for per position (OpenAI's cap).
    max_top_logprobs_num: int = 20
    num_threads: int | None = None  # torch intra-op threads on CPU; None leaves torch's default
    random_seed: int | None = None
    cache_dir: str | None = None
    # The level of the "plait" loggers; None leaves logging as the application set it.
    log_level: str | None = None

    def __post_init__(self) -> None:
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention_backend={self.attention_backend!r}: supported: {list(ATTENTION_BACKENDS)}"
            )
        if self.max_total_tokens is not None and self.max_total_tokens < 1:
            raise ValueError(f"max_total_tokens={self.max_total_tokens!r}: must be >= 1")
        if self.kv_cache_memory_gb <= 0:
            raise ValueError(f"kv_cache_memory_gb={self.kv_cache_memory_gb!r}: must be > 0")
        if not self.mm_cache_memory_gb >= 0:  # NaN too
            raise ValueError(
                f"mm_cache_memory_gb={self.mm_cache_memory_gb!r}: must be >= 0 (0 keeps no "
                "image embeddings)"
            )
        if self.max_running_requests < 1:
            raise ValueError(f"max_running_requests={self.max_running_requests!r}: must be >= 1")
        if self.chunked_prefill_size < 1:
            raise ValueError(f"chunked_prefill_size={self.chunked_prefill_size!r}: must be >= 1")
        if self.grammar_backend not in GRAMMAR_BACKENDS:
            raise ValueError(
                f"grammar_backend={self.grammar_backend!r}: supported: {list(GRAMMAR_BACKENDS)}"
            )
        if self.max_top_logprobs_num < 0:
            raise ValueError(f"max_top_logprobs_num={self.max_top_logprobs_num!r}: must be >= 0")
        if self.grammar_compile_timeout_s <= 0:
            raise ValueError(
                f"grammar_compile_timeout_s={self.grammar_compile_timeout_s!r}: must be > 0"
            )
        if self.schedule_policy not in ("lpm", "fcfs"):
            raise ValueError(
                f"schedule_policy={self.schedule_policy!r}: supported: ['lpm', 'fcfs']"
            )

    @property
    def mm_cache_bytes(self) -> int:
        """The vision-embedding cache's budget in bytes."""
        return int(self.mm_cache_memory_gb * 2**30)
