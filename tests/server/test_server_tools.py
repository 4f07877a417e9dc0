"""Tool calling on /v1/chat/completions through the official ``openai`` client, in
process, on two tiny random models: one whose chat template renders tools itself (a
Hermes-style template written here, with ``<tool_call>`` tokens like Qwen's), and the
plain ChatML one, which gets the tools in a system preamble. Every call the model
makes validates against its tool's schema, whatever the seed; ``tool_choice`` auto,
required, named and none each give what they promise, streamed and not; tool results
sent back are rendered by the template; bad tools are 400s naming the field, and the
server keeps serving."""

from __future__ import annotations

import json
from typing import Any, NamedTuple

import jsonschema
import openai
import pytest
import transformers
from common import GREEDY, MODEL, assert_kv_all_free
from fastapi.testclient import TestClient
from tiny_models import make_tiny_model
from tool_cases import ASK, DRAW, SCHEMAS, TOOLS, WEATHER

import plait
from plait.runtime.server import ServerConfig, create_app
from plait.runtime.server.tool_parser import HERMES, MISTRAL, CallParser
from plait.runtime.server.tools import (
    plan_tools,
    preamble,
    render,
    stream_deltas,
    written_in,
)

# A Hermes-style template (the layout Qwen2.5's uses): the tools in the system turn,
# calls inside <tool_call> tags, results as a user turn inside <tool_response> tags.
TOOLS_TEMPLATE = (
    "{%- if tools %}{{ '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{ messages[0].content + '\\n\\n' }}{% endif %}"
    '{{ \'# Tools\\nCall a function as <tool_call>\\n{"name": ..., "arguments": ...}'
    "\\n</tool_call>\\n<tools>' }}"
    "{%- for tool in tools %}{{ '\\n' + (tool | tojson) }}{% endfor %}"
    "{{ '\\n</tools><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{ '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}{% endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'tool' %}"
    "{{ '<|im_start|>user\\n<tool_response>\\n' + message.content"
    " + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- elif message.role != 'system' %}"
    "{{ '<|im_start|>' + message.role + '\\n' + (message.content or '') }}"
    "{%- for call in message.tool_calls or [] %}"
    "{{ '\\n<tool_call>\\n' + ({'name': call.function.name, 'arguments':"
    " call.function.arguments} | tojson) + '\\n</tool_call>' }}"
    "{%- endfor %}{{ '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TAGS = ["<tool_call>", "</tool_call>"]  # added tokens (not special), as in Qwen2.5
# The tools take some 450 tokens of the tiny tokenizer's prompt: a longer context.
CONTEXT = 2048


@pytest.fixture(scope="module")
def tools_model_dir(tmp_path_factory) -> str:
    """The tiny Llama with two more tokens (the tags) and the tools template."""
    path = tmp_path_factory.mktemp("tiny_tools")
    make_tiny_model(path, "llama", vocab_size=512 + len(TAGS), max_position_embeddings=CONTEXT)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    tokenizer.add_tokens(TAGS)
    tokenizer.chat_template = TOOLS_TEMPLATE
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tools_engine(tools_model_dir):
    with plait.Engine(model=tools_model_dir, max_total_tokens=8192) as eng:
        yield eng


@pytest.fixture(scope="module")
def plain_engine(tiny_model_dir):
    """The tiny Llama with its ChatML template, which renders no tools."""
    model = tiny_model_dir("llama", max_position_embeddings=CONTEXT)
    with plait.Engine(model=model, max_total_tokens=8192) as eng:
        yield eng


class Served(NamedTuple):
    client: openai.OpenAI  # talks to the app in process, through a TestClient
    engine: Any

    def chat(self, **body) -> Any:
        return self.client.chat.completions.create(model=MODEL, **body)


def served(engine):
    app = create_app(engine, ServerConfig(served_model_name=MODEL))
    with (
        TestClient(app) as http,
        openai.OpenAI(
            base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0
        ) as client,
    ):
        yield Served(client, engine)


@pytest.fixture(scope="module")
def hermes(tools_engine):
    """The model whose template renders tools."""
    yield from served(tools_engine)


@pytest.fixture(scope="module")
def plain(plain_engine):
    """The model whose template knows nothing of tools."""
    yield from served(plain_engine)


@pytest.fixture(params=["hermes", "plain"])
def oai(request):
    return request.getfixturevalue(request.param)


def spy_prompts(monkeypatch, engine) -> list[str]:
    """The prompts the engine is given from now on."""
    prompts: list[str] = []
    submit = engine.async_generate

    def recording(inp):
        prompts.append(inp.prompt)
        return submit(inp)

    monkeypatch.setattr(engine, "async_generate", recording)
    return prompts


def assert_valid_calls(message, names=tuple(SCHEMAS)) -> list:
    """Each call is well formed and its arguments validate against its tool."""
    assert message.tool_calls, message
    for call in message.tool_calls:
        assert call.id.startswith("call_") and call.type == "function"
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    return message.tool_calls


def streamed(server: Served, **body) -> tuple[dict, str | None, str]:
    """The tool calls (index -> id, name, arguments), finish reason and content of a
    streamed response, checking that each call's first delta has its id and name and
    later ones only arguments."""
    calls: dict[int, dict] = {}
    finish, content = None, ""
    for chunk in server.chat(stream=True, **body):
        (choice,) = chunk.choices
        content += choice.delta.content or ""
        for d in choice.delta.tool_calls or []:
            if d.index not in calls:
                assert d.id.startswith("call_") and d.type == "function" and d.function.name
                calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": ""}
            else:
                assert d.id is None and d.function.name is None
            calls[d.index]["arguments"] += d.function.arguments or ""
        if choice.finish_reason is not None:
            assert finish is None
            finish = choice.finish_reason
    return calls, finish, content


# ---- tool_choice ------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_required_calls_always_validate(oai, seed):
    r = oai.chat(
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        temperature=1.0,
        seed=seed,
        n=2,
        max_tokens=96,
    )
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None
        assert len(assert_valid_calls(choice.message)) >= 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_named_choice_calls_that_function_once(oai, seed):
    named = {"type": "function", "function": {"name": "draw_image"}}
    r = oai.chat(
        messages=ASK,
        tools=TOOLS,
        tool_choice=named,
        temperature=1.0,
        seed=seed,
        max_tokens=64,
    )
    (choice,) = r.choices
    assert choice.finish_reason == "tool_calls"
    (call,) = assert_valid_calls(choice.message, names=("draw_image",))
    assert call.function.name == "draw_image"


def test_required_without_parallel_calls_makes_one_call(oai):
    r = oai.chat(
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        temperature=1.0,
        seed=7,
        parallel_tool_calls=False,
        max_tokens=64,
    )
    assert len(assert_valid_calls(r.choices[0].message)) == 1


def tag_bias(server: Served) -> dict:
    """A logit bias that makes the model open a call at once."""
    tokenizer = server.engine.tokenizer
    return {str(tokenizer.convert_tokens_to_ids("<tool_call>")): 100}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auto_call_in_the_templates_own_tags_validates(hermes, seed):
    """Biased to open a <tool_call> tag, the model's call is read out of it, valid."""
    common = dict(
        messages=ASK,
        tools=TOOLS,
        temperature=1.0,
        seed=seed,
        max_tokens=64,
        parallel_tool_calls=False,
        logit_bias=tag_bias(hermes),
    )
    r = hermes.chat(**common)
    (choice,) = r.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = assert_valid_calls(choice.message)
    # Streamed, the same seed gives the same call, in deltas.
    calls, finish, content = streamed(hermes, **common)
    assert finish == "tool_calls" and content == ""
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (call.function.name, call.function.arguments)
    ]


