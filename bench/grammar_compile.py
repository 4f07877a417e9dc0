"""``plait bench grammar``, coverage part one: compile JSONSchemaBench schemas with
each grammar backend alone and with the default fallback chain, one at a time in
a worker process, and time each compile. Also the small helpers the other
grammar sections share (the sets, progress lines on stderr)."""

from __future__ import annotations

import json
import queue
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SETS = ("Github_trivial", "Github_easy", "Glaiveai2K")
# label -> (primary backend, fallback); None: the engine's default primary.
COMPILE_CONFIGS: dict[str, tuple[str | None, bool]] = {
    "llguidance": ("llguidance", False),
    "outlines": ("outlines", False),
    "llguidance-lenient": ("llguidance-lenient", False),
    "default (chain)": (None, True),
}
DEFAULT_LABEL = "default (chain)"


# ---- 1. coverage: compile -----------------------------------------------------------------


class CompileWorker:
    """A child process that compiles JSON schemas, one at a time, and times them.

    It is restarted after a compile that ran past its deadline: the engine would
    keep that compile running in the background (a thread cannot be stopped)
    and fall back for later slow compiles, which would make every later
    measurement depend on the straggler.
    """

    def __init__(self, init: dict[str, Any], log_path: Path):
        self._init = init
        self._log = open(log_path, "a")  # noqa: SIM115 -- closed in close()
        self.restarts = 0
        self._start()

    def _start(self) -> None:
        code = "from plait.bench.grammar_compile import compile_worker_main; compile_worker_main()"
        self._proc = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            bufsize=1,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, args=(self._proc, self._lines), daemon=True).start()
        self._send(self._init)
        if self._recv(300) is None:
            raise RuntimeError(f"compile worker did not start; see {self._log.name}")

    @staticmethod
    def _read(proc: subprocess.Popen, lines: queue.Queue) -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    def _send(self, msg: dict[str, Any]) -> None:
        self._proc.stdin.write(json.dumps(msg) + "\n")
        self._proc.stdin.flush()

    def _recv(self, timeout: float) -> dict[str, Any] | None:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            return None
        return None if line is None else json.loads(line)

    def restart(self) -> None:
        self._stop()
        self.restarts += 1
        self._start()

    def compile(self, primary: str, fallback: bool, source: str, hard_timeout: float) -> dict:
        self._send({"primary": primary, "fallback": fallback, "source": source})
        result = self._recv(hard_timeout)
        if result is None:  # hung or died: what the deadline did not catch
            self.restart()
            error = f"worker gave no answer in {hard_timeout:g} s"
            return {
                "ok": False,
                "backend": None,
                "ms": hard_timeout * 1000,
                "timeout": True,
                "error": error,
            }
        if result.pop("straggling"):
            self.restart()
        return result

    def _stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()

    def close(self) -> None:
        self._stop()
        self._log.close()


def compile_worker_main() -> None:
    """The worker's loop: one JSON line in (an init, then compile requests), one out."""
    out = sys.stdout
    sys.stdout = sys.stderr  # stray prints go to the log, not the protocol
    init = json.loads(sys.stdin.readline())

    import transformers

    from plait.runtime.constrained import GrammarCompiler, GrammarError, GrammarSpec, TokenizerInfo

    tok = transformers.AutoTokenizer.from_pretrained(init["tokenizer_path"])
    info = TokenizerInfo.from_hf(tok, init["vocab_size"], init["eos_token_ids"])
    compilers: dict[tuple[str, bool], GrammarCompiler] = {}

    def reply(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    reply({"ready": True})
    for line in sys.stdin:
        msg = json.loads(line)
        key = (msg["primary"], msg["fallback"])
        if key not in compilers:
            compilers[key] = GrammarCompiler(
                info,
                msg["primary"],
                compile_timeout_s=init["timeout"],
                fallback=msg["fallback"],
                max_cached=0,  # time real compiles, even of a duplicate schema
            )
            compilers[key].compile(GrammarSpec("regex", "warm-up"))  # backend tables, once
        start = time.perf_counter()
        try:
            r = compilers[key].compile(GrammarSpec.of("json_schema", msg["source"]))
            res = {"ok": True, "backend": r.backend, "error": r.fallback_reason}
        except GrammarError as e:
            res = {"ok": False, "backend": None, "error": request_error_reason(e)}
        res["ms"] = (time.perf_counter() - start) * 1000
        res["timeout"] = "exceeded" in (res["error"] or "")
        res["straggling"] = _compile_still_running()
        reply(res)


def _compile_still_running() -> bool:
    """Whether a deadline compile thread (``plait-<backend>``) is still alive."""
    threads = [
        t
        for t in threading.enumerate()
        if t.name.startswith("plait-") and not t.name.startswith("plait-grammar")
    ]
    for t in threads:
        t.join(timeout=0.2)
    return any(t.is_alive() for t in threads)


def request_error_reason(e: Exception) -> str:
    """The reason part of a RequestError's message (without the echoed value)."""
    msg = str(e)
    field_name, value = getattr(e, "field", None), getattr(e, "value", None)
    if field_name is not None:
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        prefix = f"{field_name}={shown}: "
        if msg.startswith(prefix):
            return msg[len(prefix) :]
    return msg


@dataclass
class CompileStats:
    label: str
    results: list[dict] = field(default_factory=list)  # per schema: ok, backend, ms, ...

    def summary(self) -> dict[str, Any]:
        times = sorted(r["ms"] for r in self.results)
        n = len(self.results)
        backends: dict[str, int] = {}
        for r in self.results:
            backends[r["backend"] or "none"] = backends.get(r["backend"] or "none", 0) + 1
        return {
            "n": n,
            "pct": 100.0 * sum(r["ok"] for r in self.results) / max(n, 1),
            "median": statistics.median(times) if times else 0.0,
            "p90": times[min(n - 1, int(0.9 * n))] if times else 0.0,
            "timeouts": sum(r["timeout"] for r in self.results),
            "backends": backends,
        }


def compile_section(
    files: dict[str, list[Path]], worker: CompileWorker, primary: str, timeout: float
) -> dict[str, dict[str, CompileStats]]:
    """Compile every sampled schema under each configuration; returns set -> label -> stats."""
    out: dict[str, dict[str, CompileStats]] = {}
    hard = 3 * timeout + 60
    for set_name, paths in files.items():
        out[set_name] = {}
        for label, (cfg_primary, fallback) in COMPILE_CONFIGS.items():
            stats = CompileStats(label)
            t0 = time.perf_counter()
            for path in paths:
                r = worker.compile(cfg_primary or primary, fallback, path.read_text(), hard)
                stats.results.append({**r, "name": path.name})
            s = stats.summary()
            log(
                f"  compiled {set_name} with {label}: {s['pct']:.1f}% "
                f"({time.perf_counter() - t0:.0f} s, {s['timeouts']} timeouts)"
            )
            out[set_name][label] = stats
    return out


def one_line(text: str, limit: int = 200) -> str:
    """``text`` on one line, cut to ``limit`` characters."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def log(msg: str) -> None:
    """Progress, on stderr (the tables go to stdout)."""
    print(msg, file=sys.stderr, flush=True)
