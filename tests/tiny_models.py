"""Tiny random models (and their tokenizer) saved with ``save_pretrained`` for the tests.

Everything is deterministic: the tokenizer is trained on a built-in corpus and the
weights are drawn after ``torch.manual_seed(seed)``, so two calls with the same arguments
write identical files.
"""

from __future__ import annotations

import os
import pathlib

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2
VOCAB_SIZE = 512
DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant."

# ChatML, like SmolLM2's template: a default system prompt when none is given.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CORPUS = """\
The quick brown fox jumps over the lazy dog. A small language model reads text one token
at a time and predicts the next one. When the same prefix appears in many requests, its
key and value tensors can be computed once and shared, which saves a great deal of work.

An agent program asks a question, waits for an answer, and then asks another question that
depends on the first answer. The runtime keeps the conversation in a tree of token runs, so
that every branch of the program can start from the longest prefix it has already seen.

Structured output matters: a model that must answer in JSON should only produce tokens that
keep the text valid. {"name": "Alice", "age": 31, "city": "Paris", "tags": ["a", "b"]}
Numbers like 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 and 3.14159 appear in answers too.

Hello, world! How are you today? I am fine, thank you. What is the capital of France?
The capital of France is Paris. What is two plus two? Two plus two is four. Yes or no?
Images, tools and diffusion models can be called from the same program; the system and the
user take turns with the assistant, and each turn ends with a special marker.
"""


def make_tokenizer(path: str | os.PathLike) -> transformers.PreTrainedTokenizerFast:
    """Train a tiny byte-level BPE (vocab 512) with a ChatML template and save it to ``path``."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<|endoftext|>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        model_max_length=512,
    )
    fast.chat_template = CHAT_TEMPLATE
    pathlib.Path(path).mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(path)
    return fast


_CONFIGS = {
    "llama": transformers.LlamaConfig,
    "qwen2": transformers.Qwen2Config,
    "mistral": transformers.MistralConfig,
}


def make_tiny_model(
    path: str | os.PathLike,
    arch: str = "llama",
    *,
    tie_word_embeddings: bool = True,
    num_key_value_heads: int = 2,
    rope_scaling: dict | None = None,
    seed: int = 0,
    **overrides,
) -> str:
    """Save a 2-layer random ``arch`` model (hidden 64, 4 heads) plus tokenizer into ``path``.

    Weights are drawn with a large ``initializer_range`` and random norm weights / biases,
    so greedy continuations depend on the prompt and a model implementation that drops a
    norm weight or a bias gives different logits.
    """
    if arch not in _CONFIGS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(_CONFIGS)}")
    path = pathlib.Path(path)
    tokenizer = make_tokenizer(path)
    kwargs = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=512,
        initializer_range=0.3,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if arch == "mistral":
        kwargs["sliding_window"] = None
    if rope_scaling is not None:
        kwargs["rope_scaling"] = rope_scaling
    kwargs.update(overrides)
    config = _CONFIGS[arch](**kwargs)

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            elif name.endswith(".bias"):
                param.copy_(0.1 * torch.randn_like(param))
    model.eval()
    model.save_pretrained(path)
    return str(path)


# ---- a tiny vision-language model ------------------------------------------------------------


