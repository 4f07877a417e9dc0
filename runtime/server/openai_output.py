"""Engine results in OpenAI's shapes: finish reasons, token usage, chat and
completion logprobs, and the chunks of a streamed response."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from plait.runtime.server.streaming import sse


def finish_reason(meta: dict[str, Any]) -> str | None:
    reason = meta.get("finish_reason")
    return None if reason is None else reason["type"]


def matched_stop(meta: dict[str, Any]) -> Any:
    reason = meta.get("finish_reason") or {}
    return reason.get("matched")


def usage(outs: list[dict], n: int) -> dict[str, Any]:
    """Token counts of results in prompt-major order, ``n`` per prompt: each prompt
    counts once however many choices it has."""
    per_prompt = [outs[i : i + n] for i in range(0, len(outs), n)]
    prompt_tokens = sum(group[0]["meta_info"]["prompt_tokens"] for group in per_prompt)
    cached = sum(max(o["meta_info"].get("cached_tokens", 0) for o in g) for g in per_prompt)
    completion = sum(o["meta_info"]["completion_tokens"] for o in outs)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _token_entry(lp: float, text: str | None) -> dict[str, Any]:
    text = text or ""
    return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(meta: dict[str, Any]) -> dict[str, Any]:
    content = []
    tops = meta.get("output_top_logprobs") or []
    for k, (lp, _, text) in enumerate(meta.get("output_token_logprobs", [])):
        entry = _token_entry(lp, text)
        top = tops[k] if k < len(tops) and tops[k] else []
        entry["top_logprobs"] = [_token_entry(t_lp, t_text) for t_lp, _, t_text in top]
        content.append(entry)
    return {"content": content}


def chunk_writer(rid: str, created: int, model: str, kind: str) -> Callable[..., str]:
    """``chunk(choices, usage=None)``: one server-sent event of a streamed response."""

    def chunk(choices: list[dict], usage: dict | None = None) -> str:
        data = {"id": rid, "object": kind, "created": created, "model": model, "choices": choices}
        if usage is not None:
            data["usage"] = usage
        return sse(data)

    return chunk


def completion_logprobs(meta: dict[str, Any], echo: bool) -> dict[str, Any]:
    entries = list(meta.get("output_token_logprobs", []))
    tops = list(meta.get("output_top_logprobs") or [])
    if echo:
        entries = list(meta.get("input_token_logprobs", [])) + entries
        tops = list(meta.get("input_top_logprobs") or []) + tops
    tokens, token_lps, top_lps, offsets = [], [], [], []
    offset = 0
    for k, (lp, _, text) in enumerate(entries):
        text = text or ""
        tokens.append(text)
        token_lps.append(lp)
        top = tops[k] if k < len(tops) and tops[k] else None
        top_lps.append({t: t_lp for t_lp, _, t in top} if top else None)
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": token_lps,
        "top_logprobs": top_lps,
        "text_offset": offsets,
    }
