"""Tool calls in the form each model family's chat template teaches, through the
official ``openai`` client, on tiny random models whose tokenizers carry Llama 3.1's
and Mistral's tool templates (short but faithful copies below: no package installed
here ships them) and their special tokens.

Llama writes ``{"name": ..., "parameters": ...}``, after an optional
``<|python_tag|>``; Mistral ``[TOOL_CALLS][{"name": ..., "arguments": ...}]`` with call
ids of 9 letters and digits. For each: ``tool_choice`` auto / required / named,
streamed and not, give calls whose arguments validate against their tool's schema
whatever the seed; a model that never calls a tool ends its text as usual; decoding
never dead-ends, even on small budgets; and a call and its result go back through the
template as the template writes them (Llama's ipython turn, Mistral's
[TOOL_RESULTS])."""

from __future__ import annotations

import functools
import json
import re
from typing import Any, NamedTuple

import jsonschema
import openai
import pytest
import transformers
from common import GREEDY, MODEL
from fastapi.testclient import TestClient
from tiny_models import CHAT_TEMPLATE, make_tiny_model, make_tokenizer
from tool_cases import ASK, SCHEMAS, TOOLS

import plait
from plait.runtime.constrained.llguidance_backend import LlguidanceBackend
from plait.runtime.constrained.spec import GrammarSpec
from plait.runtime.constrained.vocab import TokenizerInfo
from plait.runtime.server import ServerConfig, create_app
from plait.runtime.server.tool_formats import call_format, detect, short_id
from plait.runtime.server.tool_parser import LLAMA, MISTRAL, CallParser
from plait.runtime.server.tools import (
    ToolPlan,
    add_constraint,
    assistant_message,
    plan_tools,
    render,
)

