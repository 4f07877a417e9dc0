"""Request bodies of the HTTP API, as pydantic models (they make the OpenAPI
spec). Field names follow SGLang's native API and OpenAI's. /generate refuses a
top-level field SGLang does not define; the OpenAI routes accept and ignore unknown
fields, as OpenAI clients send extras freely.
Sampling values are checked by SamplingParams, which names the bad field."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, create_model

from plait.runtime.server.errors import APIError

StrList = str | list[str]


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


# Fields of SGLang's native /generate that carry media or configure its processing:
# a 400 naming the model when set on a text-only model.
MEDIA_FIELDS = (
    "image_data",
    "video_data",
    "audio_data",
    "input_embeds",
    "mm_hashes",
    "mm_content_hashes",
    "use_audio_in_video",
    "video_config",
    "max_dynamic_patch",
    "min_dynamic_patch",
    "image_max_dynamic_patch",
    "video_max_dynamic_patch",
    "images_config",
    "mm_processor_kwargs",
)
_PD = "disaggregated prefill/decode is not supported"
_DP = "data-parallel routing is not supported"
_EPD = "disaggregated encoding is not supported"
_SCORE = "multi-item scoring is not supported"
# Fields SGLang defines that plait cannot honour: a 400 when set, never silence.
UNSUPPORTED_FIELDS = {
    "token_ids_logprob": "logprobs of chosen token ids are not supported; use top_logprobs_num",
    "return_sampling_mask": "sampling masks are not returned by this server",
    "sampling_logprobs_mode": "sampling-support logprobs are not returned by this server",
    "return_flat_raw_top_logprobs": "top logprobs come only as nested lists here",
    "return_flat_raw_output_top_logprobs": "top logprobs come only as nested lists here",
    "return_flat_raw_top_logprobs_b64": "top logprobs come only as nested lists here",
    "return_hidden_states": "hidden states are not returned by this server",
    "return_routed_experts": "this server runs no mixture-of-experts routing to return",
    "return_indexer_topk": "this server runs no sparse-attention indexer to return",
    "return_entropy": "entropies are not returned",
    "return_prompt_token_ids": "prompt token ids are not returned; use return_logprob with "
    "logprob_start_len 0",
    "return_bytes": "image bytes are not returned by /generate",
    "watermark": "watermarking is not supported",
    "session_params": "sessions are not supported; the radix cache reuses shared prefixes",
    "lora_path": "LoRA adapters are not supported",
    "lora_id": "LoRA adapters are not supported",
    "custom_logit_processor": "custom logit processors are not accepted over HTTP",
    "positional_embed_overrides": "embedding overrides are not accepted over HTTP",
    "bootstrap_host": _PD,
    "bootstrap_port": _PD,
    "bootstrap_room": _PD,
    "bootstrap_pair_key": _PD,
    "decode_tp_size": _PD,
    "disagg_prefill_dp_rank": _PD,
    "routed_dp_rank": _DP,
    "data_parallel_rank": _DP,
    "need_wait_for_mm_inputs": _EPD,
    "num_items_assigned": _EPD,
    "encoder_urls": _EPD,
    "multi_item_delimiter_indices": _SCORE,
    "token_indices_to_pool": _SCORE,
    "http_worker_ipc": "an internal field of SGLang's tokenizer workers",
    "background": "background requests are not supported",
    "require_reasoning": "this model has no reasoning mode to require",
    "max_thinking_tokens": "this model has no reasoning mode to budget",
}


class _GenerateFields(BaseModel):
    model_config = ConfigDict(extra="allow")

    text: str | list[str] | None = None
    input_ids: list[StrictInt] | list[list[StrictInt]] | None = None
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None
    return_logprob: bool | list[bool] | None = False
    logprob_start_len: int | list[int] | None = None
    top_logprobs_num: int | list[int] | None = None
    return_text_in_logprobs: bool = False
    rid: str | list[str] | None = None
    stream: bool = False
    # Each event carries only what is new (text, ids, output logprobs); None: the
    # server's --incremental-streaming-output. SGLang has it as a server flag only.
    incremental_streaming_output: bool | None = None
    # Accepted and harmless here: bookkeeping, hints and labels.
    log_metrics: bool = True
    modalities: list[str] | None = None
    no_logs: bool = False
    custom_labels: dict[str, Any] | None = None
    priority: int | None = None
    session_id: str | None = None
    conversation_id: str | None = None
    routing_key: str | None = None
    routed_experts_start_len: int = 0
    external_trace_header: dict[str, Any] | None = None
    received_time: float | None = None
    kv_hints: Any = None
    # A prefix-cache namespace: SGLang's extra_key, vLLM's cache_salt (give one); one,
    # or one per prompt of a batch.
    extra_key: str | list[str | None] | None = None
    cache_salt: str | list[str | None] | None = None


# Media and features that cannot apply are declared too (so the OpenAPI spec lists
# them), and refused when set.
GenerateRequest = create_model(
    "GenerateRequest",
    __base__=_GenerateFields,
    __doc__="``POST /generate`` (SGLang's native API). Its fields are SGLang 0.5's "
    "``GenerateReqInput``; any other top-level field is refused by name, and so is a field "
    "SGLang defines that cannot apply here (see native.check_generate_fields).",
    **{name: (Any, None) for name in (*MEDIA_FIELDS, *UNSUPPORTED_FIELDS)},
)


class AbortRequest(_Body):
    rid: str


class ProfileRequest(BaseModel):
    """``/start_profile`` (SGLang's ProfileReq). Fields that cannot apply here are
    refused when set (see app.start_profile); unknown ones too."""

    model_config = ConfigDict(extra="forbid")

    activities: list[str] | None = None  # CPU (default), GPU, MEM
    with_stack: bool | None = None
    record_shapes: bool | None = None
    profile_id: str | None = None  # names the trace file, with profile_prefix
    profile_prefix: str | None = None
    output_dir: str | None = None
    start_step: int | None = None
    num_steps: int | None = None
    profile_by_stage: bool = False
    merge_profiles: bool = False
    profile_stages: list[str] | None = None
    detailed_annotations: bool = False


class ConcatAndAppendRequest(BaseModel):
    """``/concate_and_append_request``, which SGLang's frontend sends when forks join
    with ``concate_and_append``."""

    model_config = ConfigDict(extra="forbid")

    src_rids: list[str]
    dst_rid: str


class StreamOptions(_Body):
    include_usage: bool = False


class JsonSchemaFormat(_Body):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class _OpenAISampling(_Body):
    """Fields shared by the completion and chat requests, with SGLang's extras."""

    model: str
    n: int = Field(default=1, ge=1, le=128)
    temperature: float | None = None
    top_p: float | None = None
    stop: StrList | None = None
    seed: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    # SGLang's extra sampling fields
    top_k: int | None = None
    min_p: float | None = None
    min_tokens: int | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    regex: str | None = None
    ebnf: str | None = None
    json_schema: dict[str, Any] | str | None = None
    logit_bias: dict[str, Any] | None = None  # token id -> bias in [-100, 100]
    rid: str | None = None
    # A prefix-cache namespace: SGLang's extra_key, vLLM's cache_salt (give one).
    extra_key: str | None = None
    cache_salt: str | None = None


class CompletionRequest(_OpenAISampling):
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: int | None = Field(default=16, ge=0)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's calls
    tool_call_id: str | None = None  # a tool result: the call it answers
    name: str | None = None


class ChatCompletionRequest(_OpenAISampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=0)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    # SGLang's: the last message is the assistant's reply so far; the model continues
    # it (rendered without closing that turn) and the reply holds only what follows.
    continue_final_message: bool = False
    # Text the assistant's reply starts with, continued the same way.
    response_prefill: str | None = None
    # Tool calling: checked and applied by runtime/server/tools.py.
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None


def cache_namespace(body: Any) -> Any:
    """A request's prefix-cache namespace: its ``extra_key`` (SGLang's) or ``cache_salt``
    (vLLM's); None when it gives neither. Requests share cached prefixes only with
    requests of the same namespace."""
    if body.extra_key is not None and body.cache_salt is not None:
        raise APIError(400, "give one of extra_key or cache_salt, not both", param="cache_salt")
    return body.extra_key if body.extra_key is not None else body.cache_salt
