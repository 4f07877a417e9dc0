"""Errors a caller can act on. Each names the field and the value at fault, so
the HTTP layer can turn it into a 4xx body without guessing."""

from __future__ import annotations

from typing import Any


class RequestError(ValueError):
    """A request is invalid; ``field`` names the offending input."""

    def __init__(self, field: str, value: Any, reason: str):
        self.field = field
        self.value = value
        self.reason = reason
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        super().__init__(f"{field}={shown}: {reason}")
