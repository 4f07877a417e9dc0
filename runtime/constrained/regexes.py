"""Regexes shared by the DSL's typed ``gen`` and the choice constraint.

Each typed regex matches exactly the JSON literal of its type, so ``json.loads``
turns the generated text into the Python value. The syntax is the common subset
of Python ``re``, Rust ``regex`` (llguidance, outlines-core) and interegular.
"""

from __future__ import annotations

INT_REGEX = r"-?(0|[1-9][0-9]*)"
FLOAT_REGEX = r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?"
BOOL_REGEX = r"(true|false)"
# A JSON string: no raw control characters; escapes as JSON defines them.
STRING_REGEX = r'"([^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*"'

_META = frozenset("\\.^$|?*+()[]{}")


def escape_regex(text: str) -> str:
    """Escape ``text`` to match itself literally in any of the three regex dialects.

    Metacharacters get a backslash; unprintable Latin-1 characters (newline, tab,
    ...) become ``\\xHH``, which all three dialects read alike; the rest stay literal.
    """
    out = []
    for ch in text:
        if ord(ch) < 0x100 and not ch.isprintable():
            out.append(f"\\x{ord(ch):02x}")
        elif ch in _META:
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)


def choices_to_regex(choices: list[str]) -> str:
    """A regex matching exactly one of ``choices``."""
    return "(" + "|".join(escape_regex(c) for c in choices) + ")"
