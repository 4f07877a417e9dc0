"""What ``gen_image`` needs besides the interpreter: which generator draws, and how the
model writes the image prompt when the program gives none.

The generator (an ``plait.multimodal.generation.ImageGenerator``) is the first of:
``gen_image(..., generator=g)``, ``f.run(..., generator=g)`` (also ``run_batch``), and
``pl.set_default_generator(g)``. It is independent of the LLM backend.

Writing the prompt is a side request that stays out of the program's text: the
request is the text so far, the current turn closed, and one more user turn that asks
for the prompt, answered by the assistant under :data:`PROMPT_SCHEMA`. Because it
starts with the text so far, the runtime's prefix cache serves the whole
conversation, and only the question and the answer are computed. The program's state
then gets only the image (an image of the current role), and ``s[name + "_prompt"]``.
"""

from __future__ import annotations

import json
import threading
from typing import Any

from plait.runtime.chat_template import ChatTemplate

# What the hidden user turn asks; the schema keeps the answer short and parseable.
PROMPT_INSTRUCTION = (
    "Write the prompt for a text-to-image model that draws the picture this "
    "conversation calls for. Answer in JSON: `prompt` describes the picture (subject, "
    "setting, style) in one or two sentences; `negative_prompt` says what to avoid, "
    "or is empty."
)
# About what a CLIP text encoder reads (77 tokens); a longer prompt is cut there anyway.
PROMPT_MAX_CHARS = 300
NEGATIVE_PROMPT_MAX_CHARS = 150
PROMPT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "prompt": {"type": "string", "minLength": 1, "maxLength": PROMPT_MAX_CHARS},
        "negative_prompt": {"type": "string", "maxLength": NEGATIVE_PROMPT_MAX_CHARS},
    },
    "required": ["prompt", "negative_prompt"],
    "additionalProperties": False,
}
# A run's sampling defaults the prompt request keeps (stop strings, n and the
# token budget are its own).
_KEPT_DEFAULTS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
)

_default_generator: Any = None
_lock = threading.Lock()


def set_default_generator(generator: Any) -> None:
    """The image generator ``gen_image`` uses when neither the call nor the run names
    one (``None`` clears it)."""
    global _default_generator
    if generator is not None:
        check_generator(generator)
    with _lock:
        _default_generator = generator


def get_default_generator() -> Any:
    """The default image generator, or None."""
    return _default_generator


def check_generator(generator: Any) -> Any:
    if not callable(getattr(generator, "generate", None)):
        raise TypeError(
            f"generator={generator!r}: expected an ImageGenerator "
            "(plait.multimodal.generation), an object with generate(requests)"
        )
    return generator


def resolve_generator(*choices: Any) -> Any:
    """The first generator set among ``choices`` (the call's, the run's), else the
    default; a clear error when there is none."""
    for generator in (*choices, _default_generator):
        if generator is not None:
            return generator
    raise RuntimeError(
        "gen_image: no image generator is configured; set one with "
        "pl.set_default_generator(generator), f.run(..., generator=generator) or "
        "pl.gen_image(..., generator=generator) (an ImageGenerator from "
        "plait.multimodal, e.g. a diffusers pipeline)"
    )


def prompt_request_text(text: str, role: str | None, template: ChatTemplate) -> str:
    """The prompt request's text: ``text`` (the program's so far), the current
    ``role``'s turn closed, then a user turn asking for the prompt and the opening of
    the assistant's answer."""
    if not text:
        text = template.begin
        if template.default_system_prompt is not None:
            text += template.prefix("system") + template.default_system_prompt
            text += template.suffix("system")
    if role is not None:
        text += template.suffix(role)
    text += template.prefix("user") + PROMPT_INSTRUCTION + template.suffix("user")
    return text + template.prefix("assistant")


def prompt_request_params(defaults: dict[str, Any], max_tokens: int) -> dict[str, Any]:
    """The prompt request's sampling parameters: the run's sampling defaults under
    the schema and the token budget."""
    params = {k: v for k, v in defaults.items() if k in _KEPT_DEFAULTS}
    params["max_new_tokens"] = max_tokens
    params["json_schema"] = json.dumps(PROMPT_SCHEMA)
    return params


def parse_prompt_answer(text: str) -> tuple[str, str | None]:
    """(prompt, negative prompt or None) from the model's JSON answer."""
    answer = json.loads(text)
    negative = answer.get("negative_prompt", "").strip()
    return answer["prompt"].strip(), negative or None
