"""The expressions a program appends to its state: ``s += "Q: " + gen("a")``.

An expression is plain data; the interpreter (interpreter.py) gives it meaning
and the backend (backend.py) turns generation into requests. ``+`` between
strings and expressions builds an :class:`ExprList`, so any mix of text and
primitives can be appended in one statement.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# SGLang's typed-generation regexes (``sglang.lang.ir``), the same strings, so a program
# that imports them from ``plait.lang.ir`` constrains exactly as it did on SGLang.
# ``gen_int`` / ``gen_float`` stop at the first space or newline after the number.
REGEX_INT = r"[-+]?[0-9]+[ \n]*"
REGEX_FLOAT = r"[-+]?[0-9]*\.?[0-9]+[ \n]*"
REGEX_BOOL = r"(True|False)"
# Word characters and whitespace only: SGLang's choice (``".*"`` broke interegular).
REGEX_STR = r"\"[\w\d\s]*\""


class Expr:
    """Base of every expression; ``a + b`` concatenates."""

    def __add__(self, other: Any) -> ExprList:
        return ExprList([self, to_expr(other)])

    def __radd__(self, other: Any) -> ExprList:
        return ExprList([to_expr(other), self])


def to_expr(value: Any) -> Expr:
    if isinstance(value, Expr):
        return value
    if isinstance(value, str):
        return Text(value)
    raise TypeError(
        f"cannot append a {type(value).__name__} to a program state: use str(...) or a primitive"
    )


@dataclass(eq=False)
class ExprList(Expr):
    items: list[Expr]

    def __add__(self, other: Any) -> ExprList:
        return ExprList([*self.items, to_expr(other)])

    def __radd__(self, other: Any) -> ExprList:
        return ExprList([to_expr(other), *self.items])


@dataclass(eq=False)
class Text(Expr):
    value: str


@dataclass(eq=False)
class Gen(Expr):
    """Generate text into variable ``name``.

    ``params`` holds only the fields the call set (``None`` fields inherit the
    run's defaults); ``dtype`` and ``schema_model`` say how ``s.parsed(name)``
    converts the text.
    """

    name: str | None
    params: dict[str, Any]
    dtype: type | None = None
    schema_model: Any = None  # a pydantic model class given as json_schema
    return_logprob: bool | None = None
    logprob_start_len: int | None = None
    top_logprobs_num: int | None = None
    return_text_in_logprobs: bool | None = None


@dataclass(eq=False)
class Select(Expr):
    """Pick one of ``choices`` by the model's likelihood (see choices.py)."""

    name: str | None
    choices: list[str]
    temperature: float = 0.0
    choices_method: Any = None


@dataclass(eq=False)
class Image(Expr):
    """An image in the current turn; ``source`` is already loaded (plait.multimodal)."""

    source: Any


@dataclass(eq=False)
class GenImage(Expr):
    """Draw an image into variable ``name`` and append it as an image of the current
    role. ``request`` is the ImageRequest (plait.multimodal.generation) to render;
    its prompt is ``None`` when the model writes it (see drawing.py)."""

    name: str
    request: Any
    generator: Any = None
    prompt_max_tokens: int = 128


@dataclass(eq=False)
class RoleBegin(Expr):
    role: str


@dataclass(eq=False)
class RoleEnd(Expr):
    role: str


@dataclass(eq=False)
class VarScopeBegin(Expr):
    name: str


@dataclass(eq=False)
class VarScopeEnd(Expr):
    name: str


class Argument(Expr):
    """An unbound program argument while tracing. It can be concatenated (so
    ``"Q: " + question`` keeps its constant part), and any other use of it, or
    reaching it in the trace, ends the trace."""

    def __init__(self, name: str):
        self.name = name

    def _stop(self, *args: Any, **kwargs: Any) -> Any:
        from plait.interpreter import StopTracing

        raise StopTracing(self.name)

    __str__ = __format__ = __mul__ = __iter__ = __len__ = __bool__ = _stop
    __getitem__ = __int__ = __float__ = _stop

    def __getattr__(self, name: str) -> Any:
        self._stop()

    def __repr__(self) -> str:
        return f"Argument({self.name!r})"


@dataclass(eq=False)
class Flush(Expr):
    """Prefill and cache the text so far (before a fork's branches start)."""


@dataclass(eq=False)
class ConcatForks(Expr):
    """Append each fork's text (written after the fork) to this state."""

    states: list[Any] = field(default_factory=list)
