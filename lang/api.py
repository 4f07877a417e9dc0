"""The primitives a program appends: ``gen``, ``select``, ``image``, ``gen_image`` and
the roles.

Names and parameters follow SGLang's frontend, so its programs run unchanged.
``gen`` maps ``max_tokens``/``min_tokens`` onto ``max_new_tokens``/
``min_new_tokens``; a parameter left ``None`` inherits the run's default.
Parameters are checked here, when the program builds the expression, so a bad
value fails in the program's own line.
"""

from __future__ import annotations

import re
from typing import Any

from plait.backend import Backend, as_backend, get_default_backend
from plait.choices import ChoicesMethod, resolve_method, token_length_normalized
from plait.ir import (
    REGEX_BOOL,
    REGEX_FLOAT,
    REGEX_INT,
    REGEX_STR,
    Expr,
    ExprList,
    Gen,
    GenImage,
    Image,
    RoleBegin,
    RoleEnd,
    Select,
    to_expr,
)
from plait.runtime.errors import RequestError
from plait.runtime.sampling_params import SamplingParams

_DTYPE_REGEX = {int: REGEX_INT, float: REGEX_FLOAT, bool: REGEX_BOOL, str: REGEX_STR}
_DTYPE_NAMES = {"int": int, "float": float, "bool": bool, "str": str}


def gen(
    name: str | None = None,
    max_tokens: int | None = None,
    min_tokens: int | None = None,
    n: int | None = None,
    stop: str | list[str] | None = None,
    stop_token_ids: list[int] | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    frequency_penalty: float | None = None,
    presence_penalty: float | None = None,
    repetition_penalty: float | None = None,
    ignore_eos: bool | None = None,
    seed: int | None = None,
    return_logprob: bool | None = None,
    logprob_start_len: int | None = None,
    top_logprobs_num: int | None = None,
    return_text_in_logprobs: bool | None = None,
    dtype: type | str | None = None,
    choices: list[str] | None = None,
    choices_method: ChoicesMethod | str | None = None,
    regex: str | None = None,
    json_schema: Any = None,
    ebnf: str | None = None,
) -> Expr:
    """Generate into variable ``name``. With ``choices`` it is ``select``; ``dtype``
    (int, float, bool, str) constrains the text with SGLang's ``REGEX_INT`` /
    ``REGEX_FLOAT`` / ``REGEX_BOOL`` / ``REGEX_STR`` (plait.ir) and ``s.parsed(name)``
    converts it; ``json_schema`` may be a dict, a JSON string or a pydantic model
    class (then ``s.parsed(name)`` is the validated object)."""
    if choices is not None:
        return select(name, choices, temperature or 0.0, choices_method)
    constraints = [
        k
        for k, v in (
            ("regex", regex),
            ("json_schema", json_schema),
            ("ebnf", ebnf),
            ("dtype", dtype),
        )
        if v is not None
    ]
    if len(constraints) > 1:
        raise RequestError(
            constraints[1],
            locals()[constraints[1]],
            f"give only one of regex, json_schema, ebnf, dtype; got {constraints}",
        )
    py_type = None
    if dtype is not None:
        py_type = _DTYPE_NAMES.get(dtype, dtype) if isinstance(dtype, str) else dtype
        if py_type not in _DTYPE_REGEX:
            raise RequestError("dtype", dtype, "expected int, float, bool or str")
        regex = _DTYPE_REGEX[py_type]
        if py_type in (int, float):
            # As on SGLang, the number ends at the first space or newline (stop strings).
            # Past the number the regex also lets a space or newline start anything, so
            # a model may end the number with a token like " hours" (cut by the stop)
            # instead of being cornered into more digits.
            regex += "([ \\n][\\s\\S]*)?"
            stop = [*([stop] if isinstance(stop, str) else stop or []), " ", "\n"]
    elif regex is not None:
        try:
            re.compile(regex)
        except re.error as e:
            raise RequestError("regex", regex, f"bad regex syntax: {e}") from None
    schema_model = None
    if json_schema is not None and hasattr(json_schema, "model_json_schema"):
        schema_model, json_schema = json_schema, json_schema.model_json_schema()
    params = {
        "max_new_tokens": max_tokens,
        "min_new_tokens": min_tokens,
        "n": n,
        "stop": stop,
        "stop_token_ids": stop_token_ids,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "min_p": min_p,
        "frequency_penalty": frequency_penalty,
        "presence_penalty": presence_penalty,
        "repetition_penalty": repetition_penalty,
        "ignore_eos": ignore_eos,
        "seed": seed,
        "regex": regex,
        "json_schema": json_schema,
        "ebnf": ebnf,
    }
    params = {k: v for k, v in params.items() if v is not None}
    SamplingParams.from_dict(dict(params)).verify()  # names the bad field, here
    return Gen(
        name,
        params,
        dtype=py_type,
        schema_model=schema_model,
        return_logprob=return_logprob,
        logprob_start_len=logprob_start_len,
        top_logprobs_num=top_logprobs_num,
        return_text_in_logprobs=return_text_in_logprobs,
    )


def gen_int(name: str | None = None, **kwargs: Any) -> Expr:
    """An integer (``REGEX_INT``); ``s.parsed(name)`` is the int."""
    return gen(name, dtype=int, **kwargs)


