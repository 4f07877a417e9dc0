"""Incremental detokenization with stop strings.

Tokens arrive one at a time; text is released only when it is final:
  - a token that ends inside a multi-byte UTF-8 character decodes to U+FFFD
    until the rest arrives, so such a tail is held back;
  - text that could still be the start of a stop string is held back while
    streaming, so a stop string never reaches the client.
The text of a finished request is the decode of all its tokens, cut at the
stop string; the streamed pieces always concatenate to it.

Stops are strings (``stop``) or regular expressions (``stop_regex``, searched
in the last ``REGEX_WINDOW`` characters); the earliest match wins. The cut
drops the match, or keeps it with ``no_stop_trim``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

try:  # the regex parser, for the longest text a stop regex can match
    import re._parser as _sre_parse  # Python >= 3.11
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse as _sre_parse  # type: ignore[no-redef]

REPLACEMENT = "\ufffd"
REGEX_WINDOW = 4096  # a stop regex is searched in this many trailing characters
UNBOUNDED_REGEX_HOLDBACK = 64  # what a stream holds back for a regex of unbounded length


def _max_match_len(pattern: re.Pattern) -> int:
    width = _sre_parse.parse(pattern.pattern, pattern.flags).getwidth()[1]
    return min(width, UNBOUNDED_REGEX_HOLDBACK)


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Any,
        stop: Sequence[str] = (),
        skip_special_tokens: bool = True,
        *,
        stop_regex: Sequence[str] = (),
        no_stop_trim: bool = False,
        spaces_between_special_tokens: bool = True,
    ):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.stop = tuple(stop)
        self.stop_regex = tuple(re.compile(p) for p in stop_regex)
        self.no_stop_trim = no_stop_trim
        self._decode_kwargs = (
            {} if spaces_between_special_tokens else {"spaces_between_special_tokens": False}
        )
        longest = [len(s) for s in self.stop] + [_max_match_len(r) for r in self.stop_regex]
        self.holdback = max(longest, default=1) - 1
        self.ids: list[int] = []
        self.text = ""  # decoded so far (complete characters only)
        self.sent = 0  # characters of `text` already released
        self._prefix_offset = 0
        self._read_offset = 0
        self._searched = 0  # stop strings cannot start before this index of `text`

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip, **self._decode_kwargs)

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

    def _first_stop(self, text: str, start: int) -> tuple[int, int, str] | None:
        """The earliest stop in ``text`` from ``start`` on: (begin, end, matched text)."""
        best: tuple[int, int, str] | None = None
        for s in self.stop:
            i = text.find(s, start)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, i + len(s), s)
        for rx in self.stop_regex:
            m = rx.search(text, max(start, len(text) - REGEX_WINDOW))
            if m is not None and m.end() > m.start() and (best is None or m.start() < best[0]):
                best = (m.start(), m.end(), m.group())
        return best

    def _cut(self, text: str, found: tuple[int, int, str]) -> str:
        return text[: found[1] if self.no_stop_trim else found[0]]

    def _find_stop(self) -> str | None:
        if not self.stop and not self.stop_regex:
            return None
        found = self._first_stop(self.text, self._searched)
        self._searched = max(0, len(self.text) - self.holdback)
        if found is None:
            return None
        self.text = self._cut(self.text, found)
        return found[2]

    def finish(self, drop_last: bool = False, stop_at: str | None = None) -> str:
        """Final text: decode of all tokens (without the last one when it was a matched
        stop token, unless ``no_stop_trim``), cut at the stop when one matched."""
        ids = self.ids[:-1] if drop_last and not self.no_stop_trim else self.ids
        text = self._decode(ids)
        if stop_at is not None:
            found = self._first_stop(text, 0)
            text = self._cut(text, found) if found is not None else self.text
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
