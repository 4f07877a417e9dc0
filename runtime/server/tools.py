"""Tool calling on ``/v1/chat/completions``: OpenAI's ``tools``, ``tool_choice`` and
``parallel_tool_calls``.

A request's tools become a :class:`ToolPlan`: checked (each ``parameters`` against
JSON Schema's meta-schema, names unique, a named choice among the tools), shown to
the model through its prompt, turned into a grammar so that every call parses
against its tool's schema, and read back from the output as ``tool_calls``.

Prompt. A chat template that renders ``tools`` itself gets them, with the
conversation's assistant ``tool_calls`` and ``role: "tool"`` results, as
transformers passes them (Llama's templates show a result as an ``ipython`` turn,
Mistral's inside ``[TOOL_RESULTS]``). For a template that does not, a system
preamble lists the tools and the call format, an assistant's calls are written into
its text, and tool results come back as a user turn inside ``<tool_response>`` tags.

Output. Calls are written in the form the model's template teaches -- Hermes' /
Qwen's ``<tool_call>`` tags, Llama's ``{"name", "parameters"}`` object, Mistral's
``[TOOL_CALLS]`` array (tool_formats.py detects it; a template without tools gets the
tags) -- under a Lark grammar by ``tool_choice``:

* ``"auto"`` (the default with tools): text, or calls. The grammar lets text through
  until a call opens, and from there only a call valid against one of the tools
  (more calls follow only with ``parallel_tool_calls``);
* ``"required"``: one call or more, each valid against its tool (a single call
  without ``parallel_tool_calls``, or in Llama's form), as JSON without the markers;
* a named function: one call to it, the same way;
* ``"none"``: plain text, the tools still shown to the model.

Budget-aware decoding (constrained/closing.py) finishes these grammars before
``max_tokens`` runs out, so a call is never cut short: in ``"auto"``, a call that
cannot be finished in the tokens left is not begun, and the reply stays text.

:class:`CallParser` reads the model's form piece by piece. Streamed, it gives OpenAI's
deltas (content, then for each call its id and name, then pieces of its arguments);
on a whole output, the same parser gives the message's ``content`` and
``tool_calls``, so the two always agree.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import jinja2
import jsonschema

from plait.runtime.constrained.spec import close_objects
from plait.runtime.server.errors import APIError
from plait.runtime.server.tool_formats import (
    PREAMBLE_FORMAT,
    CallFormat,
    call_format,
    short_ids,
    takes_tools,
)
from plait.runtime.server.tool_parser import CLOSE, OPEN, CallParser, merged, new_call_id

CHOICES = ("auto", "none", "required")
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_NO_PARAMETERS = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class Tool:
    name: str
    parameters: dict[str, Any]
    spec: dict[str, Any]  # {"type": "function", "function": {...}}, as templates take it


@dataclass(frozen=True)
class ToolPlan:
    """The tools of one request and how the model may call them."""

    tools: tuple[Tool, ...]
    choice: str  # "auto", "none", "required", or "named"
    named: str | None = None
    parallel: bool = True
    format: CallFormat = PREAMBLE_FORMAT

    @property
    def specs(self) -> list[dict[str, Any]]:
        return [t.spec for t in self.tools]

    def constraint(self) -> dict[str, Any]:
        """The sampling constraint (``ebnf`` or ``json_schema``); {} for ``"none"``."""
        if self.choice == "none":
            return {}
        tools = [t for t in self.tools if self.choice != "named" or t.name == self.named]
        one, defs = calls_schema(tools, self.format.syntax.key)
        if self.choice == "auto":
            return {"ebnf": self.format.auto_grammar(_with_defs(one, defs), self.parallel)}
        several = self.choice == "required" and self.parallel
        return {"json_schema": _with_defs(self.format.calls_schema(one, several), defs)}

    def parser(self) -> CallParser | None:
        """A parser for one output of this plan; None when no call can appear."""
        if self.choice == "none":
            return None
        return CallParser(self.format.syntax, calls_only=self.choice != "auto")


def calls_schema(
    tools: list[Tool], key: str = "arguments"
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The schema of one call to any of ``tools`` -- ``{"name": <a tool's name>,
    <key>: <its parameters>}``, nothing else -- and the ``$defs`` it needs at the
    root. A tool whose parameters hold references moves there whole (``tool_<i>``),
    its references re-rooted, so that ``#/...`` still means its own root."""
    calls, defs = [], {}
    for i, tool in enumerate(tools):
        arguments = close_objects(tool.parameters)
        if _mentions_ref(arguments):
            name = f"tool_{i}"
            defs[name] = _rebase(arguments, f"#/$defs/{name}")
            arguments = {"$ref": f"#/$defs/{name}"}
        calls.append(
            {
                "type": "object",
                "properties": {"name": {"const": tool.name}, key: arguments},
                "required": ["name", key],
                "additionalProperties": False,
            }
        )
    return (calls[0] if len(calls) == 1 else {"anyOf": calls}), defs


