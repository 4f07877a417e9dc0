"""Running a program: the executor behind the state ``s`` (state.py).

Each ProgramState owns an executor with a worker thread and a queue.
``s += expr`` only enqueues, so it never blocks; the worker appends text,
calls the backend for ``gen`` / ``select``, and sets one event per variable.
``s["x"]`` waits for the event of ``x`` and nothing else, so a program can
start several generations before reading any of them. ``fork`` caches the text
so far on the backend (a ``max_new_tokens=0`` request), then gives each branch
its own executor and thread: the branches run concurrently and every one of
them starts from the cached prefix. An error in the worker is kept and raised
in the caller at the next read, with the worker's traceback. ``gen_image`` has the
model write its prompt in a side request (drawing.py), has the image generator
render it, and appends the image to the current turn.

A tracing executor runs synchronously and stops at the first thing that is
not constant text; the text up to there is the program's cacheable prefix.
"""

from __future__ import annotations

import dataclasses
import math
import queue
import random
import threading
from collections.abc import Iterator
from typing import Any

from plait.backend import Backend, BackendError
from plait.choices import resolve_method
from plait.config import global_config
from plait.drawing import (
    parse_prompt_answer,
    prompt_request_params,
    prompt_request_text,
    resolve_generator,
)
from plait.ir import (
    Argument,
    ConcatForks,
    Expr,
    ExprList,
    Flush,
    Gen,
    GenImage,
    Image,
    RoleBegin,
    RoleEnd,
    Select,
    Text,
    VarScopeBegin,
    VarScopeEnd,
    to_expr,
)
from plait.runtime.errors import RequestError


class StopTracing(Exception):
    """Raised inside a traced program at the first non-constant step."""


class ProgramInterrupted(RuntimeError):
    """The program stopped because its reader was interrupted (Ctrl-C)."""


# Streamed pieces carry the logprobs of their own tokens; these lists add up.
_INCREMENTAL_META = (
    "input_token_logprobs",
    "output_token_logprobs",
    "input_top_logprobs",
    "output_top_logprobs",
)


def merge_stream_meta(
    before: dict[str, Any] | None, piece: dict[str, Any] | None
) -> dict[str, Any] | None:
    """The meta_info of several consecutive streamed pieces as one: the latest values,
    with the per-token logprob lists of all of them in order."""
    if before is None or piece is None:
        return piece if piece is not None else before
    merged = dict(piece)
    for key in _INCREMENTAL_META:
        if key in before or key in piece:
            merged[key] = list(before.get(key) or []) + list(piece.get(key) or [])
    return merged


def _flatten(expr: Expr) -> Iterator[Expr]:
    if isinstance(expr, ExprList):
        for item in expr.items:
            yield from _flatten(item)
    else:
        yield expr


