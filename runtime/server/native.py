"""What the native API needs besides its routes: the /generate body checked and
turned into a GenerateInput (its ``image_data`` loaded under the server's media
policy), its event stream, its errors in its own field names, and the
/start_profile request checked."""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from plait.multimodal.image import LoadedImage
from plait.multimodal.media import MediaPolicy
from plait.runtime.errors import RequestError
from plait.runtime.inputs import GenerateInput, image_data_lists
from plait.runtime.server.config import ServerConfig
from plait.runtime.server.errors import APIError
from plait.runtime.server.images import load_named
from plait.runtime.server.metrics import Metrics
from plait.runtime.server.protocol import (
    MEDIA_FIELDS,
    UNSUPPORTED_FIELDS,
    GenerateRequest,
    ProfileRequest,
    cache_namespace,
)
from plait.runtime.server.streaming import SSE_DONE, sse


def native_error(e: RequestError) -> APIError:
    """The engine's error in /generate's own names: its prompt field is ``text``, its
    images ``image_data``."""
    field = e.field
    if field == "prompt" or field.startswith(("prompt.", "prompt[")):
        field = "text" + field[len("prompt") :]
    elif field == "images" or field.startswith(("images.", "images[")):
        field = "image_data" + field[len("images") :]
    message = str(e)
    if message.startswith(e.field):
        message = field + message[len(e.field) :]
    return APIError(400, message, param=field)


def check_generate_fields(
    body: GenerateRequest, model_name: str, supports_images: bool = False
) -> None:
    """Refuse fields of SGLang's native API that cannot apply here (never ignore them
    silently), and fields SGLang does not define. A vision-language model takes
    ``image_data``; no model here takes video, audio or the other media fields."""
    extra = sorted(body.model_extra or {})
    if extra:
        raise APIError(
            400,
            f"{extra[0]}: unknown field of /generate (SGLang's native API has no such field)",
            param=extra[0],
        )
    for name in MEDIA_FIELDS:
        if not _is_set(getattr(body, name)):
            continue
        if supports_images:
            if name == "image_data":
                continue
            raise APIError(
                400,
                f"{name}: model {model_name!r} takes images only, through image_data",
                param=name,
                code="unsupported_field",
            )
        raise APIError(
            400,
            f"{name}: model {model_name!r} is text-only: it takes no image, video or "
            "audio input (serve a vision-language model for images)",
            param=name,
            code="model_not_multimodal",
        )
    for name, why in UNSUPPORTED_FIELDS.items():
        if _is_set(getattr(body, name)):
            raise APIError(400, f"{name}: {why}", param=name, code="unsupported_field")


def _is_set(value: Any) -> bool:
    """A field given a value that asks for something: not None, False or empty (0 is a
    value: ``0 in (False,)`` would be true)."""
    return value is not None and value is not False and value not in ([], {}, "")


def num_outputs(body: GenerateRequest) -> int:
    prompts = body.text if isinstance(body.text, list) else [None]
    if body.input_ids and isinstance(body.input_ids[0], list):
        prompts = body.input_ids
    params = body.sampling_params if isinstance(body.sampling_params, dict) else {}
    n = params.get("n", 1) if isinstance(params.get("n", 1), int) else 1
    return len(prompts) * max(n, 1)


def generate_input(
    body: GenerateRequest, images: list[list[LoadedImage]] | None = None
) -> GenerateInput:
    """The engine's input of a /generate body and its loaded images (``load_images``);
    the engine validates it (rid, top_logprobs_num, n, placeholders...)."""
    if (body.text is None) == (body.input_ids is None):
        raise APIError(400, "give exactly one of text or input_ids", param="text")
    batch = isinstance(body.text, list) or bool(
        body.input_ids and isinstance(body.input_ids[0], list)
    )
    if body.stream and batch:
        raise APIError(400, "streaming takes a single prompt", param="stream")
    return GenerateInput(
        prompt=body.text,
        input_ids=body.input_ids,
        sampling_params=body.sampling_params,
        return_logprob=_one_value(body, "return_logprob"),
        logprob_start_len=_one_value(body, "logprob_start_len"),
        top_logprobs_num=_one_value(body, "top_logprobs_num"),
        return_text_in_logprobs=body.return_text_in_logprobs,
        stream=bool(body.stream),
        rid=body.rid,
        images=images,
        extra_key=cache_namespace(body),
    )


async def load_images(body: GenerateRequest, policy: MediaPolicy) -> list[list[LoadedImage]] | None:
    """The images of ``body.image_data`` (SGLang's shapes: one image, a list for the
    prompt, one entry per prompt of a batch), loaded under ``policy`` by
    ``images.load_named``. A source that is refused or cannot be read is a 400 naming
    it: ``image_data[1]`` (``image_data[2][0]`` in a batch)."""
    if not _is_set(body.image_data):
        return None
    try:
        per_prompt = image_data_lists(body.image_data, body.text, body.input_ids)
    except RequestError as e:
        raise native_error(e) from e
    # The field of each source, as the client wrote it.
    nested = isinstance(body.image_data, list) and not _single_prompt(body)
    sources = []
    for i, entries in enumerate(per_prompt):
        for j, source in enumerate(entries):
            if not isinstance(body.image_data, list):
                field = "image_data"
            elif not nested:
                field = f"image_data[{j}]"
            elif isinstance(body.image_data[i], list):
                field = f"image_data[{i}][{j}]"
            else:
                field = f"image_data[{i}]"
            sources.append((field, source))
    loaded = iter(await load_named(sources, policy))
    return [[next(loaded) for _ in entries] for entries in per_prompt]