def _with_defs(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "$defs": defs} if defs else schema


def _mentions_ref(node: Any) -> bool:
    if isinstance(node, dict):
        return "$ref" in node or any(_mentions_ref(v) for v in node.values())
    return isinstance(node, list) and any(_mentions_ref(v) for v in node)


def _rebase(node: Any, root: str) -> Any:
    """``node`` with each local ``$ref`` (``#...``) made relative to ``root``."""
    if isinstance(node, list):
        return [_rebase(v, root) for v in node]
    if not isinstance(node, dict):
        return node
    out = {
        k: (v if k in ("enum", "const", "default", "examples") else _rebase(v, root))
        for k, v in node.items()
    }
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#"):
        out["$ref"] = root + ref[1:]
    return out


# ---- checking the request -------------------------------------------------------------------


def plan_tools(
    tools: Any, tool_choice: Any, parallel: bool | None, engine: Any = None
) -> ToolPlan | None:
    """The request's tool plan, or None when it has no tools; a 400 naming the field
    for anything malformed. Calls take the form of ``engine``'s model (without one,
    the ``<tool_call>`` tags)."""
    if tools is not None and not isinstance(tools, list):
        raise APIError(400, "tools: must be a list of tools", param="tools")
    checked = tuple(_check_tool(i, t) for i, t in enumerate(tools or []))
    seen: dict[str, int] = {}
    for i, tool in enumerate(checked):
        if tool.name in seen:
            param = f"tools[{i}].function.name"
            raise APIError(
                400,
                f"{param}: duplicate function name {tool.name!r} (also tools[{seen[tool.name]}])",
                param=param,
            )
        seen[tool.name] = i
    if parallel is not None and not isinstance(parallel, bool):
        raise APIError(400, "parallel_tool_calls: must be a boolean", param="parallel_tool_calls")
    choice, named = _check_choice(tool_choice, seen)
    if not checked:
        return None
    fmt = call_format(engine) if engine is not None else PREAMBLE_FORMAT
    return ToolPlan(checked, choice, named, parallel is not False, fmt)


def _check_tool(i: int, tool: Any) -> Tool:
    where = f"tools[{i}]"
    if not isinstance(tool, dict):
        raise APIError(400, f"{where}: a tool must be an object", param=where)
    if tool.get("type", "function") != "function":
        raise APIError(
            400,
            f"{where}.type: only tools of type 'function' are supported, got {tool['type']!r}",
            param=f"{where}.type",
        )
    function = tool.get("function")
    if not isinstance(function, dict):
        raise APIError(
            400,
            f"{where}.function: a function tool needs a function object",
            param=f"{where}.function",
        )
    name = function.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        param = f"{where}.function.name"
        raise APIError(
            400, f"{param}: {name!r} must be 1 to 64 letters, digits, '_' or '-'", param=param
        )
    description = function.get("description")
    if description is not None and not isinstance(description, str):
        param = f"{where}.function.description"
        raise APIError(400, f"{param}: must be a string", param=param)
    parameters = function.get("parameters")
    if parameters is None:
        parameters = _NO_PARAMETERS
    _check_schema(f"{where}.function.parameters", parameters)
    spec = {"name": name, "parameters": parameters}
    if description is not None:
        spec = {"name": name, "description": description, "parameters": parameters}
    return Tool(name, parameters, {"type": "function", "function": spec})


