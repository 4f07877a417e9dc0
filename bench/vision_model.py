"""The model ``plait bench vision`` times: random weights at SmolVLM-256M-Instruct's
shapes (no real VLM weights can be fetched here), saved once with a processor.

SmolVLM-256M-Instruct is an ``Idefics3ForConditionalGeneration``: a SigLIP vision
tower (hidden 768, 12 layers, 12 heads, 512-pixel tiles of 16-pixel patches), a
pixel-shuffle connector (scale factor 4: 64 tokens a tile) and a Llama language
model (hidden 576, 30 layers, 9 heads, 3 KV heads, intermediate 1536, vocab 49280).
``--tiny`` builds the same architecture small, for a smoke run.

The tokenizer is a byte-level BPE trained here on a few paragraphs, plus the
image tokens; the language model keeps the real vocabulary size, and the output
rows past the tokenizer's own tokens are zero, so greedy decoding picks tokens
that decode to text (turn by turn, a chat feeds its answers back as text).
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
from typing import Any

# SmolVLM-256M-Instruct's config.json, the fields that set its shapes.
REAL = {
    "vision": dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        image_size=512,
        patch_size=16,
        layer_norm_eps=1e-6,
    ),
    "text": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        vocab_size=49280,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
    ),
    "scale_factor": 4,
}
# The same architecture, small: 64-pixel tiles of 16-pixel patches, 4 tokens a tile.
TINY = {
    "vision": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=64,
        patch_size=16,
        layer_norm_eps=1e-6,
    ),
    "text": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=1024,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
    ),
    "scale_factor": 2,
}

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
IMAGE_TOKENS = (
    "<fake_token_around_image>",
    "<image>",
    "<end_of_utterance>",
    "<global-img>",
    *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)),
)
# SmolVLM's chat template: "<|im_start|>User:<image>text<end_of_utterance>\nAssistant:".
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}{{ '<image>' }}{% endif %}"
    "{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
CORPUS = """\
The picture shows a harbour at dawn, with fishing boats tied along the pier and gulls
over the water. A red crane stands behind the warehouses; the sky is pale and clear.
In the second picture a cat sleeps on a wooden table next to a bowl of apples, a cup of
tea and an open book. Sunlight comes through the window and falls across the floor.
Describe the colours, count the objects, read any text you can see, and say what the
people in the scene might be doing. What is in the top left corner? Is it day or night?
How many boats are there? Which animal is it? What is written on the sign by the door?
The answer is short and plain: three boats, one cat, two cups, a green door, a blue sky.
"""


def describe(tiny: bool, longest_edge: int) -> str:
    """One line for the bench's header: what the weights and images are."""
    if tiny:
        return "random weights, a tiny Idefics3 (--tiny): not SmolVLM's shapes"
    tile = REAL["vision"]["image_size"]
    side = -(-longest_edge // tile)
    tiles = side * side + 1 if side > 1 else 1
    return (
        "random weights at SmolVLM-256M-Instruct's shapes (Idefics3: SigLIP 768x12, "
        f"Llama 576x30, vocab 49280); images scaled to a longest edge of {longest_edge}: "
        f"a square image is {tiles} tile(s) of {tile} px, {tiles * 64} image tokens"
    )


def model_dir(cache_dir: pathlib.Path, tiny: bool, longest_edge: int) -> str:
    """The saved model for these settings, built on first use in a child process (so
    that building leaves no mark on the bench's peak memory)."""
    name = "tiny" if tiny else "smolvlm-256m"
    path = cache_dir / f"{name}-random-edge{longest_edge}"
    if not (path / "done.json").exists():
        cmd = [sys.executable, "-m", "plait.bench.vision_model", str(path), str(longest_edge)]
        subprocess.run(cmd + (["--tiny"] if tiny else []), check=True)
    return str(path)


def _tokenizer(path: pathlib.Path) -> Any:
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=640,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<|endoftext|>",
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        pad_token="<|im_end|>",
        model_max_length=8192,
    )
    fast.add_tokens(list(IMAGE_TOKENS), special_tokens=True)
    fast.eos_token = "<end_of_utterance>"
    path.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(path)
    return fast


def build(path: pathlib.Path, shapes: dict, longest_edge: int, seed: int = 0) -> None:
    """Save random weights at ``shapes`` with a processor into ``path``."""
    import torch
    import transformers

    tokenizer = _tokenizer(path)
    vision, text = shapes["vision"], shapes["text"]
    tile, scale = vision["image_size"], shapes["scale_factor"]
    image_seq_len = (tile // vision["patch_size"]) ** 2 // scale**2
    processor = transformers.Idefics3Processor(
        image_processor=transformers.Idefics3ImageProcessorPil(
            size={"longest_edge": longest_edge}, max_image_size={"longest_edge": tile}
        ),
        tokenizer=tokenizer,
        image_seq_len=image_seq_len,
        chat_template=CHAT_TEMPLATE,
    )
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = transformers.Idefics3Config(
        text_config=transformers.LlamaConfig(**text, tie_word_embeddings=False, **ids).to_dict(),
        vision_config=transformers.Idefics3VisionConfig(**vision).to_dict(),
        scale_factor=scale,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        tie_word_embeddings=False,
        **ids,
    )
    torch.manual_seed(seed)
    model = transformers.Idefics3ForConditionalGeneration(config).eval()
    with torch.no_grad():  # greedy picks only tokens the tokenizer can decode
        model.lm_head.weight[len(tokenizer) :].zero_()
    model.save_pretrained(path)
    processor.save_pretrained(path)


if __name__ == "__main__":
    out, edge, small = pathlib.Path(sys.argv[1]), int(sys.argv[2]), "--tiny" in sys.argv
    build(out, TINY if small else REAL, edge)
    (out / "done.json").write_text(json.dumps({"tiny": small, "longest_edge": edge}))
