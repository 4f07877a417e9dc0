"""ForwardBatch: one model step over a flattened, ragged batch, as plain data.

The scheduler builds it; the runner applies it (writes the table, prepares
attention, runs the model). Every sequence b contributes ``extend_lens[b]``
new tokens (1 when decoding, a prompt chunk when prefilling), laid end to end
in ``input_ids``. Its KV history is row ``req_rows[b]`` of the request-to-token
table, whose first ``prefix_lens[b]`` entries were computed by earlier steps
(or lent by the prefix cache) and whose next ``extend_lens[b]`` entries are
``out_slots``.

    sequence b:  [ prefix (cached KV) | extend (computed now) ]
                 0              prefix_lens[b]          seq_lens[b]

The table writes bring the runner's table up to date before the step:
``table[write_rows[i], write_cols[i]] = write_slots[i]``. They hold every
new token's out slot and the prefix slots the cache lent since the last step
(at admission, or when a computed chunk was cached and its duplicates freed).
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
    # Request-to-token table writes, applied by the runner before the step.
    write_rows: torch.Tensor  # [W] int64
    write_cols: torch.Tensor  # [W] int64
    write_slots: torch.Tensor  # [W] int64
    # Input embeddings [T, hidden] to use instead of looking up ``input_ids``
    # (image placeholders spliced with vision-encoder outputs); None: look them up.
    input_embeds: torch.Tensor | None = None
    # M-RoPE models: the rotary positions [3, T] (temporal, height, width) when a
    # request of the step has image positions; None: ``positions`` on all three axes.
    mrope_positions: torch.Tensor | None = None