# Llama 3.1's tool template (meta-llama/Llama-3.1-8B-Instruct), without the built-in
# tools (brave_search, wolfram_alpha, code_interpreter): custom tools go into the first
# user turn, a call is {"name", "parameters"}, a result is an ipython turn.
LLAMA31_TEMPLATE = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
    {%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""
LLAMA31_TOKENS = [
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|python_tag|>",
]

# Mistral's v3 tool template (Mistral-7B-Instruct-v0.3): the tools in
# [AVAILABLE_TOOLS] before the last user turn, calls after [TOOL_CALLS] with ids of 9
# letters and digits, a result inside [TOOL_RESULTS].
MISTRAL_TEMPLATE = """{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != "return" %}
                    {%- if val is string %}
                        {{- '"' + key + '": "' + val + '"' }}
                    {%- else %}
                        {{- '"' + key + '": ' + val|tojson }}
                    {%- endif %}
                    {%- if not loop.last %}
                        {{- ", " }}
                    {%- endif %}
                {%- endfor %}
                {{- "}}" }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- else %}
                    {{- "]" }}
                {%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
        {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}
                {{- ", " }}
            {%- else %}
                {{- "]" + eos_token }}
            {%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}
        {%- if message.content is defined and message.content.content is defined %}
            {%- set content = message.content.content %}
        {%- else %}
            {%- set content = message.content %}
        {%- endif %}
        {{- '[TOOL_RESULTS] {"content": ' + content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""
MISTRAL_TOKENS = [
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "[TOOL_CALLS]",
    "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
]

NAMED = {"type": "function", "function": {"name": "draw_image"}}
# Llama's template shows the tools in some 1300 tokens of the tiny tokenizer: a longer context.
CONTEXT = 4096

# family -> (tokens, bos, eos, template, the marker that opens a call, architecture)
FAMILIES = {
    "llama": (
        LLAMA31_TOKENS,
        "<|begin_of_text|>",
        "<|eot_id|>",
        LLAMA31_TEMPLATE,
        "<|python_tag|>",
        "llama",
    ),
    "mistral": (MISTRAL_TOKENS, "<s>", "</s>", MISTRAL_TEMPLATE, "[TOOL_CALLS]", "mistral"),
}


def make_family_model(path, family: str) -> str:
    """The tiny model of ``family``'s architecture, its tokenizer given the family's
    special tokens, BOS / EOS and tool template (Llama's end of a turn and end of a
    message both end generation, as in its generation config)."""
    tokens, bos, eos, template, _, arch = FAMILIES[family]
    make_tiny_model(path, arch, vocab_size=512 + len(tokens), max_position_embeddings=CONTEXT)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    tokenizer.add_special_tokens({"bos_token": bos, "eos_token": eos})
    tokenizer.add_tokens(tokens, special_tokens=True)
    tokenizer.chat_template = template
    tokenizer.model_max_length = CONTEXT
    tokenizer.save_pretrained(path)
    ends = [tokenizer.convert_tokens_to_ids(t) for t in (eos, "<|eom_id|>") if t in tokens]
    transformers.GenerationConfig(eos_token_id=ends).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    path = make_family_model(tmp_path_factory.mktemp(f"tiny_{request.param}"), request.param)
    with plait.Engine(model=path, max_total_tokens=16384) as engine:
        yield from served(request.param, engine)


class Served(NamedTuple):
    name: str  # "llama" or "mistral"
    client: openai.OpenAI  # talks to the app in process, through a TestClient
    engine: Any

    def chat(self, **body) -> Any:
        return self.client.chat.completions.create(model=MODEL, **body)

    @property
    def marker(self) -> str:
        return FAMILIES[self.name][4]

    def opener_bias(self) -> dict:
        """A logit bias that makes the model open a call at once."""
        return {str(self.engine.tokenizer.convert_tokens_to_ids(self.marker)): 100}


def served(name: str, engine):
    app = create_app(engine, ServerConfig(served_model_name=MODEL))
    with (
        TestClient(app) as http,
        openai.OpenAI(
            base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0
        ) as client,
    ):
        yield Served(name, client, engine)


def spy_prompts(monkeypatch, engine) -> list[str]:
    """The prompts the engine is given from now on."""
    prompts: list[str] = []
    submit = engine.async_generate

    def recording(inp):
        prompts.append(inp.prompt)
        return submit(inp)

    monkeypatch.setattr(engine, "async_generate", recording)
    return prompts


def assert_valid_calls(server: Served, message, names=tuple(SCHEMAS)) -> list:
    """Each call is well formed, with the family's kind of id, and its arguments
    validate against its tool; Llama's form holds one call."""
    assert message.tool_calls, message
    for call in message.tool_calls:
        if server.name == "mistral":
            assert re.fullmatch(r"[0-9a-f]{9}", call.id)
        else:
            assert call.id.startswith("call_")
        assert call.type == "function" and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    if server.name == "llama":
        assert len(message.tool_calls) == 1
    return message.tool_calls


def streamed(server: Served, **body) -> tuple[list, str | None, str]:
    """The (name, arguments) of the calls of a streamed response, its finish reason and
    content; each call's first delta has its id and name, later ones only arguments."""
    calls: dict[int, list] = {}
    finish, content = None, ""
    for chunk in server.chat(stream=True, **body):
        (choice,) = chunk.choices
        content += choice.delta.content or ""
        for d in choice.delta.tool_calls or []:
            if d.index not in calls:
                assert d.id and d.type == "function" and d.function.name
                calls[d.index] = [d.function.name, ""]
            else:
                assert d.id is None and d.function.name is None
            calls[d.index][1] += d.function.arguments or ""
        if choice.finish_reason is not None:
            assert finish is None
            finish = choice.finish_reason
    assert sorted(calls) == list(range(len(calls)))
    return [tuple(calls[i]) for i in sorted(calls)], finish, content


def named_calls(message) -> list[tuple[str, str]]:
    return [(c.function.name, c.function.arguments) for c in message.tool_calls or []]


# ---- which form ------------------------------------------------------------------------------


def test_the_form_is_read_from_the_template(family):
    fmt = call_format(family.engine)
    marker = family.engine.tokenizer.convert_tokens_to_ids(family.marker)
    assert fmt.name == family.name and fmt.opener == f"<[{marker}]>"
    assert fmt.syntax == (LLAMA if family.name == "llama" else MISTRAL)
    assert fmt.keeps_special_tokens


def test_other_templates_forms(tmp_path):
    """Llama 4's template (shipped with transformers) teaches Llama's call object; with
    no <|python_tag|> token the reply is the call or text that does not open with "{".
    A template without tools, or with <tool_call> tags, keeps the tags."""
    from transformers.models.llama4 import processing_llama4

    tokenizer = make_tokenizer(tmp_path)
    llama4 = detect(processing_llama4.chat_template, tokenizer)
    assert (llama4.name, llama4.syntax.key, llama4.syntax.opener) == ("llama", "parameters", "")
    plan = ToolPlan(plan_tools(TOOLS, "auto", None).tools, "auto", format=llama4)
    new_matcher = auto_matcher(tokenizer, plan.constraint()["ebnf"])
    encode = functools.partial(tokenizer.encode, add_special_tokens=False)
    assert accepts(new_matcher, encode('{"name": "get_weather", "parameters": {"city": "Rome"}}'))
    assert accepts(new_matcher, encode("Hello {there}"))
    assert not accepts(new_matcher, encode('{"city": "Rome"}'))
    assert detect(CHAT_TEMPLATE, tokenizer).syntax.opener == "<tool_call>"
    assert detect("{{ '<tool_call>' }}", tokenizer).name == "hermes"


def auto_matcher(tokenizer, grammar: str):
    """A fresh matcher factory for ``grammar`` over ``tokenizer``."""
    info = TokenizerInfo.from_hf(tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    return LlguidanceBackend(info).compile(GrammarSpec("ebnf", grammar)).matcher


def accepts(new_matcher, ids: list[int]) -> bool:
    """Whether the grammar takes each of ``ids`` in turn and may end there."""
    m = new_matcher()
    return all(m.accept(t) for t in ids) and m.can_stop()


def spelled_out(tokenizer, text: str) -> list[int]:
    """``text`` in ordinary tokens, one character at a time (never a special token)."""
    return [t for ch in text for t in tokenizer.encode(ch, add_special_tokens=False)]


def test_text_never_spells_out_the_marker(family):
    """Under auto, a call opens with the marker's special token; text that spells the
    marker out in ordinary tokens is refused, as the parser would read a call there."""
    tokenizer = family.engine.tokenizer
    new_matcher = auto_matcher(
        tokenizer, plan_tools(TOOLS, "auto", None, family.engine).constraint()["ebnf"]
    )
    encode = functools.partial(tokenizer.encode, add_special_tokens=False)
    marker = tokenizer.convert_tokens_to_ids(family.marker)
    if family.name == "llama":
        lead, call = "", '{"name": "get_weather", "parameters": {"city": "Rome"}}'
    else:
        lead, call = "Sure.", '[{"name": "get_weather", "arguments": {"city": "Rome"}}]'
    assert accepts(new_matcher, encode(lead) + [marker] + encode(call))
    assert accepts(new_matcher, encode(lead + " the " + family.marker[:-1]))
    assert not accepts(
        new_matcher, encode(lead) + spelled_out(tokenizer, family.marker) + encode(call)
    )
    m = new_matcher()
    assert not all(m.accept(t) for t in encode(lead) + spelled_out(tokenizer, family.marker))


def test_hermes_tags_held_as_special_tokens(tmp_path):
    """A tokenizer that holds <tool_call> and </tool_call> as special tokens: the grammar
    takes them by id, the output keeps them, and the parser reads the call."""
    tokenizer = make_tokenizer(tmp_path)
    tokenizer.add_tokens(["<tool_call>", "</tool_call>"], special_tokens=True)
    opener, closer = tokenizer.convert_tokens_to_ids(["<tool_call>", "</tool_call>"])
    fmt = detect("{{ '<tool_call>' }}", tokenizer)
    assert (fmt.opener, fmt.closer, fmt.keeps_special_tokens) == (
        f"<[{opener}]>",
        f"<[{closer}]>",
        True,
    )
    plan = ToolPlan(plan_tools(TOOLS, "auto", None).tools, "auto", format=fmt)
    new_matcher = auto_matcher(tokenizer, plan.constraint()["ebnf"])
    call = '{"name": "get_weather", "arguments": {"city": "Oslo"}}'
    encode = functools.partial(tokenizer.encode, add_special_tokens=False)
    ids = encode("Sure.") + [opener] + encode("\n" + call + "\n") + [closer]
    assert accepts(new_matcher, ids)
    assert not accepts(new_matcher, encode("Sure.") + spelled_out(tokenizer, "<tool_call>"))
    params: dict = {}
    add_constraint(plan, params)
    assert params["skip_special_tokens"] is False
    message, called = assistant_message(plan, tokenizer.decode(ids, skip_special_tokens=False))
    assert called and message["content"] == "Sure."
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]] == [
        ("get_weather", '{"city": "Oslo"}')
    ]


