"""The state a program sees: ``s`` in ``def program(s, ...)``, and the branches of
``s.fork(n)``.

A :class:`ProgramState` is a thin face over its executor (interpreter.py):
appending enqueues, reading a variable waits for it, ``text_iter`` follows the
text as it streams. A :class:`ProgramStateGroup` holds the branches of a fork and
joins them back into the parent (their variables gathered, or their text appended).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

from plait.interpreter import StreamExecutor, merge_stream_meta
from plait.ir import (
    ConcatForks,
    Expr,
    ExprList,
    RoleBegin,
    RoleEnd,
    VarScopeBegin,
    VarScopeEnd,
    to_expr,
)


class ProgramState:
    """``s`` in ``def program(s, ...)``."""

    def __init__(self, executor: StreamExecutor):
        self.executor = executor
        self.ret_value: Any = None

    # appending and variables
    def __iadd__(self, expr: Any) -> ProgramState:
        if expr is None:
            raise ValueError("cannot append None to a program state")
        self.executor.submit(expr)
        return self

    def __getitem__(self, name: str) -> Any:
        return self.executor.get_var(name)

    def __setitem__(self, name: str, value: Any) -> None:
        self.executor.set_var(name, value)

    def __contains__(self, name: str) -> bool:
        return name in self.executor.var_events or name in self.executor.variables

    # roles and scopes
    def system(self, expr: Any = None):
        return self._role("system", expr)

    def user(self, expr: Any = None):
        return self._role("user", expr)

    def assistant(self, expr: Any = None):
        return self._role("assistant", expr)

    def _role(self, role: str, expr: Any):
        if expr is not None:
            self.executor.submit(ExprList([RoleBegin(role), to_expr(expr), RoleEnd(role)]))
            return None
        return self._role_block(role)

    @contextlib.contextmanager
    def _role_block(self, role: str):
        self.executor.submit(RoleBegin(role))
        yield
        self.executor.submit(RoleEnd(role))

    @contextlib.contextmanager
    def var_scope(self, name: str):
        """Everything appended inside the block becomes variable ``name``."""
        self.executor.submit(VarScopeBegin(name))
        yield
        self.executor.submit(VarScopeEnd(name))

    # reading
    def text(self) -> str:
        self.executor.sync()
        return self.executor.text_

    def messages(self) -> list[dict[str, Any]]:
        self.executor.sync()
        return [dict(m) for m in self.executor.messages_]

    def sync(self) -> None:
        self.executor.sync()

    def error(self) -> BaseException | None:
        return self.executor.error

    def get_meta_info(self, name: str) -> Any:
        self.executor.get_var(name)
        return self.executor.meta_info.get(name)

    def parsed(self, name: str) -> Any:
        """Variable ``name`` as a Python value: the validated pydantic object of a
        ``gen(json_schema=Model)``, the parsed JSON of a schema gen, the number or
        bool of a typed gen; plain text otherwise."""
        value = self.executor.get_var(name)
        gen = self.executor.gens.get(name)
        if gen is None or isinstance(value, list):
            return value
        if gen.schema_model is not None:
            return gen.schema_model.model_validate_json(value)
        if gen.dtype is not None:
            return _parse_typed(gen.dtype, value)
        if "json_schema" in gen.params:
            return json.loads(value)
        return value

    # forks
    def fork(self, size: int = 1) -> ProgramStateGroup:
        children = [ProgramState(c) for c in self.executor.fork(size)]
        return ProgramStateGroup(children, self)

    # streaming
    def text_iter(self, var_name: str | None = None) -> Iterator[str]:
        """The text (or one variable) as it grows; one piece when not streaming.
        Ctrl-C while waiting stops the program (its request is aborted) and raises
        KeyboardInterrupt here."""
        for piece, _ in self._pieces(var_name):
            yield piece

    async def text_async_iter(
        self, var_name: str | None = None, return_meta_data: bool = False
    ) -> AsyncIterator[Any]:
        """``text_iter`` for asyncio. With ``return_meta_data`` each item is ``(text,
        meta_info)``: the meta_info of the request that wrote the piece, its logprob
        lists covering the piece's own tokens (as SGLang gives them)."""
        loop = asyncio.get_running_loop()
        it = self._pieces(var_name)
        done = object()
        try:
            while True:
                item = await loop.run_in_executor(None, next, it, done)
                if item is done:
                    return
                yield item if return_meta_data else item[0]
        finally:
            it.close()

    def _pieces(self, var_name: str | None) -> Iterator[tuple[str, dict[str, Any] | None]]:
        ex = self.executor
        if not ex.stream:
            text = self.text() if var_name is None else self[var_name]
            meta = ex.meta_info.get(var_name) if var_name is not None else None
            yield text, meta
            return
        pos = logged = 0
        try:
            while True:
                with ex.cond:
                    ex.cond.wait_for(lambda p=pos: self._grown(var_name, p) or self._done(var_name))
                    current = ex.text_ if var_name is None else ex.variables.get(var_name, "")
                    done = self._done(var_name) and not self._grown(var_name, pos)
                    log, logged = ex.stream_log[logged:], len(ex.stream_log)
                meta, meta_of = None, None
                for name, piece_meta in log:
                    if var_name is None and name != meta_of:  # the text moved to another gen
                        meta, meta_of = None, name
                    if var_name is None or name == var_name:
                        meta = merge_stream_meta(meta, piece_meta)
                if len(current) > pos:
                    yield current[pos:], meta
                    pos = len(current)
                if done:
                    break
        except KeyboardInterrupt:
            ex.interrupt()
            raise
        ex.raise_error()

    def _grown(self, var_name: str | None, pos: int) -> bool:
        ex = self.executor
        current = ex.text_ if var_name is None else ex.variables.get(var_name, "")
        return isinstance(current, str) and len(current) > pos

    def _done(self, var_name: str | None) -> bool:
        ex = self.executor
        if ex.finished or ex.error is not None:
            return True
        event = ex.var_events.get(var_name) if var_name is not None else None
        return event is not None and event.is_set()

    def __repr__(self) -> str:
        return f"ProgramState({self.text()!r})"


