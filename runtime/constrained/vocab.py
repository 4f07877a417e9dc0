"""TokenizerInfo: the bytes each token id stands for, built once per tokenizer.

Both grammar backends work on bytes, so every token id must be mapped to the
bytes it appends to the output. Two vocabulary styles are decoded:

* byte-level BPE (GPT-2, Llama 3, SmolLM2): each token string spells its bytes
  through GPT-2's printable byte alphabet (``Ġ`` is a space), inverted here;
* SentencePiece style (Llama 2, Mistral): ``▁`` is a space and byte-fallback
  tokens ``<0x0A>`` stand for one raw byte.

Special tokens (and ids past the tokenizer, up to the model's logits width)
map to ``b""``: a grammar never allows them; EOS is handled by id.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from typing import Any

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_METASPACE = "\u2581"


def gpt2_byte_alphabet() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character (bytes_to_unicode)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


_BYTE_OF_CHAR = {c: b for b, c in gpt2_byte_alphabet().items()}


def byte_level_bytes(token: str) -> bytes:
    """Bytes of a byte-level BPE token string; unknown characters pass as UTF-8."""
    out = bytearray()
    for ch in token:
        b = _BYTE_OF_CHAR.get(ch)
        if b is None:
            out += ch.encode("utf-8")
        else:
            out.append(b)
    return bytes(out)


def metaspace_bytes(token: str) -> bytes:
    """Bytes of a SentencePiece-style token string (``▁`` and ``<0xHH>``)."""
    m = _BYTE_FALLBACK.fullmatch(token)
    if m:
        return bytes([int(m.group(1), 16)])
    return token.replace(_METASPACE, " ").encode("utf-8")


class TokenizerInfo:
    """Per-id token bytes, EOS ids and the logits width, with a stable fingerprint.

    ``token_bytes`` has ``vocab_size`` entries; ``special_tokens`` maps the ids of
    special tokens to their text (some backends need the names); ``encode`` turns
    text into ids the way the model's tokenizer does.
    """

    def __init__(
        self,
        token_bytes: Sequence[bytes],
        eos_token_ids: Sequence[int],
        special_tokens: dict[int, str],
        encode: Callable[[str], list[int]],
    ):
        self.token_bytes = list(token_bytes)
        self.vocab_size = len(self.token_bytes)
        self.eos_token_ids = sorted(set(eos_token_ids))
        if not self.eos_token_ids:
            raise ValueError("at least one EOS token id is required")
        for t in self.eos_token_ids:
            if not 0 <= t < self.vocab_size:
                raise ValueError(f"EOS id {t} outside the vocabulary [0, {self.vocab_size})")
        self.special_tokens = dict(special_tokens)
        self.encode = encode
        self.fingerprint = self._fingerprint()

    @classmethod
    def from_hf(cls, tokenizer: Any, vocab_size: int, eos_token_ids: list[int]) -> TokenizerInfo:
        """Build from a Hugging Face tokenizer; ``vocab_size`` is the logits width."""
        n = min(len(tokenizer), vocab_size)
        special = _special_tokens(tokenizer, n)
        added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items() if i < n}
        decode = byte_level_bytes if _is_byte_level(tokenizer) else metaspace_bytes
        token_bytes = [b""] * vocab_size
        for i, tok in enumerate(tokenizer.convert_ids_to_tokens(list(range(n)))):
            if tok is None or i in special:
                continue
            token_bytes[i] = added[i].encode("utf-8") if i in added else decode(tok)
        return cls(
            token_bytes,
            eos_token_ids,
            special,
            lambda text: tokenizer.encode(text, add_special_tokens=False),
        )

    @property
    def n_words(self) -> int:
        """int32 words in one bitmask row."""
        return (self.vocab_size + 31) // 32

    def _fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps([self.vocab_size, self.eos_token_ids]).encode())
        h.update(json.dumps(sorted(self.special_tokens.items())).encode())
        for b in self.token_bytes:
            h.update(len(b).to_bytes(4, "little"))
            h.update(b)
        return h.hexdigest()[:32]


def _special_tokens(tokenizer: Any, n: int) -> dict[int, str]:
    special = {
        i: t.content for i, t in tokenizer.added_tokens_decoder.items() if t.special and i < n
    }
    for i in tokenizer.all_special_ids:
        if i < n and i not in special:
            special[i] = tokenizer.convert_ids_to_tokens(i)
    return special


def _is_byte_level(tokenizer: Any) -> bool:
    """Whether token strings use GPT-2's byte alphabet (else: SentencePiece style)."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if decoder is not None:
        return "ByteLevel" in _component_types(json.loads(decoder.__getstate__()))
    # No decoder description (slow tokenizers): SentencePiece vocabularies use "▁".
    vocab = tokenizer.get_vocab()
    return sum(_METASPACE in t for t in vocab) < sum("\u0120" in t for t in vocab)


def _component_types(config: Any) -> set[str]:
    """All ``type`` names in a (possibly nested ``Sequence``) tokenizers config."""
    if isinstance(config, dict):
        found = {config["type"]} if isinstance(config.get("type"), str) else set()
        for v in config.values():
            found |= _component_types(v)
        return found
    if isinstance(config, list):
        return set().union(*(_component_types(v) for v in config)) if config else set()
    return set()