# ---- tool_choice ------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_required_calls_always_validate(family, seed):
    r = family.chat(
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        temperature=1.0,
        seed=seed,
        n=2,
        max_tokens=96,
    )
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert_valid_calls(family, choice.message)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_named_choice_calls_that_function_once(family, seed):
    common = dict(
        messages=ASK, tools=TOOLS, tool_choice=NAMED, temperature=1.0, seed=seed, max_tokens=64
    )
    (choice,) = family.chat(**common).choices
    assert choice.finish_reason == "tool_calls"
    (call,) = assert_valid_calls(family, choice.message, names=("draw_image",))
    calls, finish, content = streamed(family, **common)
    assert (calls, finish, content) == ([("draw_image", call.function.arguments)], "tool_calls", "")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auto_call_in_the_familys_own_form(family, seed):
    """Biased to open a call with the family's marker, the model's call is read out
    of it, valid, and the same streamed."""
    common = dict(
        messages=ASK,
        tools=TOOLS,
        temperature=1.0,
        seed=seed,
        max_tokens=96,
        logit_bias=family.opener_bias(),
    )
    (choice,) = family.chat(**common).choices
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert_valid_calls(family, choice.message)
    calls, finish, content = streamed(family, **common)
    assert (calls, finish, content) == (named_calls(choice.message), "tool_calls", "")


