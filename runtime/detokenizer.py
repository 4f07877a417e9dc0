"""Incremental detokenization with stop strings.

Tokens arrive one at a time; text is released only when it is final:
  - a token that ends inside a multi-byte UTF-8 character decodes to U+FFFD
    until the rest arrives, so such a tail is held back;
  - text that could still be the start of a stop string is held back while
    streaming, so a stop string never reaches the client.
The text of a finished request is the decode of all its tokens, cut at the
stop string; the streamed pieces always concatenate to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, stop: Sequence[str] = (), skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.stop = tuple(stop)
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""  # decoded so far (complete characters only)
        self.sent = 0  # characters of `text` already released
        self._prefix_offset = 0
        self._read_offset = 0
        self._searched = 0  # stop strings cannot start before this index of `text`

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def add(self, token_id: int) -> str | None:
        """Feed one token. Returns the matched stop string if the text now contains one
        (the text is cut before it), else None."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self._prefix_offset : self._read_offset])
        full = self._decode(self.ids[self._prefix_offset :])
        if len(full) > len(prefix) and not full.endswith(REPLACEMENT):
            self.text += full[len(prefix) :]
            self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
        return self._find_stop()

    def _find_stop(self) -> str | None:
        if not self.stop:
            return None
        start = self._searched
        best: tuple[int, str] | None = None
        for s in self.stop:
            i = self.text.find(s, start)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        self._searched = max(0, len(self.text) - self.holdback)
        if best is None:
            return None
        self.text = self.text[: best[0]]
        return best[1]

    def finish(self, drop_last: bool = False, stop_at: str | None = None) -> str:
        """Final text: decode of all tokens (without the last one when it was a matched
        stop token), cut at the stop string when one matched."""
        ids = self.ids[:-1] if drop_last else self.ids
        text = self._decode(ids)
        if stop_at is not None:
            i = text.find(stop_at)
            text = text[:i] if i >= 0 else self.text
        if not text.startswith(self.text[: self.sent]):
            # Whole-sequence decoding disagreed with what was already streamed; keep the
            # incremental text so the streamed pieces still concatenate to the result.
            text = self.text
        self.text = text
        return text

    def release(self, final: bool) -> str:
        """The next piece of text a stream may show."""
        end = len(self.text) if final else max(self.sent, len(self.text) - self.holdback)
        piece = self.text[self.sent : end]
        self.sent = end
        return piece