def test_auto_never_begins_a_call_it_cannot_finish(hermes):
    """A call needs some 35 tokens here: with 16, budget-aware decoding takes the
    shortest complete output instead of a call cut short -- empty text."""
    r = hermes.chat(
        messages=ASK,
        tools=TOOLS,
        temperature=1.0,
        seed=3,
        max_tokens=16,
        parallel_tool_calls=False,
        logit_bias=tag_bias(hermes),
    )
    (choice,) = r.choices
    assert choice.message.tool_calls is None and choice.message.content == ""
    assert choice.finish_reason == "length"


# Parameters with references, as pydantic writes them: the call's schema keeps them valid.
LIST = {
    "type": "function",
    "function": {
        "name": "make_list",
        "parameters": {
            "$defs": {
                "Item": {
                    "type": "object",
                    "properties": {"label": {"enum": ["a", "b"]}, "count": {"type": "integer"}},
                    "required": ["label", "count"],
                }
            },
            "type": "object",
            "properties": {"items": {"type": "array", "items": {"$ref": "#/$defs/Item"}}},
            "required": ["items"],
        },
    },
}


@pytest.mark.parametrize("seed", [0, 1])
def test_parameters_with_references_validate(plain, seed):
    r = plain.chat(
        messages=ASK,
        tools=[DRAW, LIST],
        temperature=1.0,
        seed=seed,
        max_tokens=96,
        tool_choice={"type": "function", "function": {"name": "make_list"}},
    )
    (call,) = r.choices[0].message.tool_calls
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, LIST["function"]["parameters"])
    assert call.function.name == "make_list" and isinstance(arguments["items"], list)


