"""The packed token bitmask and its application to logits, in plain torch.

Layout: an int32 tensor ``[batch, ceil(vocab / 32)]`` on the CPU; token ``i`` of
row ``r`` is allowed when bit ``i % 32`` of word ``bitmask[r, i // 32]`` is set
(bit 0 = least significant). A row of all ones (``-1``) allows every token. This
is the layout llguidance and outlines-core write into, so matchers fill rows in
place through a raw pointer.
"""

from __future__ import annotations

import functools

import torch


def allocate_bitmask(batch: int, vocab_size: int) -> torch.Tensor:
    """An int32 ``[batch, ceil(vocab_size / 32)]`` CPU bitmask with every bit set."""
    return torch.full((batch, (vocab_size + 31) // 32), -1, dtype=torch.int32)


def apply_bitmask(
    logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor | None = None
) -> None:
    """Set disallowed logits to ``-inf`` in place.

    ``logits`` is ``[batch, V]`` (any float dtype and device); ``bitmask`` is
    ``[batch, W]`` with row ``r`` for logits row ``r``. ``rows`` (int64 indices)
    restricts the work to the constrained rows; others are left untouched.
    Columns past ``32 * W`` are disallowed.
    """
    if logits.dim() != 2 or bitmask.dim() != 2 or logits.shape[0] != bitmask.shape[0]:
        raise ValueError(
            f"logits {tuple(logits.shape)} and bitmask {tuple(bitmask.shape)} must be 2-D "
            "with the same batch size"
        )
    mask = bitmask.to(logits.device, non_blocking=True)
    if rows is not None:
        rows = rows.to(logits.device)
        mask = mask[rows]
    blocked = _blocked(mask, logits.shape[1])
    if rows is None:
        logits.masked_fill_(blocked, float("-inf"))
    else:
        logits[rows] = logits[rows].masked_fill(blocked, float("-inf"))


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Bool ``[batch, vocab_size]``: True where the token is allowed."""
    return ~_blocked(bitmask, vocab_size)


def pack_bitmask(allowed: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`unpack_bitmask`: bool ``[..., V]`` -> int32 ``[..., ceil(V/32)]``."""
    vocab = allowed.shape[-1]
    width = (vocab + 31) // 32
    padded = torch.zeros(*allowed.shape[:-1], width * 32, dtype=torch.int64)
    padded[..., :vocab] = allowed.to(torch.int64)
    weights = torch.tensor([1 << i for i in range(32)], dtype=torch.int64)
    words = (padded.view(*allowed.shape[:-1], width, 32) * weights).sum(-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def _blocked(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Bool ``[batch, vocab_size]``: True where the token is disallowed."""
    batch = bitmask.shape[0]
    blocked = ((bitmask.unsqueeze(-1) & _bit_values(bitmask.device)) == 0).view(batch, -1)
    width = blocked.shape[1]
    if width >= vocab_size:
        return blocked[:, :vocab_size]
    past_end = torch.ones(batch, vocab_size - width, dtype=torch.bool, device=bitmask.device)
    return torch.cat([blocked, past_end], dim=1)


@functools.cache
def _bit_values(device: torch.device) -> torch.Tensor:
    """int32 ``[32]``: the value of each bit (bit 31 is the sign bit)."""
    return torch.tensor(
        [1 << i for i in range(31)] + [-(1 << 31)], dtype=torch.int32, device=device
    )


def row_pointer(bitmask: torch.Tensor, row: int, n_words: int) -> int:
    """Address of ``bitmask[row]`` after checking the tensor can be written through it."""
    if bitmask.dtype != torch.int32 or bitmask.device.type != "cpu" or bitmask.dim() != 2:
        raise ValueError("the bitmask must be a 2-D int32 CPU tensor")
    if bitmask.shape[1] != n_words or bitmask.stride(1) != 1:
        raise ValueError(
            f"bitmask rows must be {n_words} contiguous int32 words, got shape "
            f"{tuple(bitmask.shape)} with strides {bitmask.stride()}"
        )
    if not 0 <= row < bitmask.shape[0]:
        raise IndexError(f"row {row} outside a bitmask of {bitmask.shape[0]} rows")
    return bitmask.data_ptr() + row * bitmask.stride(0) * 4


def set_bits(bitmask: torch.Tensor, row: int, token_ids: list[int], allowed: bool) -> None:
    """Set (or clear) the bits of ``token_ids`` in one row."""
    words = bitmask[row]
    for t in token_ids:
        bit = 1 << (t % 32)
        word = int(words[t // 32]) & 0xFFFFFFFF
        word = word | bit if allowed else word & ~bit
        words[t // 32] = word - (1 << 32) if word >= 1 << 31 else word
