"""``@function``: a program, and the ways to run it (once, streaming, in batch).

``run`` takes the program's arguments plus run-level sampling defaults (every
``gen`` inherits them field by field unless it sets its own). ``run_batch``
runs many argument sets on a thread pool, so their requests meet in the
runtime's batches; before that it traces the program to find the text every
run starts with (the system prompt, few-shot examples) and caches it once.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

from plait.backend import Backend, as_backend, get_default_backend
from plait.config import global_config
from plait.drawing import check_generator
from plait.interpreter import StreamExecutor
from plait.ir import Argument
from plait.runtime.sampling_params import SamplingParams
from plait.state import ProgramState

# Run-level sampling defaults; SGLang's names, mapped onto SamplingParams fields.
_RUN_PARAMS = {
    "max_new_tokens": "max_new_tokens",
    "min_new_tokens": "min_new_tokens",
    "n": "n",
    "stop": "stop",
    "stop_token_ids": "stop_token_ids",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "frequency_penalty": "frequency_penalty",
    "presence_penalty": "presence_penalty",
    "repetition_penalty": "repetition_penalty",
    "ignore_eos": "ignore_eos",
    "seed": "seed",
}
# A cached prefix shorter than this is not worth a request.
MIN_PRECACHE_CHARS = 64


def _defaults(given: dict[str, Any]) -> dict[str, Any]:
    params = {_RUN_PARAMS[k]: v for k, v in given.items() if k in _RUN_PARAMS and v is not None}
    SamplingParams.from_dict(dict(params)).verify()  # a bad default fails here, by name
    return params


class Function:
    def __init__(
        self,
        func: Callable,
        num_api_spec_tokens: int | None = None,
        bind_arguments: dict[str, Any] | None = None,
    ):
        names = list(inspect.signature(func).parameters)
        if not names or names[0] != "s":
            raise TypeError(f"{func.__name__}: a program's first parameter must be named `s`")
        if num_api_spec_tokens is not None and (
            isinstance(num_api_spec_tokens, bool)
            or not isinstance(num_api_spec_tokens, int)
            or num_api_spec_tokens < 1
        ):
            raise ValueError(
                f"num_api_spec_tokens={num_api_spec_tokens!r}: expected None or an integer >= 1"
            )
        self.func = func
        # SGLang's API speculation: one call to a chat API that cannot continue an assistant
        # turn writes several gens at once. plait's backends continue any text, so each gen
        # is its own request and this is kept only so SGLang programs run unchanged.
        self.num_api_spec_tokens = num_api_spec_tokens
        self.arg_names = names[1:]
        self.bind_arguments = dict(bind_arguments or {})
        functools.update_wrapper(self, func)

    def bind(self, **kwargs: Any) -> Function:
        """A copy with some arguments fixed (they also join the traced prefix)."""
        unknown = sorted(set(kwargs) - set(self.arg_names))
        if unknown:
            raise TypeError(f"{self.func.__name__} has no arguments {unknown}")
        return Function(
            self.func, self.num_api_spec_tokens, bind_arguments={**self.bind_arguments, **kwargs}
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Inside another program, ``f(s, ...)`` continues on ``s``; otherwise ``run``."""
        if args and isinstance(args[0], ProgramState):
            return self.func(args[0], *args[1:], **{**self.bind_arguments, **kwargs})
        return self.run(*args, **kwargs)

    def run(
        self,
        *args: Any,
        max_new_tokens: int | None = None,
        min_new_tokens: int | None = None,
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
        stream: bool = False,
        backend: Any = None,
        generator: Any = None,
        **kwargs: Any,
    ) -> ProgramState:
        """Run once; the state is returned when the program is done (at once with
        ``stream=True``: read it with ``state.text_iter()``). ``generator`` is the image
        generator of the program's ``gen_image`` calls that name none."""
        sampling = dict(locals())
        defaults = _defaults(sampling)
        arguments = self._arguments(args, kwargs)
        return run_program(
            self.func,
            _backend(backend),
            arguments,
            defaults,
            stream=stream,
            generator=_generator(generator),
        )

    def run_batch(
        self,
        batch_kwargs: list[dict[str, Any]] | list[tuple],
        *,
        backend: Any = None,
        generator: Any = None,
        num_threads: int | str = "auto",
        progress_bar: bool = False,
        **sampling: Any,
    ) -> list[ProgramState]:
        """Run once per argument set (dicts, or tuples in parameter order), concurrently.
        A program that fails keeps its error in its state (``state.error()``; reading
        the state raises it); the others are unaffected. ``sampling`` takes the
        same run-level defaults as ``run`` (``temperature=0``, ``max_new_tokens``...);
        ``generator`` is the image generator, as in ``run``."""
        unknown = sorted(set(sampling) - set(_RUN_PARAMS))
        if unknown:
            raise TypeError(f"run_batch got unknown options {unknown}")
        defaults = _defaults(sampling)
        runs = [
            self._arguments(tuple(a), {})
            if isinstance(a, (tuple, list))
            else self._arguments((), a)
            for a in batch_kwargs
        ]
        be = _backend(backend)
        generator = _generator(generator)
        if len(runs) > 1 and global_config.enable_precache_with_tracing:
            self.cache(be)
        if num_threads == "auto":
            num_threads = min(len(runs), 64)
        if not isinstance(num_threads, int) or num_threads < 1:
            raise ValueError(f"num_threads={num_threads!r}: expected 'auto' or an integer >= 1")
        with ThreadPoolExecutor(max(1, num_threads), thread_name_prefix="plait-batch") as pool:
            futures = [
                pool.submit(
                    run_program,
                    self.func,
                    be,
                    a,
                    defaults,
                    raise_errors=False,
                    generator=generator,
                )
                for a in runs
            ]
            if progress_bar:
                from tqdm import tqdm

                for _ in tqdm(as_completed(futures), total=len(futures), desc=self.__name__):
                    pass
            return [f.result() for f in futures]

    def trace(self, *, backend: Any = None, **kwargs: Any) -> str:
        """The text every run starts with: what the program appends before its first
        generation or its first use of an unbound argument."""
        be = _backend(backend)
        executor = StreamExecutor(be, {}, tracing=True)
        bound = {**self.bind_arguments, **kwargs}
        arguments = {name: bound.get(name, Argument(name)) for name in self.arg_names}
        # StopTracing, or a placeholder used in a way the trace cannot follow.
        with contextlib.suppress(Exception):
            self.func(ProgramState(executor), **arguments)
        return executor.text_

    def cache(self, backend: Any = None) -> str:
        """Prefill the traced prefix on the backend (cached for later runs); returns it."""
        be = _backend(backend)
        prefix = self.trace(backend=be)
        if len(prefix) >= MIN_PRECACHE_CHARS:
            be.generate(prefix, {"max_new_tokens": 0})
        return prefix

    def _arguments(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        free = [a for a in self.arg_names if a not in self.bind_arguments]
        if len(args) > len(free):
            raise TypeError(
                f"{self.func.__name__} takes {len(free)} arguments besides s, got {len(args)}"
            )
        merged = {**self.bind_arguments, **dict(zip(free, args)), **kwargs}
        unknown = sorted(set(merged) - set(self.arg_names))
        if unknown:
            raise TypeError(f"{self.func.__name__} has no arguments {unknown}")
        return merged


def function(func: Callable | None = None, num_api_spec_tokens: int | None = None) -> Any:
    """``@function``, ``@function()`` or ``@function(num_api_spec_tokens=N)`` (SGLang's
    signature): make ``func(s, ...)`` a program."""
    if func is None:
        return functools.partial(Function, num_api_spec_tokens=num_api_spec_tokens)
    return Function(func, num_api_spec_tokens)


def _backend(backend: Any) -> Backend:
    return as_backend(backend) if backend is not None else get_default_backend()


def _generator(generator: Any) -> Any:
    return check_generator(generator) if generator is not None else None


def run_program(
    func: Callable,
    backend: Backend,
    arguments: dict[str, Any],
    defaults: dict[str, Any],
    stream: bool = False,
    raise_errors: bool = True,
    generator: Any = None,
) -> ProgramState:
    executor = StreamExecutor(backend, defaults, stream=stream, generator=generator)
    state = ProgramState(executor)

    def body() -> None:
        try:
            state.ret_value = func(state, **arguments)
        except Exception as e:  # the program's own error, raised at the next read
            if executor.error is None:
                executor.error = e
        finally:
            executor.end()

    if stream:
        threading.Thread(target=body, name="plait-program-body", daemon=True).start()
        return state
    body()
    try:
        executor.sync()
    except Exception:
        if raise_errors:
            raise
    if global_config.verbosity >= 2 and executor.error is None:
        print(executor.text_)  # asked for: SGLang's verbosity 2 prints every final text
    return state