def _check_schema(param: str, schema: Any) -> None:
    if not isinstance(schema, dict):
        raise APIError(
            400, f"{param}: must be a JSON Schema object, got {type(schema).__name__}", param=param
        )
    if not isinstance(schema.get("$schema", ""), str):
        raise APIError(400, f"{param}: $schema must be a URI string", param=param)
    validator = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        validator.check_schema(schema)
    except jsonschema.SchemaError as e:
        at = "".join(f"[{p!r}]" for p in e.absolute_path)
        raise APIError(
            400,
            f"{param}: not a valid JSON Schema: {e.message} (at {at or 'the root'})",
            param=param,
        ) from None


def _check_choice(choice: Any, names: dict[str, int]) -> tuple[str, str | None]:
    if choice is None:
        return ("auto" if names else "none"), None
    if isinstance(choice, str):
        if choice not in CHOICES:
            raise APIError(
                400,
                f"tool_choice: {choice!r} is not one of {list(CHOICES)} or a named function",
                param="tool_choice",
            )
        if choice == "required" and not names:
            raise APIError(400, "tool_choice: 'required' needs tools", param="tool_choice")
        return choice, None
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or choice.get("type", "function") != "function":
        raise APIError(
            400,
            'tool_choice: a named choice is {"type": "function", "function": {"name": ...}}',
            param="tool_choice",
        )
    if name not in names:
        raise APIError(
            400,
            f"tool_choice: function {name!r} is not among the tools ({sorted(names)})",
            param="tool_choice",
        )
    return "named", name


# ---- the prompt -------------------------------------------------------------------------------


def with_tool_fields(raw: list[Any], messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rendered messages with each one's ``tool_calls`` (arguments parsed, as
    templates take them) and a tool result's ``tool_call_id`` and function ``name``."""
    names: dict[str, str] = {}
    out = []
    for i, (m, message) in enumerate(zip(raw, messages, strict=True)):
        message = dict(message)
        if m.tool_calls:
            if m.role != "assistant":
                param = f"messages.{i}.tool_calls"
                raise APIError(
                    400, f"{param}: only assistant messages carry tool calls", param=param
                )
            message["tool_calls"] = [_past_call(i, j, c) for j, c in enumerate(m.tool_calls)]
            names.update((c["id"], c["function"]["name"]) for c in message["tool_calls"])
        if m.role == "tool":
            if not m.tool_call_id:
                param = f"messages.{i}.tool_call_id"
                raise APIError(
                    400, f"{param}: a tool message needs the id of its call", param=param
                )
            message["tool_call_id"] = m.tool_call_id
            name = m.name or names.get(m.tool_call_id)
            if name:
                message["name"] = name
        out.append(message)
    return out


