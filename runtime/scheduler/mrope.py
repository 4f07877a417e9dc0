"""The M-RoPE positions of a step: ``[3, T]`` rotary positions (temporal, height, width)
for a model whose language model rotates by three positions (Qwen2-VL).

A request's prompt with images has its own table of positions (``Req.mrope_positions``,
from the processor); every other token, generated tokens included, sits at its index
plus the request's ``mrope_delta`` on all three axes (a text-only request: delta 0, so
its index). A chunk of a prompt takes the matching columns of the table; a step with
no request holding a table needs no 3-D positions at all (plain RoPE is the same).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from plait.runtime.scheduler.batching import Planned


def mrope_positions(plan: Sequence[Planned], positions: torch.Tensor) -> torch.Tensor | None:
    """The step's ``[3, T]`` positions, or None when no planned request has a position
    table. ``positions`` [T] are the tokens' indices, rows laid out in plan order
    (``p.start`` set)."""
    if all(p.req.mrope_positions is None for p in plan):
        return None
    deltas: list[int] = []
    tables: list[tuple[int, torch.Tensor]] = []  # (first batch row, columns of a table)
    row = 0
    for p in plan:
        req, start = p.req, p.start
        deltas += [req.mrope_delta] * p.extend
        table = req.mrope_positions
        if table is not None and start < table.shape[1]:
            tables.append((row, table[:, start : min(start + p.extend, table.shape[1])]))
        row += p.extend
    out = positions + torch.tensor(deltas, dtype=positions.dtype, device=positions.device)
    out = out.expand(3, -1).clone()
    for row, columns in tables:
        out[:, row : row + columns.shape[1]] = columns.to(out.device)
    return out
