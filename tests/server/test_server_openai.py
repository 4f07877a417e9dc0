"""The OpenAI-compatible routes, in process, on a tiny random model: /v1/models,
/v1/completions and /v1/chat/completions give what ``Engine.generate`` gives for the
same prompt (a chat rendered with the model's own template), with usage counts
equal to token counts, logprobs equal to the engine's, streams whose deltas add up
to the non-streamed text, constrained outputs that validate, and 4xx errors that
name the OpenAI field at fault."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from common import GREEDY, MODEL, PERSON, PHONE, assert_error, sse_events
from fastapi.testclient import TestClient

from plait.runtime.server import ServerConfig, create_app

MESSAGES = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And two plus two?"},
]


@pytest.fixture(scope="module")
def client(engine) -> TestClient:
    # Entered, so that one event loop serves the whole module: the engine delivers an
    # aborted request's last result to its caller's loop, which must still be open.
    config = ServerConfig(served_model_name=MODEL, chat_default_max_tokens=8)
    with TestClient(create_app(engine, config)) as c:
        yield c


def completion(client: TestClient, **body) -> dict:
    r = client.post("/v1/completions", json={"model": MODEL, **body})
    assert r.status_code == 200, r.text
    return r.json()


def chat(client: TestClient, **body) -> dict:
    r = client.post("/v1/chat/completions", json={"model": MODEL, **body})
    assert r.status_code == 200, r.text
    return r.json()


def stream(client: TestClient, path: str, **body) -> list:
    r = client.post(path, json={"model": MODEL, "stream": True, **body})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    return events[:-1]


def template_prompt(engine, messages: list[dict]) -> str:
    return engine.apply_chat_template(messages)


# ---- /v1/models ---------------------------------------------------------------------------


def test_models_list_has_the_served_model(client, model_dir):
    body = client.get("/v1/models").json()
    assert body["object"] == "list" and len(body["data"]) == 1
    card = body["data"][0]
    assert card["id"] == MODEL and card["object"] == "model" and card["owned_by"] == "plait"
    assert card["root"] == MODEL and card["max_model_len"] == 512
    assert model_dir not in json.dumps(body)
    assert client.get(f"/v1/models/{MODEL}").json() == card


def test_a_model_path_is_not_a_model_name_and_an_unknown_one_is_404(client, model_dir):
    error = assert_error(client.get(f"/v1/models/{model_dir}"), 404, "model")
    assert error["code"] == "model_not_found"
    error = assert_error(client.get("/v1/models/gpt-4"), 404, "model")
    assert error["code"] == "model_not_found" and "gpt-4" in error["message"]


# ---- /v1/completions ----------------------------------------------------------------------


def test_completion_text_and_usage_equal_engine(client, engine):
    prompt = "The quick brown fox"
    body = completion(client, prompt=prompt, max_tokens=7, temperature=0, ignore_eos=True)
    ref = engine.generate(prompt, {**GREEDY, "max_new_tokens": 7})
    assert body["object"] == "text_completion" and body["model"] == MODEL
    assert body["id"].startswith("cmpl-")
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["text"] == ref["text"]
    assert choice["finish_reason"] == "length" and choice["logprobs"] is None
    prompt_tokens = len(engine.tokenizer.encode(prompt))
    assert body["usage"]["prompt_tokens"] == prompt_tokens
    assert body["usage"]["completion_tokens"] == 7
    assert body["usage"]["total_tokens"] == prompt_tokens + 7


def test_completion_default_max_tokens_is_16(client):
    body = completion(client, prompt="Hello", temperature=0, ignore_eos=True)
    assert body["usage"]["completion_tokens"] == 16


def test_completion_prompt_list_gives_a_choice_per_prompt(client, engine):
    prompts = ["Hello", "The quick brown fox", "Numbers like"]
    body = completion(client, prompt=prompts, max_tokens=5, temperature=0)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    for choice, prompt in zip(body["choices"], prompts, strict=True):
        assert (
            choice["text"]
            == engine.generate(prompt, {"temperature": 0, "max_new_tokens": 5})["text"]
        )
    assert body["usage"]["prompt_tokens"] == sum(len(engine.tokenizer.encode(p)) for p in prompts)


def test_completion_prompt_as_token_ids(client, engine):
    ids = engine.tokenizer.encode("The quick brown fox")
    ref = engine.generate(input_ids=ids, sampling_params={**GREEDY, "max_new_tokens": 5})
    body = completion(client, prompt=ids, max_tokens=5, temperature=0, ignore_eos=True)
    assert [c["text"] for c in body["choices"]] == [ref["text"]]
    assert body["usage"]["prompt_tokens"] == len(ids)


def test_completion_prompt_as_lists_of_token_ids(client, engine):
    id_lists = [engine.tokenizer.encode(p) for p in ["Hello", "An agent program"]]
    body = completion(client, prompt=id_lists, max_tokens=4, temperature=0, ignore_eos=True)
    texts = [
        engine.generate(input_ids=ids, sampling_params={**GREEDY, "max_new_tokens": 4})["text"]
        for ids in id_lists
    ]
    assert [c["text"] for c in body["choices"]] == texts
    assert body["usage"]["prompt_tokens"] == sum(map(len, id_lists))


def test_completion_n_with_seed_equals_engine_samples(client, engine):
    body = completion(client, prompt="Hello", max_tokens=8, n=3, temperature=1.0, seed=5)
    ref = engine.generate("Hello", {"max_new_tokens": 8, "n": 3, "temperature": 1.0, "seed": 5})
    assert [c["text"] for c in body["choices"]] == [o["text"] for o in ref]
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    # the prompt counts once, the completions three times
    assert body["usage"]["prompt_tokens"] == len(engine.tokenizer.encode("Hello"))
    assert body["usage"]["completion_tokens"] == sum(
        o["meta_info"]["completion_tokens"] for o in ref
    )


def test_completion_n_over_a_prompt_list_is_prompt_major(client):
    body = completion(client, prompt=["Hello", "Numbers like"], max_tokens=4, n=2, temperature=0)
    texts = [c["text"] for c in body["choices"]]
    assert len(texts) == 4 and texts[0] == texts[1] and texts[2] == texts[3]
    single = completion(client, prompt="Numbers like", max_tokens=4, temperature=0)
    assert texts[2] == single["choices"][0]["text"]


def test_completion_seed_makes_sampling_reproducible(client):
    def sample(seed: int) -> str:
        body = completion(client, prompt="Hello", max_tokens=12, temperature=1.0, seed=seed)
        return body["choices"][0]["text"]

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


def test_completion_tiny_top_p_is_greedy(client):
    greedy = completion(client, prompt="Hello", max_tokens=10, temperature=0)
    nucleus = completion(client, prompt="Hello", max_tokens=10, temperature=1.0, top_p=1e-6, seed=3)
    assert nucleus["choices"][0]["text"] == greedy["choices"][0]["text"]


def test_completion_stop_string_cuts_the_text(client):
    full = completion(client, prompt="Hello", max_tokens=16, temperature=0, ignore_eos=True)
    text = full["choices"][0]["text"]
    stop = next(text[i : i + 2] for i in range(1, len(text) - 1) if text[i : i + 2].isalnum())
    cut = completion(client, prompt="Hello", max_tokens=16, temperature=0, stop=[stop])
    choice = cut["choices"][0]
    assert choice["text"] == text[: text.find(stop)]
    assert choice["finish_reason"] == "stop" and choice["matched_stop"] == stop


def test_completion_logprobs_equal_engine(client, engine):
    body = completion(client, prompt="The quick brown fox", max_tokens=5, temperature=0, logprobs=3)
    ref = engine.generate(
        "The quick brown fox",
        {"temperature": 0, "max_new_tokens": 5},
        return_logprob=True,
        top_logprobs_num=3,
        return_text_in_logprobs=True,
    )["meta_info"]
    lp = body["choices"][0]["logprobs"]
    assert lp["tokens"] == [text for _, _, text in ref["output_token_logprobs"]]
    assert lp["token_logprobs"] == pytest.approx(
        [v for v, _, _ in ref["output_token_logprobs"]], abs=1e-4
    )
    assert lp["text_offset"] == [sum(map(len, lp["tokens"][:k])) for k in range(5)]
    for top, token, value in zip(
        lp["top_logprobs"], lp["tokens"], lp["token_logprobs"], strict=True
    ):
        assert 1 <= len(top) <= 3 and top[token] == pytest.approx(value)  # greedy: the best one
        assert max(top.values()) == pytest.approx(value)


def test_completion_echo_prepends_the_prompt_and_its_logprobs(client, engine):
    prompt = "The quick brown fox"
    plain = completion(client, prompt=prompt, max_tokens=4, temperature=0)["choices"][0]
    echo = completion(client, prompt=prompt, max_tokens=4, temperature=0, echo=True, logprobs=1)
    choice = echo["choices"][0]
    assert choice["text"] == prompt + plain["text"]
    lp = choice["logprobs"]
    n_prompt = len(engine.tokenizer.encode(prompt))
    assert len(lp["tokens"]) == n_prompt + 4
    assert "".join(lp["tokens"][:n_prompt]) == prompt
    assert lp["token_logprobs"][0] is None  # the first prompt token has no context
    assert all(v is not None for v in lp["token_logprobs"][1:])


def test_completion_stream_adds_up_to_the_full_text(client):
    body = {"prompt": "The quick brown fox", "max_tokens": 10, "temperature": 0}
    full = completion(client, **body)
    chunks = stream(client, "/v1/completions", **body)
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == full["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert all("usage" not in c for c in chunks)


def test_completion_stream_include_usage_ends_with_a_usage_chunk(client, engine):
    body = {"prompt": "Hello", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    chunks = stream(client, "/v1/completions", **body, stream_options={"include_usage": True})
    last = chunks[-1]
    assert last["choices"] == []
    prompt_tokens = len(engine.tokenizer.encode("Hello"))
    assert last["usage"]["prompt_tokens"] == prompt_tokens
    assert last["usage"]["completion_tokens"] == 6
    assert last["usage"]["total_tokens"] == prompt_tokens + 6


def test_completion_stream_n_over_prompts_interleaves_choices(client):
    body = {"prompt": ["Hello", "Numbers like"], "max_tokens": 5, "n": 2, "temperature": 0}
    full = completion(client, **body)
    chunks = stream(client, "/v1/completions", **body)
    texts: dict[int, str] = {}
    for c in chunks:
        (choice,) = c["choices"]
        texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    assert [texts[i] for i in range(4)] == [c["text"] for c in full["choices"]]


def test_completion_stream_echo_starts_with_the_prompt(client):
    chunks = stream(
        client, "/v1/completions", prompt="Hello", max_tokens=4, temperature=0, echo=True
    )
    text = "".join(c["choices"][0]["text"] for c in chunks)
    plain = completion(client, prompt="Hello", max_tokens=4, temperature=0)["choices"][0]["text"]
    assert chunks[0]["choices"][0]["text"].startswith("Hello")
    assert text == "Hello" + plain


def test_completion_regex_and_ebnf_extras(client):
    out = completion(client, prompt="Hello", max_tokens=32, temperature=0, regex=PHONE)
    assert re.fullmatch(PHONE, out["choices"][0]["text"])
    grammar = 'start: "(" num ("," num)* ")"\nnum: /[1-9][0-9]?/'
    out = completion(client, prompt="Hello", max_tokens=32, temperature=0, ebnf=grammar)
    assert re.fullmatch(r"\([1-9][0-9]?(,[1-9][0-9]?)*\)", out["choices"][0]["text"])


def test_completion_response_format_json_schema_validates(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    out = completion(client, prompt="Hello", max_tokens=64, temperature=0, response_format=fmt)
    jsonschema.validate(json.loads(out["choices"][0]["text"]), PERSON)


# ---- /v1/chat/completions -------------------------------------------------------------------


def test_chat_renders_the_models_own_template(client, engine):
    body = chat(client, messages=MESSAGES, max_tokens=6, temperature=0, ignore_eos=True)
    prompt = template_prompt(engine, MESSAGES)
    ref = engine.generate(prompt, {**GREEDY, "max_new_tokens": 6})
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    (choice,) = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": ref["text"]}
    assert choice["finish_reason"] == "length" and choice["logprobs"] is None
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(engine.tokenizer.encode(prompt))
    assert usage["completion_tokens"] == 6
    assert usage["total_tokens"] == usage["prompt_tokens"] + 6


def test_chat_default_system_prompt_comes_from_the_template(client, engine):
    messages = [{"role": "user", "content": "Hi!"}]
    body = chat(client, messages=messages, max_tokens=2, temperature=0)
    prompt = template_prompt(engine, messages)
    assert "You are a helpful AI assistant." in prompt
    assert body["usage"]["prompt_tokens"] == len(engine.tokenizer.encode(prompt))


def test_chat_developer_role_and_content_parts_render_like_system_and_text(client):
    as_parts = [
        {"role": "developer", "content": "You answer briefly."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is the "},
                {"type": "text", "text": "capital of France?"},
            ],
        },
    ]
    as_text = [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    a = chat(client, messages=as_parts, max_tokens=5, temperature=0)
    b = chat(client, messages=as_text, max_tokens=5, temperature=0)
    assert a["choices"][0]["message"] == b["choices"][0]["message"]
    assert a["usage"]["prompt_tokens"] == b["usage"]["prompt_tokens"]


def test_chat_max_completion_tokens_wins_over_max_tokens(client):
    body = chat(
        client,
        messages=MESSAGES,
        max_tokens=9,
        max_completion_tokens=3,
        temperature=0,
        ignore_eos=True,
    )
    assert body["usage"]["completion_tokens"] == 3
    body = chat(client, messages=MESSAGES, max_tokens=4, temperature=0, ignore_eos=True)
    assert body["usage"]["completion_tokens"] == 4


def test_chat_without_max_tokens_uses_the_configured_default(client):
    body = chat(client, messages=MESSAGES, temperature=0, ignore_eos=True)
    assert body["usage"]["completion_tokens"] == 8  # ServerConfig(chat_default_max_tokens=8)


def test_chat_n_with_seed_equals_engine_samples(client, engine):
    body = chat(client, messages=MESSAGES, max_tokens=6, n=2, temperature=0.9, top_p=0.9, seed=7)
    prompt = template_prompt(engine, MESSAGES)
    ref = engine.generate(
        prompt, {"max_new_tokens": 6, "n": 2, "temperature": 0.9, "top_p": 0.9, "seed": 7}
    )
    assert [c["message"]["content"] for c in body["choices"]] == [o["text"] for o in ref]
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["usage"]["prompt_tokens"] == len(engine.tokenizer.encode(prompt))


def test_chat_stop_string(client):
    full = chat(client, messages=MESSAGES, max_tokens=16, temperature=0, ignore_eos=True)
    text = full["choices"][0]["message"]["content"]
    stop = next(text[i : i + 2] for i in range(1, len(text) - 1) if text[i : i + 2].isalnum())
    cut = chat(client, messages=MESSAGES, max_tokens=16, temperature=0, stop=stop)
    assert cut["choices"][0]["message"]["content"] == text[: text.find(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"


def test_chat_logprobs_and_top_logprobs_equal_engine(client, engine):
    body = chat(
        client, messages=MESSAGES, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3
    )
    ref = engine.generate(
        template_prompt(engine, MESSAGES),
        {"temperature": 0, "max_new_tokens": 5},
        return_logprob=True,
        top_logprobs_num=3,
        return_text_in_logprobs=True,
    )["meta_info"]
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"] == 5
    for entry, (lp, _, text), top in zip(
        content, ref["output_token_logprobs"], ref["output_top_logprobs"], strict=True
    ):
        assert entry["token"] == text and entry["logprob"] == pytest.approx(lp, abs=1e-4)
        assert entry["bytes"] == list(text.encode("utf-8"))
        assert [t["token"] for t in entry["top_logprobs"]] == [t_text for _, _, t_text in top]
        values = [t["logprob"] for t in entry["top_logprobs"]]
        assert values == sorted(values, reverse=True) and values[0] == pytest.approx(lp)


def test_chat_stream_role_then_content_deltas_then_usage(client, engine):
    body = {"messages": MESSAGES, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    full = chat(client, **body)
    chunks = stream(client, "/v1/chat/completions", **body, stream_options={"include_usage": True})
    assert all(
        c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks
    )
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [c["choices"][0] for c in chunks[1:-1]]
    assert all(set(d["delta"]) <= {"content"} for d in deltas)
    assert (
        "".join(d["delta"].get("content", "") for d in deltas)
        == full["choices"][0]["message"]["content"]
    )
    assert deltas[-1]["finish_reason"] == "length"
    assert all(d["finish_reason"] is None for d in deltas[:-1])
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    assert {k: usage_chunk["usage"][k] for k in ("prompt_tokens", "completion_tokens")} == {
        "prompt_tokens": len(engine.tokenizer.encode(template_prompt(engine, MESSAGES))),
        "completion_tokens": 8,
    }


def test_chat_stream_without_include_usage_has_no_usage(client):
    chunks = stream(client, "/v1/chat/completions", messages=MESSAGES, max_tokens=3)
    assert all("usage" not in c for c in chunks)


def test_chat_stream_logprobs_cover_every_token(client):
    body = {"messages": MESSAGES, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    full = chat(client, **body, logprobs=True, top_logprobs=2)
    chunks = stream(client, "/v1/chat/completions", **body, logprobs=True, top_logprobs=2)
    entries = [
        e for c in chunks for e in ((c["choices"][0].get("logprobs") or {}).get("content") or [])
    ]
    ref = full["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in entries] == [e["token"] for e in ref]
    assert [e["logprob"] for e in entries] == pytest.approx([e["logprob"] for e in ref], abs=1e-4)


def test_chat_stream_n_gives_each_choice_its_role_and_text(client):
    body = {"messages": MESSAGES, "max_tokens": 5, "n": 2, "temperature": 0.8, "seed": 3}
    full = chat(client, **body)
    chunks = stream(client, "/v1/chat/completions", **body)
    texts: dict[int, str] = {}
    roles = set()
    for c in chunks:
        (choice,) = c["choices"]
        roles.update([choice["index"]] if "role" in choice["delta"] else [])
        texts[choice["index"]] = texts.get(choice["index"], "") + choice["delta"].get("content", "")
    assert roles == {0, 1}
    assert [texts[0], texts[1]] == [c["message"]["content"] for c in full["choices"]]


def test_chat_response_format_text_is_unconstrained(client):
    plain = chat(client, messages=MESSAGES, max_tokens=6, temperature=0)
    text = chat(
        client, messages=MESSAGES, max_tokens=6, temperature=0, response_format={"type": "text"}
    )
    assert text["choices"][0]["message"] == plain["choices"][0]["message"]


def test_chat_response_format_json_object_gives_an_object(client):
    closed = 0
    for content in ["An agent program", "Hello", "What is the capital of France?"]:
        body = chat(
            client,
            messages=[{"role": "user", "content": content}],
            max_tokens=200,
            temperature=0,
            response_format={"type": "json_object"},
        )
        text = body["choices"][0]["message"]["content"]
        assert text.startswith("{")
        if body["choices"][0]["finish_reason"] == "stop":
            assert isinstance(json.loads(text), dict)
            closed += 1
    assert closed >= 1  # a random model does not always close its object in 200 tokens


def test_chat_response_format_json_schema_validates(client):
    fmt = {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": PERSON, "strict": True},
    }
    for params in [{"temperature": 0}, {"temperature": 1.0, "seed": 4}]:
        body = chat(client, messages=MESSAGES, max_tokens=64, response_format=fmt, **params)
        jsonschema.validate(json.loads(body["choices"][0]["message"]["content"]), PERSON)
        assert body["choices"][0]["finish_reason"] == "stop"


def test_chat_regex_and_ebnf_extras(client):
    body = chat(client, messages=MESSAGES, max_tokens=32, temperature=0, regex=PHONE)
    assert re.fullmatch(PHONE, body["choices"][0]["message"]["content"])
    grammar = 'start: "yes" | "no"'
    body = chat(client, messages=MESSAGES, max_tokens=8, temperature=1.0, seed=2, ebnf=grammar)
    assert body["choices"][0]["message"]["content"] in ("yes", "no")


def test_chat_json_schema_extra_validates(client):
    body = chat(
        client, messages=MESSAGES, max_tokens=64, temperature=0, json_schema=json.dumps(PERSON)
    )
    jsonschema.validate(json.loads(body["choices"][0]["message"]["content"]), PERSON)


def test_repeated_chat_reports_cached_prompt_tokens(client, engine):
    engine.flush_cache()
    messages = [{"role": "user", "content": "Tell me about the quick brown fox."}]
    first = chat(client, messages=messages, max_tokens=2)
    second = chat(client, messages=messages, max_tokens=2)
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert 0 < cached < second["usage"]["prompt_tokens"]


def test_unknown_top_level_fields_are_ignored(client):
    body = chat(client, messages=MESSAGES, max_tokens=2, user="someone", metadata={"a": "b"})
    assert body["usage"]["completion_tokens"] <= 2


# ---- errors --------------------------------------------------------------------------------

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
LONG = "x " * 600  # the tiny model's context is 512 tokens


@pytest.mark.parametrize(
    "path,body,status,param",
    [
        (CHAT, {"model": "gpt-4", "messages": MESSAGES}, 404, "model"),
        (COMPLETIONS, {"model": "gpt-4", "prompt": "a"}, 404, "model"),
        (CHAT, {"messages": MESSAGES}, 400, "model"),
        (CHAT, {"model": MODEL}, 400, "messages"),
        (CHAT, {"model": MODEL, "messages": []}, 400, "messages"),
        (CHAT, {"model": MODEL, "messages": "hi"}, 400, "messages"),
        (
            CHAT,
            {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]},
            400,
            "messages.0.role",
        ),
        (CHAT, {"model": MODEL, "messages": [{"content": "x"}]}, 400, "messages.0.role"),
        (
            CHAT,
            {
                "model": MODEL,
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
                ],
            },
            400,
            "messages.0.content.0",
        ),
        (
            CHAT,
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}],
            },
            400,
            "messages.0.content.0.text",
        ),
        (
            CHAT,
            {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "audio"}]}]},
            400,
            "messages.0.content.0.type",
        ),
        (CHAT, {"model": MODEL, "messages": MESSAGES, "temperature": "hot"}, 400, "temperature"),
        (CHAT, {"model": MODEL, "messages": MESSAGES, "temperature": -1}, 400, "temperature"),
        (CHAT, {"model": MODEL, "messages": MESSAGES, "top_p": 1.5}, 400, "top_p"),
        (
            CHAT,
            {"model": MODEL, "messages": MESSAGES, "frequency_penalty": 3},
            400,
            "frequency_penalty",
        ),
        (CHAT, {"model": MODEL, "messages": MESSAGES, "n": 0}, 400, "n"),
        (CHAT, {"model": MODEL, "messages": MESSAGES, "n": 1000}, 400, "n"),
        (CHAT, {"model": MODEL, "messages": MESSAGES, "max_tokens": -1}, 400, "max_tokens"),
        (
            CHAT,
            {"model": MODEL, "messages": MESSAGES, "max_completion_tokens": -1},
            400,
            "max_completion_tokens",
        ),
        (
            CHAT,
            {"model": MODEL, "messages": MESSAGES, "min_tokens": 50, "max_tokens": 2},
            400,
            "min_tokens",
        ),
        (CHAT, {"model": MODEL, "messages": MESSAGES, "top_logprobs": 21}, 400, "top_logprobs"),
        (
            CHAT,
            {"model": MODEL, "messages": MESSAGES, "stop_token_ids": [10**6]},
            400,
            "stop_token_ids",
        ),
        (
            CHAT,
            {"model": MODEL, "messages": MESSAGES, "seed": 2**70, "temperature": 1},
            400,
            "seed",
        ),
        (CHAT, {"model": MODEL, "messages": MESSAGES, "regex": "(("}, 400, "regex"),
        (CHAT, {"model": MODEL, "messages": MESSAGES, "ebnf": 'start: "a" ('}, 400, "ebnf"),
        (
            CHAT,
            {"model": MODEL, "messages": MESSAGES, "json_schema": "{not json"},
            400,
            "json_schema",
        ),
        (
            CHAT,
            {"model": MODEL, "messages": MESSAGES, "response_format": {"type": "xml"}},
            400,
            "response_format.type",
        ),
        (
            CHAT,
            {"model": MODEL, "messages": MESSAGES, "response_format": {"type": "json_schema"}},
            400,
            "response_format.json_schema",
        ),
        (
            CHAT,
            {
                "model": MODEL,
                "messages": MESSAGES,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": False},
                },
            },
            400,
            "response_format",
        ),
        (
            CHAT,
            {
                "model": MODEL,
                "messages": MESSAGES,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": "{bad"},
                },
            },
            400,
            "response_format.json_schema.schema",
        ),
        (
            CHAT,
            {
                "model": MODEL,
                "messages": MESSAGES,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "x",
                        "schema": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}},
                    },
                },
            },
            400,
            "response_format",
        ),
        (
            CHAT,
            {
                "model": MODEL,
                "messages": MESSAGES,
                "response_format": {"type": "json_object"},
                "regex": "a",
            },
            400,
            "response_format",
        ),
        (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": LONG}]}, 400, "messages"),
        (COMPLETIONS, {"model": MODEL}, 400, "prompt"),
        (COMPLETIONS, {"model": MODEL, "prompt": []}, 400, "prompt"),
        (COMPLETIONS, {"model": MODEL, "prompt": ""}, 400, "prompt"),
        (COMPLETIONS, {"model": MODEL, "prompt": [[]]}, 400, "prompt"),
        (COMPLETIONS, {"model": MODEL, "prompt": [1, "a"]}, 400, "prompt"),
        (COMPLETIONS, {"model": MODEL, "prompt": [10**6]}, 400, "prompt"),
        (COMPLETIONS, {"model": MODEL, "prompt": [-1], "echo": True}, 400, "prompt"),
        (
            COMPLETIONS,
            {"model": MODEL, "prompt": [[1], [2**40]], "echo": True, "stream": True},
            400,
            "prompt",
        ),
        (COMPLETIONS, {"model": MODEL, "prompt": LONG}, 400, "prompt"),
        (COMPLETIONS, {"model": MODEL, "prompt": "a", "logprobs": 21}, 400, "logprobs"),
        (COMPLETIONS, {"model": MODEL, "prompt": "a", "max_tokens": "many"}, 400, "max_tokens"),
        (COMPLETIONS, {"model": MODEL, "prompt": "a", "stop": 5}, 400, "stop"),
        (COMPLETIONS, {"model": MODEL, "prompt": "a", "echo": "maybe"}, 400, "echo"),
        (
            COMPLETIONS,
            {"model": MODEL, "prompt": "a", "stream_options": {"include_usage": "x"}},
            400,
            "stream_options.include_usage",
        ),
        (COMPLETIONS, {"model": MODEL, "prompt": "a", "stream": True, "regex": "(("}, 400, "regex"),
        (
            COMPLETIONS,
            {"model": MODEL, "prompt": "a", "stream": True, "temperature": -2},
            400,
            "temperature",
        ),
    ],
)
def test_bad_request_is_4xx_naming_the_field(client, path, body, status, param):
    r = client.post(path, json=body)
    assert_error(r, status, param)
    assert r.headers["content-type"].startswith("application/json")
    after = chat(client, messages=MESSAGES, max_tokens=2, temperature=0)
    assert after["usage"]["completion_tokens"] == 2  # the server still serves


def test_malformed_json_body_is_400(client):
    r = client.post(
        CHAT,
        content=b'{"model": "tiny", "messages": [',
        headers={"content-type": "application/json"},
    )
    error = assert_error(r, 400, None)
    assert "JSON" in error["message"]


def test_chat_top_logprobs_without_logprobs_is_refused(client):
    r = client.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "top_logprobs": 2},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"


# ---- continuing the assistant's reply ------------------------------------------------------

REPLY_START = [*MESSAGES, {"role": "assistant", "content": "Two plus two is"}]


def test_chat_continue_final_message_leaves_the_last_turn_open(client, engine):
    """The last assistant message is continued, not closed and answered anew: the
    prompt is the conversation before it, the generation prompt, then its text."""
    body = chat(
        client,
        messages=REPLY_START,
        continue_final_message=True,
        max_tokens=6,
        temperature=0,
        ignore_eos=True,
    )
    prompt = template_prompt(engine, MESSAGES) + "Two plus two is"
    ref = engine.generate(prompt, {**GREEDY, "max_new_tokens": 6})
    assert body["choices"][0]["message"]["content"] == ref["text"]
    assert body["usage"]["prompt_tokens"] == len(engine.tokenizer.encode(prompt))
    # Without it the last turn is closed, and another assistant turn opens.
    closed = chat(client, messages=REPLY_START, max_tokens=6, temperature=0, ignore_eos=True)
    assert closed["usage"]["prompt_tokens"] == len(
        engine.tokenizer.encode(template_prompt(engine, REPLY_START))
    )


def test_chat_response_prefill_starts_the_reply_and_streams_alike(client, engine):
    common = {"messages": MESSAGES, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    body = chat(client, **common, response_prefill="Two plus two is")
    prompt = template_prompt(engine, MESSAGES) + "Two plus two is"
    ref = engine.generate(prompt, {**GREEDY, "max_new_tokens": 6})
    assert body["choices"][0]["message"]["content"] == ref["text"]
    chunks = stream(client, "/v1/chat/completions", **common, response_prefill="Two plus two is")
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == ref["text"]


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"continue_final_message": True, "messages": MESSAGES}, "continue_final_message"),
        (
            {"continue_final_message": True, "response_prefill": "x", "messages": REPLY_START},
            "response_prefill",
        ),
    ],
)
def test_chat_continue_final_message_misuse_is_400(client, extra, param):
    r = client.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 2, **extra})
    assert_error(r, 400, param)


@pytest.mark.parametrize(
    "ending",
    [{"max_tokens": 5, "ignore_eos": True}, {"max_tokens": 40, "stop": [" ", "e", "a", "o"]}],
    ids=["length", "stop"],
)
def test_chat_final_stream_chunk_finishes_like_the_whole_response(client, ending):
    """The last chunk of a choice carries finish_reason (a string) and matched_stop with
    the values the non-streamed response gives."""
    common = {"messages": MESSAGES, "temperature": 0, **ending}
    whole = chat(client, **common)["choices"][0]
    chunks = stream(client, "/v1/chat/completions", **common)
    final = chunks[-1]["choices"][0]
    assert set(final) == set(whole) - {"message"} | {"delta"}
    assert final["finish_reason"] == whole["finish_reason"]
    assert final["matched_stop"] == whole["matched_stop"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