def _past_call(i: int, j: int, call: dict[str, Any]) -> dict[str, Any]:
    where = f"messages.{i}.tool_calls.{j}"
    function = call.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise APIError(
            400, f"{where}.function.name: a call needs a name", param=f"{where}.function"
        )
    arguments = function.get("arguments", "{}")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as e:
            param = f"{where}.function.arguments"
            raise APIError(400, f"{param}: not valid JSON: {e}", param=param) from None
    return {
        "id": str(call.get("id") or new_call_id()),
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def render(engine: Any, messages: list[dict[str, Any]], plan: ToolPlan | None) -> str:
    """The prompt: the template's own tool rendering when it has one, else the tools
    and calls written into the messages (see the module docstring)."""
    tool_turns = any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
    if plan is None and not tool_turns:
        return engine.apply_chat_template(messages)
    try:
        if takes_tools(engine):
            if call_format(engine).syntax.short_ids:
                messages = short_ids(messages)
            return engine.apply_chat_template(messages, tools=plan.specs if plan else None)
        parts = engine.chat_template.content_parts
        return engine.apply_chat_template(written_in(messages, plan, parts))
    except jinja2.TemplateError as e:
        message = f"messages: the model's chat template refused them: {e}"
        raise APIError(400, message, param="messages") from None


def preamble(plan: ToolPlan) -> str:
    """The system text that shows the tools to a model whose template cannot."""
    listed = "\n".join(json.dumps(spec, ensure_ascii=False) for spec in plan.specs)
    return (
        "# Tools\n\nYou can call these functions; each is given as JSON, its arguments "
        f"as a JSON Schema:\n<tools>\n{listed}\n</tools>\n\n"
        "To call one, write its name and arguments as a JSON object between tags:\n"
        f'{OPEN}\n{{"name": <function name>, "arguments": <arguments object>}}\n{CLOSE}'
    )


def written_in(
    messages: list[dict[str, Any]], plan: ToolPlan | None, parts: bool = False
) -> list[dict[str, Any]]:
    """The messages for a template without tools: calls written into the assistant's
    text, consecutive tool results as one user turn, the tools in the system text.
    ``parts``: the template takes content as a list of parts (images stay in place)."""
    out: list[dict[str, Any]] = []
    results_open = False  # the last message out is a user turn of tool results
    for m in messages:
        if m["role"] == "tool":
            result = _join(_join("<tool_response>", m["content"], "\n"), "</tool_response>", "\n")
            if results_open:
                out[-1]["content"] = _join(out[-1]["content"], result, "\n")
            else:
                out.append({"role": "user", "content": result})
            results_open = True
            continue
        results_open = False
        content = m["content"]
        if m.get("tool_calls"):
            calls = "\n".join(write_call(c["function"]) for c in m["tool_calls"])
            content = _join(content, calls, "\n")
        out.append({"role": m["role"], "content": content})
    if plan is not None:
        text = preamble(plan)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": _join(out[0]["content"], text, "\n\n")}
        else:
            out.insert(0, {"role": "system", "content": [_part(text)] if parts else text})
    return out


def write_call(function: dict[str, Any]) -> str:
    """One call as the tagged output writes it."""
    call = {"name": function["name"], "arguments": function["arguments"]}
    return f"{OPEN}\n{json.dumps(call, ensure_ascii=False)}\n{CLOSE}"


def _part(text: str) -> dict[str, str]:
    return {"type": "text", "text": text}


def _join(head: Any, tail: Any, sep: str) -> Any:
    """Two contents (strings, or lists of parts) one after the other, ``sep`` between
    them when both have something."""
    if not head or not tail:
        return head or tail
    if isinstance(head, str) and isinstance(tail, str):
        return head + sep + tail
    as_parts = [c if isinstance(c, list) else [_part(c)] for c in (head, tail)]
    return [*as_parts[0], _part(sep), *as_parts[1]]


# ---- the response -------------------------------------------------------------------------------


def add_constraint(plan: ToolPlan | None, params: dict[str, Any]) -> None:
    """Constrain the sampling ``params`` to the plan's calls."""
    constraint = plan.constraint() if plan is not None else {}
    if constraint and any(k in params for k in ("regex", "ebnf", "json_schema")):
        raise APIError(
            400,
            "tool_choice: tool calls follow their own grammar; response_format, regex, ebnf "
            "and json_schema go with tools only under tool_choice 'none'",
            param="tool_choice",
        )
    params.update(constraint)
    if constraint and plan.format.keeps_special_tokens:  # the parser reads the markers
        params["skip_special_tokens"] = False


def ends_in_calls(parser: CallParser | None) -> bool:
    """Whether an output read by ``parser`` made tool calls and finished each one."""
    return parser is not None and bool(parser.calls) and parser.complete


def assistant_message(plan: ToolPlan | None, text: str) -> tuple[dict[str, Any], bool]:
    """The response message of one output, and whether it ends in tool calls."""
    parser = plan.parser() if plan is not None else None
    if parser is None:
        return {"role": "assistant", "content": text}, False
    parser.feed(text)
    parser.finish()
    calls = [c.to_openai() for c in parser.calls if c.done]
    if not calls:
        return {"role": "assistant", "content": parser.content}, False
    message = {"role": "assistant", "content": parser.content or None, "tool_calls": calls}
    return message, ends_in_calls(parser)


def stream_deltas(parser: CallParser | None, text: str, finished: bool) -> list[dict[str, Any]]:
    """The deltas of one streamed piece (``finished``: the output's last piece)."""
    if parser is None:
        return [{"content": text}] if text else []
    deltas = parser.feed(text)
    return merged(deltas + parser.finish()) if finished else deltas