@pytest.mark.parametrize("choice", ["auto", "required"])
def test_the_output_is_the_familys_form(family, choice):
    """What the model wrote: Llama's call object (after <|python_tag|> when it opened
    with it), Mistral's [TOOL_CALLS] array -- or, under required, the same JSON without
    the marker -- and the message reads the same calls out of it."""
    engine = family.engine
    plan = plan_tools(TOOLS, choice, None, engine)
    params = {"temperature": 1.0, "seed": 5, "max_new_tokens": 96}
    if choice == "auto":
        params["logit_bias"] = {int(k): v for k, v in family.opener_bias().items()}
    add_constraint(plan, params)
    text = engine.generate(render(engine, ASK, plan), params)["text"]
    message, called = assistant_message(plan, text)
    if choice == "auto":
        assert text.startswith(family.marker)
        text = text[len(family.marker) :]
    written = json.loads(text)
    if family.name == "llama":
        assert list(written) == ["name", "parameters"]
        written = [{"name": written["name"], "arguments": written["parameters"]}]
    assert isinstance(written, list) and all(list(c) == ["name", "arguments"] for c in written)
    assert called and message["content"] is None
    read = [
        (c["function"]["name"], json.loads(c["function"]["arguments"]))
        for c in message["tool_calls"]
    ]
    assert read == [(c["name"], c["arguments"]) for c in written]
    for c in written:
        jsonschema.validate(c["arguments"], SCHEMAS[c["name"]])


def test_auto_lets_plain_text_through(family):
    """Left to itself the random model writes text, not a call: the answer is content,
    what the engine writes for the same prompt under the tools' grammar."""
    common = dict(
        messages=ASK, tools=TOOLS, temperature=0, max_tokens=12, extra_body={"ignore_eos": True}
    )
    (auto,) = family.chat(**common).choices
    assert auto.message.tool_calls is None and auto.finish_reason == "length"
    plan = plan_tools(TOOLS, "auto", None, family.engine)
    params = {**GREEDY, "max_new_tokens": 12}
    add_constraint(plan, params)
    ref = family.engine.generate(render(family.engine, ASK, plan), params)
    assert auto.message.content == ref["text"] and ref["text"]
    assert family.marker not in ref["text"] and not ref["text"].lstrip().startswith("{")


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_a_model_that_never_calls_finishes_normally(family, seed):
    """Sampled freely, then made to end: text and its end of turn, no call."""
    common = dict(messages=ASK, tools=TOOLS, temperature=1.0, seed=seed, max_tokens=20)
    (free,) = family.chat(**common).choices
    assert free.finish_reason in ("stop", "length") and free.message.tool_calls is None
    eos = family.engine.tokenizer.eos_token_id
    (ended,) = family.chat(**common, logit_bias={str(eos): 100}).choices
    assert ended.finish_reason == "stop" and ended.message.tool_calls is None
    assert ended.message.content == ""


@pytest.mark.parametrize("max_tokens", [4, 9, 17, 30])
@pytest.mark.parametrize("choice", ["auto", "auto-biased", "required", "named"])
def test_decoding_never_dead_ends(family, choice, max_tokens):
    """On any budget, at any seed, a reply ends as text, as calls or at the length
    limit -- never aborted by a grammar with no way on; every call it returns is valid,
    and a reply that ends in calls finished each of them."""
    body: dict[str, Any] = dict(messages=ASK, tools=TOOLS, temperature=1.0, max_tokens=max_tokens)
    if choice == "auto-biased":
        body["logit_bias"] = family.opener_bias()
    elif choice != "auto":
        body["tool_choice"] = NAMED if choice == "named" else "required"
    for seed in range(3):
        (c,) = family.chat(**body, seed=seed).choices
        assert c.finish_reason in ("stop", "length", "tool_calls"), c
        if c.message.tool_calls:
            assert_valid_calls(family, c.message)
        if c.finish_reason == "tool_calls":
            assert c.message.tool_calls


