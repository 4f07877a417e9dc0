"""ForwardBatch: one model step over a flattened, ragged batch.

Every sequence b contributes ``extend_lens[b]`` new tokens (1 when decoding,
a prompt chunk when prefilling), laid end to end in ``input_ids``. Its KV
history is row ``req_rows[b]`` of the request-to-token table, whose first
``prefix_lens[b]`` entries were computed by earlier steps (or lent by the
prefix cache) and whose next ``extend_lens[b]`` entries are ``out_slots``.

    sequence b:  [ prefix (cached KV) | extend (computed now) ]
                 0              prefix_lens[b]          seq_lens[b]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    out_slots: torch.Tensor  # [T] int64, KV slot each new token writes
    req_rows: torch.Tensor  # [B] int64, rows of the request-to-token table
    prefix_lens: list[int]
    extend_lens: list[int]
    # Rows of the flattened batch whose logits are needed (sampling, logprobs).
    logits_indices: torch.Tensor  # [N] int64
