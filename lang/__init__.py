"""plait: a structured-generation agent runtime with a Python frontend DSL.

``import plait as pl`` gives the language::

    @pl.function
    def ask(s, question):
        s += pl.user(question)  # the model's template adds its default system prompt
        s += pl.assistant(pl.gen("answer", max_tokens=64))

    state = ask.run(question="What is the capital of France?", temperature=0)
    state["answer"]  # 'The capital of France is Paris.' (the default model)

The runtime behind it (``pl.Engine``) is imported only when first used.
"""

from __future__ import annotations

from plait.api import (
    assistant,
    assistant_begin,
    assistant_end,
    flush_cache,
    gen,
    gen_float,
    gen_image,
    gen_int,
    gen_string,
    get_server_info,
    image,
    select,
    system,
    system_begin,
    system_end,
    user,
    user_begin,
    user_end,
)
from plait.backend import (
    Backend,
    BackendError,
    EngineBackend,
    RuntimeEndpoint,
    get_default_backend,
    set_default_backend,
)
from plait.choices import (
    greedy_token_selection,
    token_length_normalized,
    unconditional_likelihood_normalized,
)
from plait.config import GlobalConfig, global_config
from plait.drawing import get_default_generator, set_default_generator
from plait.function import Function, function
from plait.interpreter import ProgramInterrupted
from plait.ir import REGEX_BOOL, REGEX_FLOAT, REGEX_INT, REGEX_STR
from plait.runtime.chat_template import ChatTemplate
from plait.runtime.sampling_params import SamplingParams
from plait.state import ProgramState, ProgramStateGroup

__version__ = "0.1.0"
__all__ = [
    "Backend",
    "BackendError",
    "ChatTemplate",
    "Engine",
    "EngineBackend",
    "Function",
    "GlobalConfig",
    "ProgramInterrupted",
    "ProgramState",
    "ProgramStateGroup",
    "REGEX_BOOL",
    "REGEX_FLOAT",
    "REGEX_INT",
    "REGEX_STR",
    "RuntimeEndpoint",
    "SamplingParams",
    "__version__",
    "assistant",
    "assistant_begin",
    "assistant_end",
    "flush_cache",
    "function",
    "gen",
    "gen_float",
    "gen_image",
    "gen_int",
    "gen_string",
    "get_default_backend",
    "get_default_generator",
    "get_server_info",
    "global_config",
    "greedy_token_selection",
    "image",
    "select",
    "set_default_backend",
    "set_default_generator",
    "system",
    "system_begin",
    "system_end",
    "token_length_normalized",
    "unconditional_likelihood_normalized",
    "user",
    "user_begin",
    "user_end",
]


def __getattr__(name: str):
    if name == "Engine":
        from plait.runtime.engine import Engine

        return Engine
    raise AttributeError(f"module 'plait' has no attribute {name!r}")
