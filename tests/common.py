"""What several test modules share: prompts, sampling settings, schemas, and checks
of an engine's state."""

import json
import time

MODEL = "tiny"  # the served model name of the server tests
PROMPTS = [
    "Hello there, how are",
    "The quick brown fox jumps over the lazy dog and",
    "a",
    "Numbers: 1, 2, 3, 4, 5, 6, 7",
]
GREEDY = {"temperature": 0.0, "ignore_eos": True}
PHONE = r"[0-9]{3}-[0-9]{4}"
# Every string is bounded, so even a random model finishes within max_new_tokens.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "enum": ["Alice", "Bob", "Carol"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "student": {"type": "boolean"},
    },
    "required": ["name", "age", "student"],
    "additionalProperties": False,
}
# The fields of an OpenAI-style error body.
ERROR_KEYS = {"message", "type", "param", "code"}


def wait_idle(engine, timeout: float = 15.0) -> dict:
    """The engine's stats once nothing is running or waiting."""
    deadline = time.monotonic() + timeout
    while True:
        stats = engine.get_stats()
        if stats["num_running_reqs"] == 0 and stats["num_waiting_reqs"] == 0:
            return stats
        assert time.monotonic() < deadline, stats
        time.sleep(0.02)


def assert_kv_all_free(engine) -> None:
    """No request holds KV: only the prefix cache does, and a flush frees it all."""
    stats = wait_idle(engine)
    assert stats["kv_slots_used"] == stats["cache_tokens"], stats
    assert engine.flush_cache()
    assert engine.get_stats()["kv_slots_used"] == 0


def sse_events(text: str) -> list:
    """The data of each server-sent event, JSON-decoded ("[DONE]" kept as is)."""
    out = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def assert_error(response, status: int, param: str | None) -> dict:
    """An OpenAI-style error body whose param (and message) name the field."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    error = body["error"]
    assert error["param"] == param, error
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert param in error["message"], error
    return error
