"""The diffusion pipeline ``plait bench image-chat`` draws with: random weights at
SD-Turbo's shapes (no real weights can be fetched here), saved once into a folder.

SD-Turbo is a ``StableDiffusionPipeline`` with Stable Diffusion 2.1's parts: a UNet
(blocks 320/640/1280/1280, 2 layers a block, linear-projection cross-attention of
width 1024, 865M parameters), the KL VAE (blocks 128/256/512/512: latents 8x
smaller, 84M) and OpenCLIP-H's text encoder (width 1024, 23 layers, 16 heads, vocab
49408, 340M), run with an Euler scheduler on trailing timesteps, 1 step and no
guidance. ``--tiny`` builds the same pipeline small, for a smoke run.

The CLIP tokenizer's vocabulary is the 256 byte symbols, alone or ending a word (no
merges: one token a character); the text encoder keeps the real vocabulary size.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
from typing import Any

# SD-Turbo's unet, vae and text_encoder configs, the fields that set their shapes.
REAL = {
    "unet": dict(
        sample_size=64,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True,
    ),
    "vae": dict(
        sample_size=512,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
    ),
    "text": dict(
        vocab_size=49408,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=23,
        num_attention_heads=16,
        hidden_act="gelu",
        projection_dim=1024,
    ),
}
# The same pipeline, small: 32-pixel images from 8x8 latents.
TINY = {
    "unet": dict(
        sample_size=8,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        use_linear_projection=True,
    ),
    "vae": dict(
        sample_size=32,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
    ),
    "text": dict(
        vocab_size=514,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        hidden_act="gelu",
        projection_dim=32,
    ),
}
STEPS, GUIDANCE = 1, 0.0  # SD-Turbo's way: one step, no classifier-free guidance


def describe(tiny: bool, size: int) -> str:
    """One line for the bench's header: what the pipeline and its images are."""
    latent = size // (2 ** (len((TINY if tiny else REAL)["vae"]["block_out_channels"]) - 1))
    if tiny:
        what = "random weights, a tiny StableDiffusionPipeline (--tiny): not SD-Turbo's shapes"
    else:
        what = (
            "random weights at SD-Turbo's shapes (SD 2.1 UNet 320/640/1280/1280 with "
            "cross-attention 1024, KL VAE 128/256/512/512, OpenCLIP-H text encoder 1024x23)"
        )
    return f"{what}; {size}x{size} images ({latent}x{latent}x4 latents), {STEPS} step, guidance 0"


def pipeline_dir(cache_dir: pathlib.Path, tiny: bool) -> str:
    """The saved pipeline, built on first use in a child process (so that building
    leaves no mark on the bench's peak memory)."""
    path = cache_dir / ("tiny-sd-random" if tiny else "sd-turbo-random")
    if not (path / "done.json").exists():
        cmd = [sys.executable, "-m", "plait.bench.image_chat_model", str(path)]
        subprocess.run(cmd + (["--tiny"] if tiny else []), check=True)
    return str(path)


def clip_tokenizer(max_length: int = 77) -> Any:
    """A CLIP tokenizer over the 256 byte symbols, each alone or ending a word (no
    merges: one token per character)."""
    import transformers
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    symbols = ["<|startoftext|>", "<|endoftext|>", *alphabet, *(c + "</w>" for c in alphabet)]
    return transformers.CLIPTokenizer(
        vocab={s: i for i, s in enumerate(symbols)}, merges=[], model_max_length=max_length
    )


def build(path: pathlib.Path, shapes: dict, seed: int = 0) -> None:
    """Save a random StableDiffusionPipeline at ``shapes`` into ``path``."""
    import torch
    import transformers
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )

    tokenizer = clip_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, **shapes["unet"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, **shapes["vae"])
    text_config = transformers.CLIPTextConfig(
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **shapes["text"],
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="trailing",
    )
    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=transformers.CLIPTextModel(text_config).eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)


if __name__ == "__main__":
    out, small = pathlib.Path(sys.argv[1]), "--tiny" in sys.argv
    build(out, TINY if small else REAL)
    (out / "done.json").write_text(json.dumps({"tiny": small}))
