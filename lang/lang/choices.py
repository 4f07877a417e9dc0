"""``sglang.lang.choices``: the choice methods of ``select`` (plait.choices)."""

from __future__ import annotations

from plait.choices import (
    greedy_token_selection,
    token_length_normalized,
    unconditional_likelihood_normalized,
)

__all__ = [
    "greedy_token_selection",
    "token_length_normalized",
    "unconditional_likelihood_normalized",
]