class StreamExecutor:
    def __init__(
        self,
        backend: Backend,
        defaults: dict[str, Any],
        stream: bool = False,
        tracing: bool = False,
        generator: Any = None,
    ):
        self.backend = backend
        self.generator = generator  # the run's image generator (gen_image), if any
        self.template = backend.chat_template
        self.defaults = defaults  # the run's sampling parameters, under each gen's own
        self.stream = stream
        self.tracing = tracing
        self.text_ = ""
        self.messages_: list[dict[str, Any]] = []
        self.variables: dict[str, Any] = {}
        self.var_events: dict[str, threading.Event] = {}
        self.meta_info: dict[str, Any] = {}
        self.gens: dict[str, Gen] = {}  # how each variable was generated (for parsed())
        self.cur_role: str | None = None
        self.cur_role_begin = 0
        self.cur_role_prefix = ""  # the prefix written for the current role
        self.image_next = False  # the expression after the one running is an image
        # Every image in the text so far, in order (LoadedImages): each request sends
        # them all, as earlier turns' images stay in the prompt. The current turn's
        # images are kept with their offsets in the text and the length of the text
        # written for them, for messages().
        self.images_: list[Any] = []
        self.cur_images: list[tuple[int, Any, int]] = []
        self.fork_images = 0
        self.scopes: dict[str, int] = {}
        self.fork_start = 0
        self.error: BaseException | None = None
        self.finished = False
        self.interrupted = False  # set by interrupt(): a streaming gen stops at its next piece
        self.drawing: Any = None  # the ImageRequest being rendered (interrupt cancels it)
        # (variable, meta_info) of every streamed piece, for text_async_iter's meta data
        self.stream_log: list[tuple[str | None, dict[str, Any]]] = []
        self.cond = threading.Condition()  # wakes streaming readers
        self._queue: queue.Queue = queue.Queue()
        if not tracing:
            threading.Thread(target=self._work, name="plait-program", daemon=True).start()

    # ---- the caller's side --------------------------------------------------------

    def submit(self, expr: Any) -> None:
        expr = to_expr(expr)
        for e in _flatten(expr):
            name = e.name if isinstance(e, (Gen, Select, VarScopeBegin, GenImage)) else None
            if name is not None:
                self.var_events[name] = threading.Event()
            if isinstance(e, GenImage):
                self.var_events[name + "_prompt"] = threading.Event()
        if self.tracing:
            self._execute(expr)
        else:
            self._queue.put(expr)

    def sync(self) -> None:
        """Wait until everything submitted has run; raise the worker's error."""
        if not self.tracing:
            self._queue.join()
        self.raise_error()

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def end(self) -> None:
        if not self.tracing:
            self._queue.put(None)

    def interrupt(self) -> None:
        """Stop the program: a streaming gen aborts its request at its next piece, an
        image being drawn is cancelled, and nothing queued after it runs (the reader
        pressed Ctrl-C)."""
        with self.cond:
            self.interrupted = True
            if self.drawing is not None:
                self.drawing.cancel.set()
            self.cond.notify_all()

    def get_var(self, name: str) -> Any:
        if self.tracing:
            raise StopTracing(name)
        event = self.var_events.get(name)
        if event is None and name not in self.variables:
            raise KeyError(f"no variable {name!r}; known: {sorted(self.variables)}")
        if event is not None:
            event.wait()
        self.raise_error()
        return self.variables[name]

    def set_var(self, name: str, value: Any) -> None:
        with self.cond:
            self.variables[name] = value
            self.var_events.setdefault(name, threading.Event()).set()
            self.cond.notify_all()

    def fork(self, size: int) -> list[StreamExecutor]:
        if self.tracing:
            raise StopTracing("fork")
        if size > 1:
            self.submit(Flush())  # every branch then starts from the cached prefix
        self.sync()
        children = []
        for _ in range(size):
            child = StreamExecutor(
                self.backend, self.defaults, self.stream, generator=self.generator
            )
            child.text_ = self.text_
            child.messages_ = [dict(m) for m in self.messages_]
            child.variables = dict(self.variables)
            child.var_events = {k: _set_event() for k in self.variables}
            child.meta_info = dict(self.meta_info)
            child.gens = dict(self.gens)
            child.cur_role, child.cur_role_begin = self.cur_role, self.cur_role_begin
            child.cur_role_prefix = self.cur_role_prefix
            child.cur_images = list(self.cur_images)
            child.images_ = list(self.images_)
            child.fork_start, child.fork_images = len(self.text_), len(self.images_)
            children.append(child)
        return children

    # ---- the worker -----------------------------------------------------------------

    def _work(self) -> None:
        while True:
            expr = self._queue.get()
            try:
                if expr is None:
                    return
                if self.error is None and self.interrupted:
                    raise ProgramInterrupted("the program was interrupted")
                if self.error is None:
                    self._execute(expr)
            except Exception as e:  # kept, and raised in the caller at its next read
                with self.cond:
                    self.error = e
                    for event in self.var_events.values():
                        event.set()
                    self.cond.notify_all()
            finally:
                if expr is None:
                    with self.cond:
                        self.finished = True
                        self.cond.notify_all()
                self._queue.task_done()

    def _execute(self, expr: Expr) -> None:
        items = list(_flatten(expr))
        for k, e in enumerate(items):
            # A role opened right before an image writes its image-first prefix.
            self.image_next = k + 1 < len(items) and isinstance(items[k + 1], (Image, GenImage))
            handler = getattr(self, "_run_" + type(e).__name__)
            handler(e)

    def _fill(self, text: str) -> None:
        with self.cond:
            self.text_ += text
            self.cond.notify_all()

    def _run_Argument(self, e: Argument) -> None:
        raise StopTracing(e.name)

    def _run_Text(self, e: Text) -> None:
        self._fill(e.value)

    def _run_RoleBegin(self, e: RoleBegin) -> None:
        if self.cur_role is not None:
            raise ValueError(f"{e.role}() inside {self.cur_role}(): roles do not nest")
        t = self.template
        if not self.text_:
            self._fill(t.begin)
            if t.default_system_prompt is not None and e.role != "system":
                self._fill(t.prefix("system") + t.default_system_prompt + t.suffix("system"))
                self.messages_.append({"role": "system", "content": t.default_system_prompt})
        prefix = t.prefix(e.role)
        if self.image_next and self.backend.supports_images:
            prefix = t.image_first_prefix.get(e.role, prefix)
        self._fill(prefix)
        self.cur_role, self.cur_role_begin, self.cur_role_prefix = e.role, len(self.text_), prefix

    def _run_RoleEnd(self, e: RoleEnd) -> None:
        if self.cur_role != e.role:
            raise ValueError(f"{e.role}_end() without {e.role}_begin()")
        content: Any = self.text_[self.cur_role_begin :]
        if self.cur_images:
            content = self._content_parts()
        self._fill(self.template.suffix(e.role))
        self.messages_.append({"role": e.role, "content": content})
        self.cur_role, self.cur_images = None, []

    def _run_VarScopeBegin(self, e: VarScopeBegin) -> None:
        self.scopes[e.name] = len(self.text_)

    def _run_VarScopeEnd(self, e: VarScopeEnd) -> None:
        self.set_var(e.name, self.text_[self.scopes.pop(e.name) :])

    def _content_parts(self) -> list[dict[str, Any]]:
        """The current turn as OpenAI content parts: its text and images in order."""
        parts, at = [], self.cur_role_begin
        for offset, img, width in self.cur_images:
            if offset > at:
                parts.append({"type": "text", "text": self.text_[at:offset]})
            parts.append({"type": "image_url", "image_url": {"url": img.to_data_url()}})
            at = offset + width
        if at < len(self.text_):
            parts.append({"type": "text", "text": self.text_[at:]})
        return parts

    def _run_Image(self, e: Image) -> None:
        if self.tracing:
            raise StopTracing("image")
        if not self.backend.supports_images:
            raise RequestError(
                "image",
                self.backend.get_model_name(),
                "this model is text-only; images need a vision-language model",
            )
        self._append_image(e.source)

    def _append_image(self, image: Any) -> None:
        """Append a loaded image to the current turn: its token in the text and the
        image in every later request. On a text-only model the image is kept for
        messages() only (there is no token the model could read)."""
        if not self.backend.supports_images:
            if self.cur_role is not None:
                self.cur_images.append((len(self.text_), image, 0))
            return
        t = self.template
        opening = t.image_first_prefix.get(self.cur_role or "")
        at_start = len(self.text_) == self.cur_role_begin
        if opening is not None and at_start and self.cur_role_prefix != opening:
            # The turn, opened on its own (``with s.user():``), starts with an image: the
            # template writes another prefix then. (A reader streaming the whole text
            # may have seen the first one.)
            with self.cond:
                cut = len(self.text_) - len(self.cur_role_prefix)
                self.text_ = self.text_[:cut] + opening
                self.cur_role_begin, self.cur_role_prefix = len(self.text_), opening
        self.images_.append(image)
        if self.cur_role is not None:
            self.cur_images.append((len(self.text_), image, len(t.image_token)))
        self._fill(t.image_token)

    def _images(self, batch: int | None = None) -> dict[str, Any]:
        """The ``image_data`` option of a request on the text so far (all its images),
        for one prompt or a batch of ``batch`` prompts that share the text."""
        if not self.images_:
            return {}
        images = list(self.images_)
        return {"image_data": images if batch is None else [images] * batch}

    def _run_Flush(self, e: Flush) -> None:
        if self.tracing:
            raise StopTracing("flush")
        if self.text_:
            self.backend.generate(self.text_, {"max_new_tokens": 0}, **self._images())

    def _run_ConcatForks(self, e: ConcatForks) -> None:
        for child in e.states:
            child.sync()
            self.images_ += child.images_[child.fork_images :]
            self._fill(child.text_[child.fork_start :])

    # ---- gen ---------------------------------------------------------------------------

    def _sampling_params(self, e: Gen) -> dict[str, Any]:
        params = {**self.defaults, **global_config.detokenize_params(), **e.params}
        if self.cur_role == "assistant" and self.template.stop_str:
            stop = params.get("stop") or []
            stop = [stop] if isinstance(stop, str) else list(stop)
            params["stop"] = stop + [s for s in self.template.stop_str if s not in stop]
        return params

    def _run_Gen(self, e: Gen) -> None:
        if self.tracing:
            raise StopTracing("gen")
        params = self._sampling_params(e)
        options = {
            "return_logprob": e.return_logprob,
            "logprob_start_len": e.logprob_start_len,
            "top_logprobs_num": e.top_logprobs_num,
            "return_text_in_logprobs": e.return_text_in_logprobs,
        }
        options = {k: v for k, v in options.items() if v is not None}
        options.update(self._images())
        if self.stream and params.get("n", 1) == 1:
            value, meta = "", None
            pieces = self.backend.generate_stream(self.text_, params, **options)
            try:
                for piece in pieces:
                    if self.interrupted:
                        raise ProgramInterrupted("the program was interrupted while streaming")
                    value += piece["text"]
                    meta = merge_stream_meta(meta, piece["meta_info"])
                    with self.cond:
                        if e.name is not None:
                            self.variables[e.name] = value
                        self.stream_log.append((e.name, piece["meta_info"]))
                        self._fill(piece["text"])
            finally:
                close = getattr(pieces, "close", None)
                if close is not None:
                    close()  # a stream left early aborts its request on the backend
            _check_finish(meta)
        else:
            out = self.backend.generate(self.text_, params, **options)
            if isinstance(out, list):  # n > 1: the first continues the text
                for o in out:
                    _check_finish(o["meta_info"])
                value, meta = [o["text"] for o in out], [o["meta_info"] for o in out]
                self._fill(value[0])
            else:
                _check_finish(out["meta_info"])
                value, meta = out["text"], out["meta_info"]
                self._fill(value)
        if e.name is not None:
            self.meta_info[e.name] = meta
            self.gens[e.name] = e
            self.set_var(e.name, value)

    # ---- gen_image ---------------------------------------------------------------------

    def _run_GenImage(self, e: GenImage) -> None:
        if self.tracing:
            raise StopTracing("gen_image")
        from plait.multimodal.generation import ImageGenerationError
        from plait.multimodal.image import load_image

        generator = resolve_generator(e.generator, self.generator)
        request = dataclasses.replace(e.request, cancel=threading.Event())
        prompt_meta = None
        if request.prompt is None:
            out = self.backend.generate(
                prompt_request_text(self.text_, self.cur_role, self.template),
                prompt_request_params(self.defaults, e.prompt_max_tokens),
                **self._images(),
            )
            _check_finish(out["meta_info"])
            prompt_meta = out["meta_info"]
            request.prompt, negative = parse_prompt_answer(out["text"])
            if request.negative_prompt is None:
                request.negative_prompt = negative
            if not request.prompt:
                raise ImageGenerationError(
                    "prompt",
                    out["text"],
                    "the model wrote an empty image prompt; give gen_image a prompt",
                )
        with self.cond:
            if self.interrupted:
                raise ProgramInterrupted("the program was interrupted")
            self.drawing = request.check()
        try:
            picture = generator.generate([request])[0][0]
        finally:
            self.drawing = None
        self._append_image(load_image(picture))
        with self.cond:
            self.meta_info[e.name + "_prompt"] = prompt_meta
            self.meta_info[e.name] = {
                "prompt": request.prompt,
                "negative_prompt": request.negative_prompt,
                "size": request.size,
                "steps": request.steps,
                "guidance": request.guidance,
                "seed": request.seed,
                "generator": getattr(generator, "name", type(generator).__name__),
            }
        self.set_var(e.name + "_prompt", request.prompt)
        self.set_var(e.name, picture)

    # ---- select ------------------------------------------------------------------------

    def _run_Select(self, e: Select) -> None:
        if self.tracing:
            raise StopTracing("select")
        method = resolve_method(e.choices_method)
        token_lps, entries = self._choice_logprobs(e.choices)
        unconditional = None
        if method.needs_unconditional:
            outs = self.backend.generate(
                None,
                {"max_new_tokens": 0},
                input_ids=[[t for _, t, _ in ent] for ent in entries],
                return_logprob=True,
                logprob_start_len=0,
            )
            unconditional = [
                [lp or 0.0 for lp, _, _ in o["meta_info"]["input_token_logprobs"]] for o in outs
            ]
        scores = method(token_lps, unconditional)
        index = scores.index
        if e.temperature > 0:
            index = _sample(scores.meta_info["normalized_prompt_logprobs"], e.temperature)
        decision = e.choices[index]
        self._fill(decision)
        if e.name is not None:
            self.meta_info[e.name] = {
                **scores.meta_info,
                "input_token_logprobs": entries,
                "output_token_logprobs": [[] for _ in e.choices],
                "choices_method": method.name,
            }
            self.set_var(e.name, decision)

    def _choice_logprobs(self, choices: list[str]) -> tuple[list[list[float]], list[list]]:
        """Per choice, the logprobs (and [logprob, id, text] entries) of its tokens after
        the current text: one request caches the text, one batched request scores
        ``text + choice`` for every choice starting from the cached prefix."""
        prefix = self.text_
        n_prefix, last_token = 0, None
        if prefix:
            pre = self.backend.generate(
                prefix, {"max_new_tokens": 0}, return_logprob=True, **self._images()
            )
            n_prefix = pre["meta_info"]["prompt_tokens"]
            last_token = pre["meta_info"]["input_token_logprobs"][-1][1]
        # Start two tokens early: joining text and choice may re-tokenize the boundary.
        start = max(n_prefix - 2, 0)
        outs = self.backend.generate(
            [prefix + c for c in choices],
            {"max_new_tokens": 0, "temperature": 0.0},
            return_logprob=True,
            logprob_start_len=start,
            return_text_in_logprobs=True,
            **self._images(batch=len(choices)),
        )
        token_lps, entries = [], []
        for out in outs:
            ent = out["meta_info"]["input_token_logprobs"]
            # The choice starts at the first token the prefix alone does not have: the
            # token after the prefix, or the prefix's last token if it merged with it.
            first = n_prefix
            boundary = n_prefix - 1 - start
            if prefix and not (0 <= boundary < len(ent) and ent[boundary][1] == last_token):
                first = n_prefix - 1
            mine = ent[max(first - start, 0) :] or ent[-1:]
            entries.append(mine)
            token_lps.append([lp for lp, _, _ in mine if lp is not None])
        return token_lps, entries


def _check_finish(meta: dict[str, Any] | None) -> None:
    reason = (meta or {}).get("finish_reason") or {}
    if reason.get("type") == "abort":
        raise BackendError(f"generation aborted: {reason.get('message', 'no reason given')}")


def _sample(scores: list[float], temperature: float) -> int:
    top = max(scores)
    weights = [math.exp((s - top) / temperature) for s in scores]
    return random.choices(range(len(scores)), weights=weights)[0]


def _set_event() -> threading.Event:
    event = threading.Event()
    event.set()
    return event
