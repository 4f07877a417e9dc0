"""Batch-invariant diffusion: each image of a batched pipeline call equal, bit for bit,
to the image its request gets when run alone.

A batch changes the shapes that some CPU kernels see, and with the shapes their
rounding: oneDNN picks another convolution algorithm for one sample than for
several, GEMM treats a tail of rows that is not a multiple of its block apart, and
group norm reduces channels-last inputs in another order. Every other op of a
diffusion model (attention, layer norm, the scheduler's arithmetic) computes each
sample on its own.

:func:`make_batch_invariant` makes a model's convolutions, linear layers and group
norms run sample by sample -- one call per sample along the batch dimension (per row
for a 2-D input), each on a contiguous tensor -- so the kernels see the same shapes
whatever the batch. Results then depend only on the sample, at some cost in speed
(the calls are smaller); it is opt-in: ``DiffusersGenerator(batch_invariant=True)``.
"""

from __future__ import annotations

import torch

# the ops whose kernels round differently with the batch size
BATCH_SENSITIVE = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear, torch.nn.GroupNorm)


def _sample_by_sample(forward):
    def run(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if x.shape[0] == 1:
            return forward(x.contiguous(), *args, **kwargs)
        return torch.cat(
            [forward(x[i : i + 1].contiguous(), *args, **kwargs) for i in range(len(x))]
        )

    run.batch_invariant = True
    return run


def make_batch_invariant(model: torch.nn.Module) -> int:
    """Make ``model``'s batch-sensitive layers run sample by sample; returns how many
    layers were changed (already changed ones are left as they are)."""
    changed = 0
    for module in model.modules():
        if isinstance(module, BATCH_SENSITIVE) and not getattr(
            module.forward, "batch_invariant", False
        ):
            module.forward = _sample_by_sample(module.forward)
            changed += 1
    return changed
