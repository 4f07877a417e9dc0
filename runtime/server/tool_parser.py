"""Reading a tool-calling output into content and ``tool_calls``, piece by piece.

A :class:`CallSyntax` says how a model family writes its calls (tool_formats.py picks
one from the chat template, and constrains the output to it):

* with a ``closer``, each call sits between the opener and the closer, text before
  them (Hermes / Qwen: ``<tool_call>`` ... ``</tool_call>``);
* without one, the opener is followed by one call or a JSON array of calls (Mistral:
  ``[TOOL_CALLS][{...}, {...}]``);
* with ``text_first`` off, the reply either opens with a call -- ``{`` or the opener,
  which is then optional -- or is text throughout (Llama: ``<|python_tag|>{...}``).

A call is ``{"name": ..., <key>: ...}`` with its keys in that order, ``key`` being
``"arguments"`` or Llama's ``"parameters"``.

:class:`CallParser` gives OpenAI's streaming deltas as the text arrives; run over a
whole output, the same parser gives the message, so streamed and whole responses
always agree.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class CallSyntax:
    opener: str  # the text that opens the calls
    closer: str = ""  # the text that closes each call; "" when the opener opens them all
    key: str = "arguments"  # the key of a call's arguments
    text_first: bool = True  # text may come before the calls (else: a call or text only)
    short_ids: bool = False  # call ids of 9 letters and digits (Mistral's templates)

    def head(self) -> re.Pattern:
        """A call's opening up to its arguments: ``{"name": "...", "<key>":``."""
        return re.compile(
            r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"' + re.escape(self.key) + r'"\s*:\s*'
        )


HERMES = CallSyntax("<tool_call>", "</tool_call>")
LLAMA = CallSyntax("<|python_tag|>", key="parameters", text_first=False)
MISTRAL = CallSyntax("[TOOL_CALLS]", short_ids=True)
OPEN, CLOSE = HERMES.opener, HERMES.closer


def new_call_id(short: bool = False) -> str:
    return uuid.uuid4().hex[:9] if short else f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class Call:
    id: str
    name: str
    arguments: str = ""
    done: bool = False  # its arguments and its object were closed

    def to_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


class CallParser:
    """Reads one output into content and calls, piece by piece.

    ``feed(text)`` and ``finish()`` return OpenAI deltas: ``{"content": ...}``, or
    ``{"tool_calls": [{"index", "id", "type", "function": {"name", "arguments": ""}}]}``
    when a call's name is known, then ``{"tool_calls": [{"index", "function":
    {"arguments": piece}}]}`` as its arguments come. Text that may be the start of an
    opener (and whitespace before it) is held back until it is known not to be one;
    the content ends without the whitespace before a call. Output that leaves the
    syntax stays content. ``calls_only``: the output is one call or a JSON array of
    them, in the syntax's key, without its markers.
    """

    def __init__(self, syntax: CallSyntax = HERMES, calls_only: bool = False):
        self.syntax = syntax
        self._bare = calls_only  # the output is only calls, as JSON without markers
        self.content = ""
        self.calls: list[Call] = []
        self._head = syntax.head()
        self._buf = ""
        self._state = "open" if calls_only else "text" if syntax.text_first else "lead"
        self._array = False  # the calls are in a JSON array
        self._value: _ValueEnd | None = None

    @property
    def complete(self) -> bool:
        """Every call begun was finished (an output cut mid-call is not)."""
        return self._state in ("text", "lead", "plain", "end") and all(c.done for c in self.calls)

    def feed(self, text: str) -> list[dict[str, Any]]:
        self._buf += text
        out: list[dict[str, Any]] = []
        while self._step(out):
            pass
        return merged(out)

    def finish(self) -> list[dict[str, Any]]:
        """The deltas of what was held back, once the output has ended."""
        out: list[dict[str, Any]] = []
        if self._state in ("text", "lead", "plain", "junk", "open", "call"):  # no call open
            self._say(self._buf.rstrip() if self.calls else self._buf, out)
            self._buf = ""
        return merged(out)

    def _say(self, text: str, out: list[dict[str, Any]]) -> None:
        if text:
            self.content += text
            out.append({"content": text})

    def _step(self, out: list[dict[str, Any]]) -> bool:
        """Consume what the buffer allows in the current state; True to go on."""
        buf, state, opener = self._buf, self._state, self.syntax.opener
        if state == "text":
            at = buf.find(opener)
            if at < 0:
                safe = _held_back(buf, opener)
                self._say(buf[:safe], out)
                self._buf = buf[safe:]
                return False
            self._say(buf[:at].rstrip(), out)
            self._buf = buf[at + len(opener) :]
            self._state = "call" if self.syntax.closer else "open"
            return True
        if state in ("plain", "junk"):  # text throughout, or not the expected form
            self._say(buf, out)
            self._buf = ""
            return False
        rest = buf.lstrip()
        if not rest and state != "args":
            return False
        if state == "lead":  # a call opens the reply, or it is text
            if rest[0] == "{":
                self._buf, self._state = rest, "call"
            elif opener and rest.startswith(opener):
                self._buf, self._state = rest[len(opener) :], "open"
            elif opener.startswith(rest):
                return False
            else:
                self._state = "plain"
            return True
        if state == "open":  # after an opener without closer: a call or an array of them
            self._array = rest[0] == "["
            self._buf, self._state = rest[1:] if self._array else rest, "call"
            return True
        if state == "call":
            head = self._head.match(buf)
            if head is None:
                if rest[0] != "{":
                    self._buf, self._state = rest, "junk"
                    return True
                return False  # an unfinished head
            call = Call(new_call_id(self.syntax.short_ids), json.loads(head.group(1)))
            self.calls.append(call)
            out.append(_delta(len(self.calls) - 1, id=call.id, name=call.name))
            self._buf, self._state, self._value = buf[head.end() :], "args", _ValueEnd()
            return True
        if state == "args":
            if not self._value.started:
                buf = buf.lstrip()
            n, done = self._value.scan(buf)
            piece, self._buf = buf[:n], buf[n:]
            if piece:
                self.calls[-1].arguments += piece
                out.append(_delta(len(self.calls) - 1, arguments=piece))
            if done:
                self._state = "call_end"
            return done
        if state == "call_end":
            if rest[0] != "}":
                self._buf, self._state = rest, "junk"
                return True
            self.calls[-1].done = True
            self._buf = rest[1:]
            tagged = self.syntax.closer and not self._bare
            self._state = "close" if tagged else "between" if self._array else "end"
            return True
        if state == "close":
            closer = self.syntax.closer
            if rest.startswith(closer):
                self._buf, self._state = rest[len(closer) :], "text"
                return True
            if closer.startswith(rest):
                return False
            self._buf, self._state = rest, "junk"
            return True
        if state == "between" and rest[0] in ",]":
            self._buf, self._state = rest[1:], ("call" if rest[0] == "," else "end")
            return True
        self._buf, self._state = rest, "junk"  # "end" with more text, or a bad separator
        return True


