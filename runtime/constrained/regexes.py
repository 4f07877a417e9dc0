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


def ascii_digits(regex: str) -> str:
    r"""Read ``\d`` / ``\D`` as ASCII ``[0-9]`` / ``[^0-9]``.

    Rust's regex (both backends) and Python's ``re`` give ``\d`` every Unicode
    decimal digit; a constrained model then happily writes digits from other
    scripts. Users of ``\d`` mean 0-9, as outlines and SGLang treat it.
    """
    out: list[str] = []
    in_class = False
    i = 0
    while i < len(regex):
        ch = regex[i]
        if ch == "\\" and i + 1 < len(regex):
            nxt = regex[i + 1]
            if nxt == "d":
                out.append("0-9" if in_class else "[0-9]")
            elif nxt == "D" and not in_class:
                out.append("[^0-9]")
            else:
                out.append(regex[i : i + 2])  # other escapes, and \D inside a class
            i += 2
            continue
        if ch == "[" and not in_class:
            in_class = True
            out.append(ch)
            # A ']' right after '[' or '[^' is a literal, not the end of the class.
            j = i + 1
            if j < len(regex) and regex[j] == "^":
                out.append("^")
                j += 1
            if j < len(regex) and regex[j] == "]":
                out.append("]")
                j += 1
            i = j
            continue
        if ch == "]" and in_class:
            in_class = False
        out.append(ch)
        i += 1
    return "".join(out)