def random_vlm(model_class, config, seed: int, norms: tuple[str, ...] = ("norm.weight",)):
    """A vision-language model with seeded random weights large enough that its greedy
    tokens depend on the image: norm weights (names ending in ``norms``) near 1, small
    biases, N(0, 0.3) matrices."""
    torch.manual_seed(seed)
    model = model_class(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(norms):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            elif name.endswith(".bias"):
                param.copy_(0.1 * torch.randn_like(param))
            elif param.dim() >= 2:
                param.normal_(0.0, 0.3)
    return model.eval()


def tiny_text_kwargs(tokenizer, **extra) -> dict:
    """The language model of every tiny vision-language model: 2 layers, hidden 64,
    grouped-query attention (4 heads, 2 KV heads), untied embeddings."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


# The tokens an Idefics3 / SmolVLM tokenizer carries for images, as special tokens.
IDEFICS3_TOKENS = (
    "<fake_token_around_image>",
    "<image>",
    "<end_of_utterance>",
    "<global-img>",
    *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)),
)
# SmolVLM's layout: "User:<image>text<end_of_utterance>\nAssistant:".
IDEFICS3_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}{{ '<image>' }}{% endif %}"
    "{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
# A tile is 32x32 pixels of 8x8 patches: 16 patches, 4 tokens after the 2x2 pixel shuffle.
# Images are scaled to a longest edge of 64, so an image is 2 to 4 tiles plus its global view.
IDEFICS3_TILE = 32


def make_tiny_idefics3(path: str | os.PathLike, *, seed: int = 0) -> str:
    """Save a random Idefics3 (SmolVLM's architecture) with its processor into ``path``:
    a 2-layer SigLIP-style encoder (hidden 32, 32-pixel tiles), the pixel-shuffle
    connector and a 2-layer Llama (hidden 64) on the tiny tokenizer plus the image tokens."""
    path = pathlib.Path(path)
    tokenizer = make_tokenizer(path)
    tokenizer.add_tokens(list(IDEFICS3_TOKENS), special_tokens=True)
    image_processor = transformers.Idefics3ImageProcessorPil(
        size={"longest_edge": 2 * IDEFICS3_TILE},
        max_image_size={"longest_edge": IDEFICS3_TILE},
    )
    processor = transformers.Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=(IDEFICS3_TILE // 8) ** 2 // 4,
        chat_template=IDEFICS3_CHAT_TEMPLATE,
    )
    text_config = transformers.LlamaConfig(**tiny_text_kwargs(tokenizer))
    vision_config = transformers.Idefics3VisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IDEFICS3_TILE,
        patch_size=8,
    )
    config = transformers.Idefics3Config(
        text_config=text_config.to_dict(),
        vision_config=vision_config.to_dict(),
        scale_factor=2,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        tie_word_embeddings=False,
    )
    random_vlm(transformers.Idefics3ForConditionalGeneration, config, seed).save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


# LLaVA's layout (llava-1.5's): "USER: <image>\ntext ASSISTANT: answer", a message's images
# before its text; turn by turn, so plait's DSL can cut its role prefixes from it.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'USER: ' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'ASSISTANT:' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\\n' }}{% endfor %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ part['text'] }}{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ ' ' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|im_end|>' }}{% else %}{{ '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# An image is a 32x32 crop of 8x8 patches: 16 image tokens (CLIP's CLS row is dropped by the
# "default" strategy; SigLIP has none and keeps every row with "full").
LLAVA_IMAGE = 32


def make_tiny_llava(
    path: str | os.PathLike, *, text: str = "llama", vision: str = "clip", seed: int = 0
) -> str:
    """Save a random LLaVA with its processor into ``path``: a 3-layer CLIP or SigLIP
    encoder (hidden 32, 32-pixel crops of 8-pixel patches), the two-layer MLP projector
    and a 2-layer ``text`` ("llama" / "qwen2" / "mistral") language model (hidden 64) on
    the tiny tokenizer plus ``<image>``.

    CLIP reads the second-to-last layer and drops the CLS row (llava-1.5's settings);
    SigLIP concatenates two layers' features and keeps every row (a list-valued
    ``vision_feature_layer`` with the "full" strategy)."""
    if text not in _CONFIGS or vision not in ("clip", "siglip"):
        raise ValueError(f"unknown LLaVA variant text={text!r} vision={vision!r}")
    path = pathlib.Path(path)
    tokenizer = make_tokenizer(path)
    if text == "llama":  # a Llama tokenizer starts every encoding with BOS
        bos = (tokenizer.bos_token, tokenizer.bos_token_id)
        tokenizer.backend_tokenizer.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(single=f"{bos[0]} $A", special_tokens=[bos]),
            ]
        )
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    size = {"height": LLAVA_IMAGE, "width": LLAVA_IMAGE}
    vision_kwargs = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=LLAVA_IMAGE,
        patch_size=8,
    )
    if vision == "clip":
        image_processor = transformers.CLIPImageProcessorPil(
            size={"shortest_edge": LLAVA_IMAGE}, crop_size=size
        )
        vision_config = transformers.CLIPVisionConfig(**vision_kwargs, projection_dim=32)
        settings = dict(vision_feature_layer=-2, vision_feature_select_strategy="default")
        extra_tokens = 1  # CLS
    else:
        image_processor = transformers.SiglipImageProcessorPil(size=size)
        vision_config = transformers.SiglipVisionConfig(**vision_kwargs)
        settings = dict(vision_feature_layer=[-3, -1], vision_feature_select_strategy="full")
        extra_tokens = 0
    processor = transformers.LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy=settings["vision_feature_select_strategy"],
        num_additional_image_tokens=extra_tokens,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    text_kwargs = tiny_text_kwargs(tokenizer)
    if text == "mistral":
        text_kwargs["sliding_window"] = None
    text_config = _CONFIGS[text](**text_kwargs)
    config = transformers.LlavaConfig(
        text_config=text_config.to_dict(),
        vision_config=vision_config.to_dict(),
        image_token_id=image_token_id,
        image_seq_length=(LLAVA_IMAGE // 8) ** 2,
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
        **settings,
    )
    norms = ("norm.weight", "layer_norm1.weight", "layer_norm2.weight")
    random_vlm(transformers.LlavaForConditionalGeneration, config, seed, norms).save_pretrained(
        path
    )
    processor.save_pretrained(path)
    return str(path)


# ---- a tiny Qwen2-VL / Qwen2.5-VL -------------------------------------------------------------

# The tokens a Qwen2-VL tokenizer carries for images and videos, as special tokens.
QWEN2_VL_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
# 4-pixel patches merged 2x2: an image is resized to a multiple of 8 pixels a side, between
# 16x16 and 40x40 pixels in area, so it takes 4 to 25 placeholder tokens.
QWEN2_VL_PATCH = 4


def make_tiny_qwen2_vl(path: str | os.PathLike, version: str = "2", *, seed: int = 0) -> str:
    """Save a random Qwen2-VL (``version="2"``) or Qwen2.5-VL (``"2.5"``) with its processor
    into ``path``: a 2-layer vision transformer (4-pixel patches, 2x2 patch merger; 2.5:
    window attention in its first block) and a 2-layer Qwen2 language model (hidden 64,
    head_dim 16, M-RoPE sections [2, 3, 3]) on the tiny tokenizer plus the vision tokens."""
    if version not in ("2", "2.5"):
        raise ValueError(f"unknown Qwen2-VL version {version!r}; expected '2' or '2.5'")
    path = pathlib.Path(path)
    tokenizer = make_tokenizer(path)
    tokenizer.add_tokens(list(QWEN2_VL_TOKENS), special_tokens=True)
    merge = 2
    factor = QWEN2_VL_PATCH * merge
    image_processor = transformers.Qwen2VLImageProcessorPil(
        size={"shortest_edge": (2 * factor) ** 2, "longest_edge": (5 * factor) ** 2},
        patch_size=QWEN2_VL_PATCH,
        temporal_patch_size=2,
        merge_size=merge,
    )
    text = tiny_text_kwargs(
        tokenizer,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    )
    vision = dict(
        depth=2,
        hidden_size=64 if version == "2" else 32,
        num_heads=2,
        patch_size=QWEN2_VL_PATCH,
        spatial_merge_size=merge,
        temporal_patch_size=2,
    )
    ids = {
        "image_token_id": tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        "video_token_id": tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        "vision_start_token_id": tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        "vision_end_token_id": tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    }
    if version == "2":
        vision_config = transformers.Qwen2VLVisionConfig(embed_dim=32, mlp_ratio=2, **vision)
        config = transformers.Qwen2VLConfig(
            text_config=text, vision_config=vision_config.to_dict(), **ids
        )
        model_class = transformers.Qwen2VLForConditionalGeneration
    else:
        vision_config = transformers.Qwen2_5_VLVisionConfig(
            intermediate_size=48,
            out_hidden_size=64,
            window_size=2 * factor,  # windows of 2x2 merged tokens
            fullatt_block_indexes=[1],
            **vision,
        )
        config = transformers.Qwen2_5_VLConfig(
            text_config=text, vision_config=vision_config.to_dict(), **ids
        )
        model_class = transformers.Qwen2_5_VLForConditionalGeneration
    random_vlm(model_class, config, seed, ("norm.weight", "ln_q.weight")).save_pretrained(path)
    # The processor's parts (its video processor would need torchvision, images do not).
    tokenizer.save_pretrained(path)
    image_processor.save_pretrained(path)
    return str(path)


# ---- a tiny text-to-image diffusion pipeline ------------------------------------------------


def make_clip_tokenizer(max_length: int = 77) -> transformers.CLIPTokenizer:
    """A CLIP tokenizer whose vocabulary is the 256 byte symbols, each alone or ending a word
    (no merges): one token per character, so a prompt's token count is easy to reason about.
    The bench's own (plait.bench.image_chat_model)."""
    from plait.bench.image_chat_model import clip_tokenizer

    return clip_tokenizer(max_length)


def _tiny_vae(**extra):
    """The tiny KL VAE of both pipelines: 3 blocks, latents 4x smaller than the image."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        **extra,
    )


def _tiny_clip_text_config(tokenizer, **extra) -> transformers.CLIPTextConfig:
    """The tiny CLIP text encoder of both pipelines (2 layers, width 32)."""
    return transformers.CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def make_tiny_sd(path: str | os.PathLike, seed: int = 0) -> str:
    """Save a random Stable-Diffusion-1.x-shaped pipeline into ``path``: UNet (2 blocks,
    cross-attention 32), VAE (3 blocks: latents 4x smaller), a 2-layer CLIP text encoder and
    the byte-symbol CLIP tokenizer, PNDM scheduler. Its default image is 32x32 and a 4-step
    image takes milliseconds on a CPU."""
    from diffusers import (
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )

    tokenizer = make_clip_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    vae = _tiny_vae()
    text_encoder = transformers.CLIPTextModel(_tiny_clip_text_config(tokenizer))
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return str(path)


def make_tiny_sd3(path: str | os.PathLike, seed: int = 0) -> str:
    """Save a random Stable-Diffusion-3-shaped pipeline into ``path``: a flow-matching
    MMDiT (1 layer, patch 2), the tiny VAE (latents 4x smaller), two CLIP text encoders with
    projections and a 1-layer T5 encoder with a letter tokenizer. Its default image is
    32x32; sizes must be multiples of 8 (VAE 4 x patch 2)."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    clip_tokenizer = make_clip_tokenizer()
    t5_tokenizer = transformers.T5Tokenizer(
        vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
        + [(c, -1.0) for c in "abcdefghijklmnopqrstuvwxyz"],
        extra_ids=0,
        model_max_length=32,
    )
    torch.manual_seed(seed)

    def clip_encoder():
        config = _tiny_clip_text_config(clip_tokenizer, projection_dim=32)
        return transformers.CLIPTextModelWithProjection(config).eval()

    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=64,  # T5's width; the two CLIPs' 32 + 32 are padded to it
        pooled_projection_dim=64,  # the two CLIP projections, 32 + 32
    )
    vae = _tiny_vae(shift_factor=0.0609, scaling_factor=1.5035)
    t5_config = transformers.T5Config(
        vocab_size=len(t5_tokenizer),
        d_model=64,
        d_ff=64,
        d_kv=16,
        num_layers=1,
        num_heads=4,
        pad_token_id=t5_tokenizer.pad_token_id,
        eos_token_id=t5_tokenizer.eos_token_id,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae.eval(),
        text_encoder=clip_encoder(),
        tokenizer=clip_tokenizer,
        text_encoder_2=clip_encoder(),
        tokenizer_2=clip_tokenizer,
        text_encoder_3=transformers.T5EncoderModel(t5_config).eval(),
        tokenizer_3=t5_tokenizer,
    )
    pipe.save_pretrained(path)
    return str(path)