def _held_back(text: str, opener: str) -> int:
    """Where the text that may still become ``opener`` starts: the longest end of
    ``text`` that begins it, with the whitespace before it."""
    end = len(text)
    for n in range(min(len(opener) - 1, len(text)), 0, -1):
        if text.endswith(opener[:n]):
            end -= n
            break
    while end and text[end - 1].isspace():
        end -= 1
    return end


class _ValueEnd:
    """Finds where one JSON value ends, as its text arrives."""

    def __init__(self) -> None:
        self.started = False
        self._kind = ""  # "string", "nested" or "scalar"
        self._depth = 0
        self._in_string = False
        self._escaped = False

    def scan(self, text: str) -> tuple[int, bool]:
        """(characters of ``text`` that belong to the value, whether it ended)."""
        for i, ch in enumerate(text):
            if not self.started:
                self.started = True
                self._kind = "string" if ch == '"' else "nested" if ch in "{[" else "scalar"
                self._in_string = ch == '"'
                self._depth = 1 if ch in "{[" else 0
            elif self._kind == "scalar":
                if ch in ",}] \t\r\n":
                    return i, True
            elif self._in_string:
                if self._escaped:
                    self._escaped = False
                elif ch == "\\":
                    self._escaped = True
                elif ch == '"':
                    self._in_string = False
                    if self._kind == "string":
                        return i + 1, True
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    return i + 1, True
        return len(text), False


def _delta(index: int, *, id: str | None = None, name: str | None = None, arguments: str = ""):
    if id is None:
        return {"tool_calls": [{"index": index, "function": {"arguments": arguments}}]}
    return {
        "tool_calls": [
            {
                "index": index,
                "id": id,
                "type": "function",
                "function": {"name": name, "arguments": ""},
            }
        ]
    }


def merged(deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Consecutive content pieces, and consecutive argument pieces of one call, joined."""
    out: list[dict[str, Any]] = []
    for d in deltas:
        last, piece = (_piece(out[-1]) if out else None), _piece(d)
        if out and "content" in d and "content" in out[-1]:
            out[-1] = {"content": out[-1]["content"] + d["content"]}
        elif last and piece and last[0] == piece[0]:
            out[-1] = _delta(last[0], arguments=last[1] + piece[1])
        else:
            out.append(d)
    return out


def _piece(delta: dict[str, Any]) -> tuple[int, str] | None:
    """(call index, text) of an arguments piece; None for any other delta."""
    calls = delta.get("tool_calls")
    if not calls or "id" in calls[0]:
        return None
    return calls[0]["index"], calls[0]["function"]["arguments"]
