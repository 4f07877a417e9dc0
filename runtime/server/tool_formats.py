"""The form a model writes its tool calls in, read from its chat template.

Each family's template teaches its own form; the output is constrained to it and
read back by its :class:`CallSyntax`:

* Hermes / Qwen (``"hermes"``; also every template that renders no tools, which get
  the form in a system preamble, tools.py): text, then each call in tags::

      <tool_call>
      {"name": "get_weather", "arguments": {"city": "Paris"}}
      </tool_call>

* Llama 3.1 / 3.2 (``"llama"``): the reply is a call, after an optional
  ``<|python_tag|>``, or text that does not open with one::

      {"name": "get_weather", "parameters": {"city": "Paris"}}

  Their templates render one call per assistant turn, so a reply holds one.
* Mistral (``"mistral"``): text, then ``[TOOL_CALLS]`` and a JSON array of calls::

      [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]

  Its templates take call ids of 9 letters and digits only: calls get such ids, and
  the ids of a conversation sent back are mapped onto such ids (:func:`short_ids`).

Under ``tool_choice`` ``"auto"`` the reply is text or calls, so the markers tell them
apart: a Lark grammar holds the whole form, and a marker the tokenizer holds as a
special token goes into it by its id (the output then keeps special tokens when
detokenized, so that the parser sees it). Under ``"required"`` or a named function the
reply can only be calls: it is their JSON in the family's shape (a Llama call object,
a Mistral array, Hermes' object or array) without markers, as vLLM constrains it, so
that the JSON-schema backends, their fallbacks and their budget-aware closing apply.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from plait.runtime.server.tool_parser import HERMES, LLAMA, MISTRAL, CallSyntax

# The layout of a call: what json.dumps (and a template's tojson) writes.
LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class CallFormat:
    name: str  # "hermes", "llama" or "mistral"
    syntax: CallSyntax
    opener: str  # the opener in the grammar: a quoted string, or <[id]> for a special token
    closer: str = ""  # the same for the closer ("" when the syntax has none)
    several: bool = True  # a reply may hold several calls
    array: bool = False  # the calls are always a JSON array, even one

    @property
    def keeps_special_tokens(self) -> bool:
        """Whether a marker is a special token, which the output must keep to be read."""
        return self.opener.startswith("<[") or self.closer.startswith("<[")

    def calls_schema(self, call: dict[str, Any], several: bool) -> dict[str, Any]:
        """The JSON schema of a reply that is only calls, each matching ``call``
        (``several``: more than one may come, if the format allows it)."""
        several = several and self.several
        if several or self.array:
            call = {"type": "array", "items": call, "minItems": 1}
            if not several:
                call["maxItems"] = 1
        return {**call, "x-guidance": LAYOUT}

    def auto_grammar(self, call: dict[str, Any], parallel: bool) -> str:
        """The Lark grammar of a reply that is text or calls, each of which matches the
        JSON schema ``call`` (more than one only if ``parallel``)."""
        more = parallel and self.several
        rules = [f"call: %json {json.dumps({**call, 'x-guidance': LAYOUT})}"]
        if self.syntax.closer:  # each call in its tags, one per line
            body = f'"\\n" call "\\n" {self.closer}'
            calls = f'{body} ("\\n" {self.opener} {body})*' if more else body
        elif self.syntax.text_first:  # the opener, then an array of calls
            calls = '" "? "[" call (", " call)* "]"' if more else '" "? "[" call "]"'
        else:  # the reply is the call, after an optional opener
            calls = "call"
        # Text never holds a special token, nor its text spelled out: the parser would
        # take that for the marker.
        spelled = _literal(self.syntax.opener)
        if not self.syntax.text_first:  # text may not open as a call does
            start = f"TEXT | {calls} | {self.opener} {calls}" if self.opener else f"TEXT | {calls}"
            text = "/(\\s*[^\\s{](.|\\n)*)?/"
            rules.append(
                f"TEXT: {text} & ~/\\s*{spelled}(.|\\n)*/" if self.opener else f"TEXT: {text}"
            )
        elif self.opener.startswith("<["):
            start = f"TEXT | TEXT {self.opener} {calls}"
            rules.append(f"TEXT: /(.|\\n)*/ & ~/(.|\\n)*{spelled}(.|\\n)*/")
        else:  # text up to the first opener, which ends it (a lazy lexeme)
            start = f"TEXT | head {calls}"
            rules += [f"head[lazy]: TEXT {self.opener}", "TEXT: /(.|\\n)*/"]
        return "\n".join(["%llguidance {}", f"start: {start}", *rules]) + "\n"


def _literal(text: str) -> str:
    """``text`` as a regular expression (each sign by its code, which Lark's regex
    literals take however they treat the sign itself)."""
    return "".join(c if c.isalnum() else f"\\x{{{ord(c):x}}}" for c in text)


def _marker(tokenizer: Any, text: str) -> str:
    """``text`` as the grammar writes it: by id if the tokenizer has it as a special
    token (text never matches one), else quoted."""
    if tokenizer is not None:
        for i, token in tokenizer.added_tokens_decoder.items():
            if token.content == text and token.special:
                return f"<[{i}]>"
    return json.dumps(text)


def _format(name: str, syntax: CallSyntax, tokenizer: Any) -> CallFormat:
    if name == "llama":  # the tag is only known as a special token
        opener = _marker(tokenizer, syntax.opener)
        if not opener.startswith("<["):
            return CallFormat(name, dataclasses.replace(syntax, opener=""), "", several=False)
        return CallFormat(name, syntax, opener, several=False)
    closer = _marker(tokenizer, syntax.closer) if syntax.closer else ""
    opener = _marker(tokenizer, syntax.opener)
    return CallFormat(name, syntax, opener, closer, array=name == "mistral")


PREAMBLE_FORMAT = _format("hermes", HERMES, None)


def detect(template: str, tokenizer: Any) -> CallFormat:
    """The call format a chat template that renders tools teaches (Hermes when it
    shows none of the others)."""
    if MISTRAL.opener in template:
        return _format("mistral", MISTRAL, tokenizer)
    if HERMES.opener in template:
        return _format("hermes", HERMES, tokenizer)
    if '"parameters"' in template and ("ipython" in template or LLAMA.opener in template):
        return _format("llama", LLAMA, tokenizer)
    return _format("hermes", HERMES, tokenizer)


_FORMATS: dict[tuple[str, bool], CallFormat] = {}
_TAKES_TOOLS: dict[tuple[str, bool], bool] = {}
_PROBE = {"type": "function", "function": {"name": "plait_probe_7f3a", "parameters": {}}}


def _key(engine: Any) -> tuple[str, bool]:
    return str(engine.tokenizer.chat_template), engine.chat_template.content_parts


def call_format(engine: Any) -> CallFormat:
    """The call format of the engine's model: its template's own, or Hermes' tags
    shown in a preamble when its template renders no tools."""
    key = _key(engine)
    if key not in _FORMATS:
        template = key[0]
        tools = takes_tools(engine)
        _FORMATS[key] = detect(template, engine.tokenizer) if tools else PREAMBLE_FORMAT
    return _FORMATS[key]


def takes_tools(engine: Any) -> bool:
    """Whether the model's chat template renders ``tools`` (it shows a probe tool)."""
    key = _key(engine)
    if key not in _TAKES_TOOLS:
        content: Any = [{"type": "text", "text": "hi"}] if key[1] else "hi"
        try:
            text = engine.apply_chat_template(
                [{"role": "user", "content": content}], tools=[_PROBE]
            )
            _TAKES_TOOLS[key] = _PROBE["function"]["name"] in text
        except Exception:  # a template that breaks on tools does not take them
            _TAKES_TOOLS[key] = False
    return _TAKES_TOOLS[key]


_SHORT_ID = re.compile(r"[A-Za-z0-9]{9}")


def short_id(call_id: str) -> str:
    """A call id as Mistral's templates take it, 9 letters and digits: the id itself
    when it is one, else one derived from it (so a call and its result still match)."""
    if _SHORT_ID.fullmatch(call_id):
        return call_id
    return hashlib.sha256(call_id.encode()).hexdigest()[:9]


def short_ids(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages with each call id and ``tool_call_id`` made a :func:`short_id`."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            m = {**m, "tool_calls": [{**c, "id": short_id(c["id"])} for c in m["tool_calls"]]}
        if m.get("tool_call_id"):
            m = {**m, "tool_call_id": short_id(m["tool_call_id"])}
        out.append(m)
    return out