def _single_prompt(body: GenerateRequest) -> bool:
    if body.text is not None:
        return isinstance(body.text, str)
    return not body.input_ids or isinstance(body.input_ids[0], int)


def _one_value(body: GenerateRequest, name: str) -> Any:
    """SGLang lets a batch give logprob options per prompt; plait takes one value for
    the batch, so a list must hold one value (repeated)."""
    value = getattr(body, name)
    if not isinstance(value, list):
        return value
    if not value or any(v != value[0] for v in value):
        raise APIError(400, f"{name}: per-prompt values must all be equal here", param=name)
    return value[0]


_LOGPROB_KEYS = (
    "input_token_logprobs",
    "output_token_logprobs",
    "input_top_logprobs",
    "output_top_logprobs",
)


async def native_stream(
    pieces: AsyncIterator[dict], metrics: Metrics, incremental: bool = False
) -> AsyncIterator[str]:
    """SSE events each carrying the whole result so far (cumulative text, ids and
    logprobs), or with ``incremental`` only what is new since the last event; then
    ``[DONE]``. ``meta_info.output_token_logprobs_length`` counts the output logprobs
    so far. A client that goes away closes ``pieces``: the request aborts."""
    total: dict[str, Any] = {"text": "", "output_ids": [], "meta_info": {}}
    first, finished = True, False
    try:
        async for piece in pieces:
            if first:
                metrics.first_token(piece)
                first = False
            total["text"] += piece["text"]
            total["output_ids"] += piece["output_ids"]
            meta = dict(piece["meta_info"])
            for key in _LOGPROB_KEYS:
                if key in meta:
                    meta[key] = total["meta_info"].get(key, []) + meta[key]
            if "output_token_logprobs" in meta:
                meta["output_token_logprobs_length"] = len(meta["output_token_logprobs"])
            total["meta_info"] = meta
            finished = meta.get("finish_reason") is not None
            if incremental:
                piece_meta = dict(piece["meta_info"])
                if "output_token_logprobs" in meta:
                    piece_meta["output_token_logprobs_length"] = len(meta["output_token_logprobs"])
                yield sse({**piece, "meta_info": piece_meta})
            else:
                yield sse(total)
    finally:
        if not finished:  # the client went away (or the stream broke): count the abort
            metrics.aborted(1)
    metrics.record(total)
    yield SSE_DONE


_PROFILE_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$")
# ProfileRequest fields plait cannot honour (it records from start to stop).
_PROFILE_UNSUPPORTED = {
    "start_step": "profiles run from /start_profile to /stop_profile",
    "num_steps": "profiles run from /start_profile to /stop_profile",
    "profile_by_stage": "profiles are not split by stage",
    "profile_stages": "profiles are not split by stage",
    "merge_profiles": "there is one profile (one rank records)",
    "detailed_annotations": "iteration annotations are not recorded",
}


def check_profile_request(
    body: ProfileRequest, config: ServerConfig, device: str
) -> tuple[list[str], str]:
    """The activities to record and the trace's file name, or a 400 naming the field."""
    if config.profile_dir is None:
        raise APIError(
            400,
            "profiling is off on this server: start it with --profile-dir DIR",
            code="profiling_disabled",
        )
    if body.output_dir is not None:
        raise APIError(
            400,
            "output_dir: traces are written to the server's --profile-dir; a client does "
            "not choose where the server writes",
            param="output_dir",
        )
    for name, why in _PROFILE_UNSUPPORTED.items():
        if _is_set(getattr(body, name)):
            raise APIError(400, f"{name}: {why}", param=name, code="unsupported_field")
    on_gpu = device.startswith("cuda")
    activities = body.activities or (["CPU", "GPU"] if on_gpu else ["CPU"])
    for a in activities:
        if a not in ("CPU", "GPU", "MEM"):
            raise APIError(
                400, f"activities: {a!r} is not one of CPU, GPU, MEM", param="activities"
            )
        if a == "GPU" and not on_gpu:
            raise APIError(400, "activities: this server runs on no GPU", param="activities")
    parts = []
    for name in ("profile_prefix", "profile_id"):
        value = getattr(body, name)
        if value is not None:
            if not _PROFILE_NAME.match(value):
                raise APIError(
                    400,
                    f"{name}: must be 1-64 letters, digits, '.', '_' or '-' (it names a file)",
                    param=name,
                )
            parts.append(value)
    if not body.profile_id:
        parts.append(time.strftime("%Y%m%d-%H%M%S") + f"-{secrets.token_hex(3)}")
    return activities, "-".join(parts) + ".trace.json"


# Engine options a client is not shown: where files live on the server.
PRIVATE_OPTIONS = frozenset({"model", "cache_dir"})