def test_auto_lets_plain_text_through(oai):
    """Left to itself the random model writes text, not tags: the answer is content,
    what the engine writes for the same prompt under the tools' grammar (which, unlike
    tool_choice none, keeps the text valid UTF-8)."""
    common = dict(
        messages=ASK, tools=TOOLS, temperature=0, max_tokens=12, extra_body={"ignore_eos": True}
    )
    auto = oai.chat(**common).choices[0]
    assert auto.message.tool_calls is None and auto.finish_reason == "length"
    plan = plan_tools(TOOLS, "auto", None)
    prompt = render(oai.engine, ASK, plan)
    ref = oai.engine.generate(
        prompt, {**GREEDY, "max_new_tokens": 12, "ebnf": plan.constraint()["ebnf"]}
    )
    assert auto.message.content == ref["text"] and "<tool_call>" not in ref["text"]
    none = oai.chat(tool_choice="none", **common).choices[0]
    assert none.message.tool_calls is None and none.message.content


def test_none_never_reads_calls(hermes):
    """tool_choice none: even text that opens a tag stays text."""
    r = hermes.chat(
        messages=ASK,
        tools=TOOLS,
        tool_choice="none",
        max_tokens=8,
        temperature=0,
        extra_body={"ignore_eos": True},
        logit_bias=tag_bias(hermes),
    )
    (choice,) = r.choices
    assert choice.message.tool_calls is None and choice.finish_reason == "length"
    assert choice.message.content.startswith("<tool_call>")


def test_without_tools_a_reply_is_as_before(oai):
    """No tools: the template is rendered as it always was, and the message is text."""
    r = oai.client.chat.completions.with_raw_response.create(
        model=MODEL, messages=ASK, max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
    )
    (choice,) = r.http_response.json()["choices"]
    prompt = oai.engine.apply_chat_template(ASK)
    ref = oai.engine.generate(prompt, {**GREEDY, "max_new_tokens": 6})
    assert choice["message"] == {"role": "assistant", "content": ref["text"]}
    assert choice["finish_reason"] == "length"


# ---- streaming ----------------------------------------------------------------------------------


@pytest.mark.parametrize("choice", ["required", "named"])
def test_streamed_calls_equal_the_whole_response(oai, choice):
    tool_choice = "required"
    if choice == "named":
        tool_choice = {"type": "function", "function": {"name": "get_weather"}}
    common = dict(
        messages=ASK,
        tools=TOOLS,
        tool_choice=tool_choice,
        temperature=1.0,
        seed=11,
        max_tokens=96,
    )
    whole = oai.chat(**common).choices[0]
    calls, finish, content = streamed(oai, **common)
    assert finish == whole.finish_reason == "tool_calls" and content == ""
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (c.function.name, c.function.arguments) for c in assert_valid_calls(whole.message)
    ]
    assert sorted(calls) == list(range(len(calls)))


# ---- reading calls out of the output -----------------------------------------------------------

