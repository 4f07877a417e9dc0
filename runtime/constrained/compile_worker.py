"""A child process that compiles grammars for backends that do not bound their own
work (outlines), so the compiler can stop a compile by killing the process.

    python -m plait.runtime.constrained.compile_worker

Frames on stdin/stdout are a 4-byte little-endian length and a pickle. A request is
``(backend_name, fingerprint, tokenizer_state_or_None, kind, source)``; the tokenizer
state (token bytes, EOS ids, special tokens) is sent the first time a fingerprint is
used and kept. The answer is ``(status, payload)``: ``("ok", dumped grammar)``,
``("invalid", reason)`` for a bad constraint, ``("unsupported", reason)`` otherwise.
"""

from __future__ import annotations

import sys
from typing import Any


def _no_encode(text: str) -> list[int]:
    raise RuntimeError("a grammar compiled in a worker process cannot tokenize")


def main() -> None:
    from plait.runtime.constrained.compiler import make_backend, read_frame, write_frame
    from plait.runtime.constrained.spec import GrammarError, GrammarSpec, UnsupportedGrammar
    from plait.runtime.constrained.vocab import TokenizerInfo

    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    backends: dict[tuple[str, str], Any] = {}
    infos: dict[str, TokenizerInfo] = {}
    while True:
        try:
            name, fingerprint, state, kind, source = read_frame(stdin)
        except EOFError:
            return
        try:
            if state is not None:
                infos[fingerprint] = TokenizerInfo(*state, encode=_no_encode)
            backend = backends.get((name, fingerprint))
            if backend is None:
                backend = backends[name, fingerprint] = make_backend(name, infos[fingerprint])
            grammar = backend.compile(GrammarSpec(kind, source))
            answer = ("ok", backend.dump(grammar))
        except GrammarError as e:
            answer = ("invalid", e.reason)
        except UnsupportedGrammar as e:
            answer = ("unsupported", e.reason)
        except Exception as e:  # anything else: this backend cannot compile it
            answer = ("unsupported", f"{name}: {type(e).__name__}: {e}")
        write_frame(stdout, answer)


if __name__ == "__main__":
    main()