class ProgramStateGroup:
    """The branches of ``s.fork(n)``."""

    def __init__(self, states: list[ProgramState], parent: ProgramState):
        self.states = states
        self.parent = parent
        self._parent_vars = set(parent.executor.variables)

    def __getitem__(self, i: int) -> ProgramState:
        return self.states[i]

    def __setitem__(self, i: int, value: ProgramState) -> None:
        """Completes ``forks[i] += expr`` (the append already went to branch i)."""
        if value is not self.states[i]:
            raise TypeError("a fork's branches cannot be replaced; append to them with +=")

    def __len__(self) -> int:
        return len(self.states)

    def __iter__(self) -> Iterator[ProgramState]:
        return iter(self.states)

    def __iadd__(self, other: Any) -> ProgramStateGroup:
        """``forks += expr`` (to every branch), a list (one per branch), or a
        function of the branch index."""
        if callable(other) and not isinstance(other, Expr):
            for i, s in enumerate(self.states):
                s += other(i)
        elif isinstance(other, (list, tuple)):
            if len(other) != len(self.states):
                raise ValueError(f"{len(other)} expressions for {len(self.states)} branches")
            for s, x in zip(self.states, other):
                s += x
        else:
            for s in self.states:
                s += other
        return self

    def join(self, mode: str = "gather_variable") -> None:
        """``gather_variable``: each variable the branches made lands in the parent as
        a list (one value per branch). ``concate_and_append``: the branches' text is
        appended to the parent's."""
        if mode == "gather_variable":
            for s in self.states:
                s.sync()
            names = []
            for s in self.states:
                names += [k for k in s.executor.variables if k not in self._parent_vars]
            for name in dict.fromkeys(names):
                self.parent[name] = [s.executor.variables.get(name) for s in self.states]
        elif mode == "concate_and_append":
            self.parent.executor.submit(ConcatForks([s.executor for s in self.states]))
            self.parent.sync()
        else:
            raise ValueError(f"join mode={mode!r}: use 'gather_variable' or 'concate_and_append'")
        for s in self.states:
            s.executor.end()


def _parse_typed(dtype: type, text: str) -> Any:
    """The value of text a typed gen wrote (plait.ir's REGEX_INT, ...)."""
    text = text.strip()
    if dtype is bool:
        return text == "True"
    if dtype is str:
        return text[1:-1] if len(text) >= 2 and text[0] == text[-1] == '"' else text
    return dtype(text)