TAGGED = (
    "Checking.\n<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Ro}me"}}\n</tool_call>\n<tool_call>\n'
    '{"name": "draw_image", "arguments": {"prompt": "a \\"cat\\"", "steps": 3}}\n</tool_call>'
)
JSON_CALLS = (
    '[{"name":"get_weather","arguments":{"city":"Oslo"}},'
    '{"name":"draw_image","arguments":{"prompt":"]","steps":1}}]'
)
MISTRAL_CALLS = (
    'Sure. [TOOL_CALLS][{"name":"get_weather","arguments":{"city":"Oslo"}},'
    '{"name":"draw_image","arguments":{"prompt":"]","steps":1}}]'
)
READ = {
    "tagged": (
        TAGGED,
        "Checking.",
        [
            ("get_weather", '{"city": "Ro}me"}'),
            ("draw_image", '{"prompt": "a \\"cat\\"", "steps": 3}'),
        ],
    ),
    "json": (
        JSON_CALLS,
        "",
        [("get_weather", '{"city":"Oslo"}'), ("draw_image", '{"prompt":"]","steps":1}')],
    ),
    "mistral": (
        MISTRAL_CALLS,
        "Sure.",
        [("get_weather", '{"city":"Oslo"}'), ("draw_image", '{"prompt":"]","steps":1}')],
    ),
    "no-call": ("Hello <tool but not a call\n", "Hello <tool but not a call\n", []),
}


@pytest.mark.parametrize("case", list(READ))
@pytest.mark.parametrize("size", [1, 2, 5, 1000])
def test_calls_read_the_same_whatever_the_pieces(case, size):
    """Streamed in pieces of any size, the deltas add up to the same content and calls;
    each call's first delta names it, the rest carry its arguments."""
    text, content, calls = READ[case]
    parser = CallParser(MISTRAL if case == "mistral" else HERMES, calls_only=case == "json")
    deltas = []
    for k in range(0, len(text), size):
        deltas += stream_deltas(parser, text[k : k + size], k + size >= len(text))
    assert parser.content == content and parser.complete
    assert [(c.name, c.arguments) for c in parser.calls] == calls
    assert "".join(d.get("content", "") for d in deltas) == content
    arguments = {}
    for d in (d["tool_calls"][0] for d in deltas if "tool_calls" in d):
        if "id" in d:
            assert d["index"] == len(arguments) and d["function"]["arguments"] == ""
            arguments[d["index"]] = ""
        arguments[d["index"]] += d["function"]["arguments"]
    assert list(arguments.values()) == [a for _, a in calls]


def test_a_call_cut_short_is_not_complete():
    parser = CallParser(HERMES)
    parser.feed('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa')
    parser.finish()
    assert [(c.name, c.done) for c in parser.calls] == [("get_weather", False)]
    assert not parser.complete


# ---- tool results back into the conversation ----------------------------------------------------

CALLED = [
    *ASK,
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"},
]


def test_tool_result_is_rendered_by_the_models_template(hermes, tools_engine, monkeypatch):
    prompts = spy_prompts(monkeypatch, tools_engine)
    hermes.chat(messages=CALLED, tools=TOOLS, max_tokens=2)
    called = {"name": "get_weather", "arguments": {"city": "Paris"}}
    expected = tools_engine.apply_chat_template(
        [
            *ASK,
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"id": "call_1", "type": "function", "function": called}],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"},
        ],
        tools=TOOLS,
    )
    assert prompts == [expected]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in (
        expected
    )
    assert "<tool_response>\n18 degrees, sunny\n</tool_response>" in expected
    assert json.dumps(DRAW) in expected  # the template listed the tools


def test_without_template_support_tools_and_results_are_written_in(plain, monkeypatch):
    engine = plain.engine
    prompts = spy_prompts(monkeypatch, engine)
    plain.chat(messages=CALLED, tools=TOOLS, max_tokens=2)
    plan = plan_tools(TOOLS, None, None)
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    expected = engine.apply_chat_template(
        [
            {"role": "system", "content": preamble(plan)},
            *ASK,
            {"role": "assistant", "content": call},
            {"role": "user", "content": "<tool_response>\n18 degrees, sunny\n</tool_response>"},
        ]
    )
    assert prompts == [expected]
    assert json.dumps(WEATHER) in preamble(plan) and "<tool_call>" in preamble(plan)