def gen_float(name: str | None = None, **kwargs: Any) -> Expr:
    """A decimal number (``REGEX_FLOAT``); ``s.parsed(name)`` is the float."""
    return gen(name, dtype=float, **kwargs)


def gen_string(name: str | None = None, **kwargs: Any) -> Expr:
    """A quoted string of word characters and spaces (``REGEX_STR``); ``s.parsed(name)``
    is the text between the quotes."""
    return gen(name, dtype=str, **kwargs)


def select(
    name: str | None = None,
    choices: list[str] | None = None,
    temperature: float = 0.0,
    choices_method: ChoicesMethod | str | None = token_length_normalized,
) -> Expr:
    """Append the choice the model finds most likely after the text so far (scored in
    one batched request that reuses the cached prefix; see plait.choices)."""
    if not choices or not all(isinstance(c, str) for c in choices):
        raise RequestError("choices", choices, "select needs a non-empty list of strings")
    if temperature is None or temperature < 0:
        raise RequestError("temperature", temperature, "must be >= 0")
    return Select(name, list(choices), float(temperature), resolve_method(choices_method))


def image(source: Any) -> Expr:
    """An image in the current turn: a path, bytes, a base64 string or data URL, a PIL
    image, or an http(s) URL (fetched now, with the media module's default timeout and
    byte limit). Several per turn are allowed; the image stays in the prompt for the
    turns after it. Loaded here, so a bad source raises where the program names it."""
    from plait.multimodal.image import load_image

    if isinstance(source, str) and source.lstrip()[:8].lower().startswith(("http://", "https://")):
        from plait.multimodal.media import MediaPolicy, load_for_request

        return Image(load_for_request(source, MediaPolicy()))
    return Image(load_image(source))


def gen_image(
    name: str,
    prompt: str | None = None,
    *,
    size: tuple[int, int] | str | None = None,
    steps: int | None = None,
    seed: int | None = None,
    negative_prompt: str | None = None,
    guidance: float | None = None,
    generator: Any = None,
    prompt_max_tokens: int = 128,
) -> Expr:
    """Draw an image and append it as an image of the current role, so a following
    ``gen`` on a vision model sees it; ``s[name]`` is the PIL image and
    ``s[name + "_prompt"]`` the prompt it was drawn from.

    With ``prompt`` the generator renders that text. Without, the model first writes
    ``{"prompt", "negative_prompt"}`` (JSON, at most ``prompt_max_tokens`` tokens) in
    a side request on the conversation so far, served from the prefix cache; that
    request stays out of the program's text (its meta_info is
    ``s.get_meta_info(name + "_prompt")``). ``negative_prompt`` given here wins over
    the model's. ``size`` is (width, height) or ``"WxH"``; ``None`` settings are the
    generator's own. The generator: ``generator`` here, else ``run(...,
    generator=)``, else ``pl.set_default_generator``. On a text-only model the image
    is in ``s[name]`` and ``state.messages()`` but not in the prompt text."""
    from plait.drawing import check_generator
    from plait.multimodal.generation import ImageRequest, parse_size

    if not isinstance(name, str) or not name:
        raise RequestError("name", name, "gen_image needs a variable name")
    if isinstance(size, str):
        size = parse_size(size)
    elif size is not None:
        size = tuple(size)
    if isinstance(prompt_max_tokens, bool) or not isinstance(prompt_max_tokens, int):
        raise RequestError("prompt_max_tokens", prompt_max_tokens, "expected an integer")
    if prompt_max_tokens < 16:
        raise RequestError(
            "prompt_max_tokens", prompt_max_tokens, "must be >= 16 (the JSON needs room)"
        )
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError("seed", seed, "expected an integer")
    request = ImageRequest(
        prompt="-" if prompt is None else prompt,  # the model's prompt is checked later
        negative_prompt=negative_prompt,
        size=size,
        steps=steps,
        guidance=guidance,
        seed=seed,
    ).check()
    request.prompt = prompt
    if generator is not None:
        check_generator(generator)
    return GenImage(name, request, generator, prompt_max_tokens)


def _role(role: str, expr: Any) -> Expr:
    if expr is None:
        return ExprList([RoleBegin(role), RoleEnd(role)])
    return ExprList([RoleBegin(role), to_expr(expr), RoleEnd(role)])


def system(expr: Any = None) -> Expr:
    return _role("system", expr)


def user(expr: Any = None) -> Expr:
    return _role("user", expr)


def assistant(expr: Any = None) -> Expr:
    return _role("assistant", expr)


def system_begin() -> Expr:
    return RoleBegin("system")


def system_end() -> Expr:
    return RoleEnd("system")


def user_begin() -> Expr:
    return RoleBegin("user")


def user_end() -> Expr:
    return RoleEnd("user")


def assistant_begin() -> Expr:
    return RoleBegin("assistant")


def assistant_end() -> Expr:
    return RoleEnd("assistant")


def flush_cache(backend: Any = None) -> bool:
    return _backend(backend).flush_cache()


def get_server_info(backend: Any = None) -> dict[str, Any]:
    return _backend(backend).get_server_info()


def _backend(backend: Any) -> Backend:
    return as_backend(backend) if backend is not None else get_default_backend()