# ---- a call and its result go back through the template ------------------------------------


def test_a_call_and_its_result_round_trip(family, monkeypatch):
    """The call the model made, sent back with its result, is rendered by the
    family's template: Llama's call object and ipython turn (its template writes a
    string result as JSON), Mistral's [TOOL_CALLS] and [TOOL_RESULTS] with the call's
    own 9-character id."""
    engine = family.engine
    r = family.chat(
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        seed=1,
        max_tokens=64,
    )
    (call,) = r.choices[0].message.tool_calls
    prompts = spy_prompts(monkeypatch, engine)
    conversation = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "18 degrees, sunny"},
    ]
    family.chat(messages=conversation, tools=TOOLS, max_tokens=2)
    arguments = call.function.arguments
    if family.name == "llama":
        turns = (
            '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", '
            f'"parameters": {arguments}}}<|eot_id|>'
            '<|start_header_id|>ipython<|end_header_id|>\n\n"18 degrees, sunny"<|eot_id|>'
        )
    else:
        turns = (
            f'[TOOL_CALLS] [{{"name": "get_weather", "arguments": {arguments}, "id": "{call.id}"}}]</s>'
            f'[TOOL_RESULTS] {{"content": 18 degrees, sunny, "call_id": "{call.id}"}}[/TOOL_RESULTS]'
        )
    (prompt,) = prompts
    assert turns in prompt
    parsed = {
        **call.model_dump(),
        "function": {"name": "get_weather", "arguments": json.loads(arguments)},
    }
    expected = [
        conversation[0],
        {**conversation[1], "content": "", "tool_calls": [parsed]},
        conversation[2],
    ]
    assert prompt == engine.apply_chat_template(expected, tools=TOOLS)


@pytest.mark.parametrize("family", ["mistral"], indirect=True)
def test_mistral_takes_any_call_id(family, monkeypatch):
    """Mistral's template takes 9-character ids only: a client's own ids are mapped
    onto such ids, the same for a call and its result."""
    prompts = spy_prompts(monkeypatch, family.engine)
    call = {
        "id": "call_abc",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
    }
    conversation = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_abc", "content": "20 degrees"},
    ]
    family.chat(messages=conversation, tools=TOOLS, max_tokens=2)
    short = short_id("call_abc")
    assert re.fullmatch(r"[0-9a-f]{9}", short) and short_id(short) == short
    (prompt,) = prompts
    assert f'"arguments": {{"city": "Rome"}}, "id": "{short}"}}]</s>' in prompt
    assert f'{{"content": 20 degrees, "call_id": "{short}"}}[/TOOL_RESULTS]' in prompt


# ---- reading the forms, in pieces of any size ------------------------------------------------

READ = {
    "llama-tagged": (
        LLAMA,
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}',
        "",
        [("get_weather", '{"city": "Oslo"}')],
    ),
    "llama-bare": (
        LLAMA,
        '\n{"name": "draw_image", "parameters": {"prompt": "}", "steps": 2}}',
        "",
        [("draw_image", '{"prompt": "}", "steps": 2}')],
    ),
    "llama-text": (LLAMA, "  [1, 2] is <|not a call {", "  [1, 2] is <|not a call {", []),
    "llama-text-like-the-tag": (LLAMA, "<|python", "<|python", []),
    "mistral-text-then-calls": (
        MISTRAL,
        'Let me see. [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Rome"}}, '
        '{"name": "draw_image", "arguments": {"prompt": "a ]", "steps": 1}}]',
        "Let me see.",
        [("get_weather", '{"city": "Rome"}'), ("draw_image", '{"prompt": "a ]", "steps": 1}')],
    ),
    "mistral-text": (MISTRAL, "[TOOL no call [", "[TOOL no call [", []),
}


@pytest.mark.parametrize("case", list(READ))
@pytest.mark.parametrize("size", [1, 2, 5, 1000])
def test_each_form_reads_the_same_whatever_the_pieces(case, size):
    syntax, text, content, calls = READ[case]
    parser = CallParser(syntax)
    deltas = []
    for k in range(0, len(text), size):
        deltas += parser.feed(text[k : k + size])
    deltas += parser.finish()
    assert parser.content == content and parser.complete
    assert [(c.name, c.arguments) for c in parser.calls] == calls
    assert "".join(d.get("content", "") for d in deltas) == content
    if syntax is MISTRAL:
        assert all(re.fullmatch(r"[0-9a-f]{9}", c.id) for c in parser.calls)