def test_a_tool_result_needs_no_tools_in_the_request(plain, monkeypatch):
    """A follow-up without ``tools``: the calls and results are still written in, and
    the answer is plain text."""
    prompts = spy_prompts(monkeypatch, plain.engine)
    r = plain.chat(messages=CALLED, max_tokens=4)
    assert r.choices[0].message.tool_calls is None
    assert "<tool_response>\n18 degrees, sunny\n</tool_response>" in prompts[0]
    assert "# Tools" not in prompts[0]


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


def test_for_a_template_of_parts_an_image_in_a_tool_result_stays_in_place():
    """A vision model's template takes lists of parts: the image a tool returned is
    shown where the result has it, inside the response tags."""
    plan = plan_tools([DRAW], None, None)
    result = [{"type": "image"}, text_part("a cat")]
    messages = [
        {"role": "user", "content": [text_part("Draw a cat.")]},
        {"role": "tool", "tool_call_id": "call_1", "content": result},
        {"role": "tool", "tool_call_id": "call_2", "content": [text_part("done")]},
    ]
    system, user, results = written_in(messages, plan, parts=True)
    assert system == {"role": "system", "content": [text_part(preamble(plan))]}
    assert user == messages[0]
    opening, closing = text_part("<tool_response>"), text_part("</tool_response>")
    nl = text_part("\n")
    assert results == {
        "role": "user",
        "content": [
            opening,
            nl,
            *result,
            nl,
            closing,
            nl,
            opening,
            nl,
            text_part("done"),
            nl,
            closing,
        ],
    }


# ---- bad input ------------------------------------------------------------------------------------


def with_parameters(parameters) -> dict:
    return {"type": "function", "function": {"name": "f", "parameters": parameters}}


BAD = {
    "invalid-schema": (
        {"tools": [WEATHER, with_parameters({"type": "objec"})]},
        "tools[1].function.parameters",
    ),
    "schema-not-an-object": ({"tools": [with_parameters([1, 2])]}, "tools[0].function.parameters"),
    "bad-keyword-value": (
        {"tools": [with_parameters({"type": "object", "required": "city"})]},
        "tools[0].function.parameters",
    ),
    "duplicate-names": ({"tools": [WEATHER, DRAW, WEATHER]}, "tools[2].function.name"),
    "bad-name": (
        {"tools": [{"type": "function", "function": {"name": "get weather"}}]},
        "tools[0].function.name",
    ),
    "not-a-function": ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
    "unknown-named-tool": (
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "fly"}}},
        "tool_choice",
    ),
    "unknown-choice": ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    "choice-not-an-object": ({"tools": TOOLS, "tool_choice": [1]}, "tool_choice"),
    "schema-dialect-not-a-string": (
        {"tools": [with_parameters({"$schema": 5})]},
        "tools[0].function.parameters",
    ),
    "tools-not-a-list": ({"tools": {"type": "function"}}, "tools"),
    # Valid JSON Schema, but "not" is beyond the grammar of auto's tagged calls.
    "beyond-the-auto-grammar": (
        {"tools": [with_parameters({"properties": {"a": {"not": {"type": "string"}}}})]},
        "tools",
    ),
    "required-without-tools": ({"tool_choice": "required"}, "tool_choice"),
    "with-response-format": (
        {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
        "tool_choice",
    ),
    "tool-message-without-id": (
        {"messages": [*ASK, {"role": "tool", "content": "18"}]},
        "messages.1.tool_call_id",
    ),
    "call-arguments-not-json": (
        {
            "messages": [
                *ASK,
                {
                    "role": "assistant",
                    "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{x"}}],
                },
            ]
        },
        "messages.1.tool_calls.0.function.arguments",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_tools_are_400_naming_the_field_and_the_server_keeps_serving(oai, case):
    body, param = BAD[case]
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat(**{"messages": ASK, "max_tokens": 4, **body})
    error = info.value.body
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["param"] == param and param in error["message"]
    assert error["type"] == "invalid_request_error"
    assert_kv_all_free(oai.engine)
    r = oai.chat(messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=64, seed=0)
    assert_valid_calls(r.choices[0].message)
