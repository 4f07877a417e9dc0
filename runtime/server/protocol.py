"""Request bodies of the HTTP API, as pydantic models (they make the OpenAPI
spec). Field names follow SGLang's native API and OpenAI's; unknown top-level
fields are accepted and ignored, as those APIs' clients send extras freely.
Sampling values are checked by SamplingParams, which names the bad field."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

StrList = str | list[str]


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


# Fields of SGLang's native /generate that carry media: a 400 on a text-only model.
MEDIA_FIELDS = ("image_data", "video_data", "audio_data", "input_embeds")
# Fields SGLang defines that plait cannot honour: a 400 when set, never silence.
UNSUPPORTED_FIELDS = {
    "token_ids_logprob": "logprobs of chosen token ids are not supported; use top_logprobs_num",
    "return_hidden_states": "hidden states are not returned by this server",
    "session_params": "sessions are not supported; the radix cache reuses shared prefixes",
    "lora_path": "LoRA adapters are not supported",
    "lora_id": "LoRA adapters are not supported",
    "custom_logit_processor": "custom logit processors are not accepted over HTTP",
    "bootstrap_host": "disaggregated prefill is not supported",
    "bootstrap_port": "disaggregated prefill is not supported",
    "bootstrap_room": "disaggregated prefill is not supported",
    "data_parallel_rank": "data parallelism is not supported",
    "background": "background requests are not supported",
    "return_entropy": "entropies are not returned",
}


class GenerateRequest(BaseModel):
    """``POST /generate`` (SGLang's native API). Its fields are SGLang 0.5's; any other
    top-level field is refused by name (see app.check_generate_fields)."""

    model_config = ConfigDict(extra="allow")

    text: str | list[str] | None = None
    input_ids: list[StrictInt] | list[list[StrictInt]] | None = None
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None
    return_logprob: bool | list[bool] = False
    logprob_start_len: int | list[int] | None = None
    top_logprobs_num: int | list[int] | None = None
    return_text_in_logprobs: bool = False
    rid: str | list[str] | None = None
    stream: bool = False
    incremental_streaming_output: bool = False  # each event carries only what is new
    # Accepted and harmless here.
    log_metrics: bool = True
    modalities: list[str] | None = None
    no_logs: bool = False
    custom_labels: dict[str, Any] | None = None
    priority: int | None = None
    extra_key: str | None = None
    conversation_id: str | None = None
    # Media and features that cannot apply: refused when set.
    image_data: Any = None
    video_data: Any = None
    audio_data: Any = None
    input_embeds: Any = None
    token_ids_logprob: Any = None
    return_hidden_states: Any = None
    session_params: Any = None
    lora_path: Any = None
    lora_id: Any = None
    custom_logit_processor: Any = None
    bootstrap_host: Any = None
    bootstrap_port: Any = None
    bootstrap_room: Any = None
    data_parallel_rank: Any = None
    background: Any = None
    return_entropy: Any = None


class AbortRequest(_Body):
    rid: str


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
    rid: str | None = None


class CompletionRequest(_OpenAISampling):
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: int | None = Field(default=16, ge=0)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_OpenAISampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=0)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
