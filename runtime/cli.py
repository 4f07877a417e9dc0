"""The ``plait`` command (also ``python -m plait``).

Arguments are checked before anything heavy is imported or loaded: a bad value
ends the command at once with one line, ``plait: error: ...``, and exit status
2 (argparse's convention for usage errors). Errors while running print one line
too (status 2 for bad input such as a model that cannot load, 1 otherwise);
``--log-level debug`` adds the traceback. Ctrl-C exits with status 130.
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys
import traceback
import urllib.parse

from plait.multimodal.generation import SCHEDULER_NAMES
from plait.runtime.attention import ATTENTION_BACKENDS
from plait.runtime.attention import describe as describe_attention_backends

DESCRIPTION = (
    "plait: a structured-generation runtime. Generate text for one prompt, serve "
    "SGLang's native HTTP API and OpenAI's, or run a benchmark."
)
EXAMPLES = """examples:
  plait generate "The capital of France is" --max-new-tokens 16
  plait generate "Tell me a joke" --chat --stream --temperature 0.7 --seed 1
  plait serve --model smollm2 --port 30000
  plait bench engine --threads 2
  plait <command> --help     the options of one command, with their defaults
"""
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16", "half")

log = logging.getLogger("plait.cli")


class UsageError(ValueError):
    """A command-line value is wrong; the message names the option."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default, except where there is none to show (None, False)
    or the help text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is False or "default" in text:
            return text
        return super()._get_help_string(action)


class _WorkloadParser(argparse.ArgumentParser):
    """The parser of one ``plait bench`` workload. The workload's own flags come from
    its module's ``add_arguments``, called when this parser is first used (to parse
    or to print help), so building the command line imports no benchmark module."""

    def __init__(self, *args, workload: str, **kwargs):
        super().__init__(*args, **kwargs)
        self._pending: str | None = workload

    def _add_workload_arguments(self) -> None:
        if self._pending is not None:
            from plait.bench import load

            name, self._pending = self._pending, None
            load(name).add_arguments(self)

    def parse_known_args(self, args=None, namespace=None):
        self._add_workload_arguments()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._add_workload_arguments()
        return super().format_help()


# ---- options --------------------------------------------------------------------------------


def _engine_args(p: argparse.ArgumentParser) -> None:
    e = p.add_argument_group("model and engine")
    e.add_argument(
        "--model",
        default="smollm2",
        help="a model alias (smollm2), a Hugging Face model directory or a .gguf file",
    )
    e.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if present)"
    )
    e.add_argument(
        "--dtype", default=None, choices=DTYPES, help="(default: bfloat16 on CUDA, float32 on CPU)"
    )
    e.add_argument(
        "--attention-backend",
        default="auto",
        choices=ATTENTION_BACKENDS,
        help=describe_attention_backends(),
    )
    e.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    e.add_argument(
        "--max-total-tokens",
        type=int,
        default=None,
        help="KV cache size in tokens (default: from --kv-cache-memory-gb)",
    )
    e.add_argument("--kv-cache-memory-gb", type=float, default=1.0, help="KV cache budget in GiB")
    e.add_argument(
        "--mm-cache-memory-gb",
        type=float,
        default=0.5,
        help="budget in GiB of an image model's vision-embedding cache (0 keeps none)",
    )


def _engine_kwargs(a: argparse.Namespace) -> dict:
    return {
        "device": a.device,
        "dtype": a.dtype,
        "attention_backend": a.attention_backend,
        "num_threads": a.threads,
        "max_total_tokens": a.max_total_tokens,
        "kv_cache_memory_gb": a.kv_cache_memory_gb,
        "mm_cache_memory_gb": a.mm_cache_memory_gb,
    }


def _sampling_params(a: argparse.Namespace) -> dict:
    return {
        "max_new_tokens": a.max_new_tokens,
        "temperature": a.temperature,
        "top_p": a.top_p,
        "top_k": a.top_k,
        "stop": a.stop or [],
        "seed": a.seed,
    }


# ---- checks before any loading -------------------------------------------------------------


def _at_least(a: argparse.Namespace, attr: str, low: float, *, strict: bool = False) -> None:
    value = getattr(a, attr, None)
    if value is None:
        return
    if value < low or (strict and value == low):
        flag = "--" + attr.replace("_", "-")
        raise UsageError(f"{flag}={value}: must be {'>' if strict else '>='} {low}")


def _check_device(device: str | None) -> None:
    if device in (None, "auto", "cpu"):
        return
    import torch  # only for a device other than the CPU

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise UsageError(f"--device={device}: not a torch device ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device={device}: this machine has no CUDA device (use --device cpu)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"--device={device}: only {torch.cuda.device_count()} CUDA device(s)")


def check_args(a: argparse.Namespace) -> None:
    """Everything that can be checked without loading the model; raises UsageError."""
    from plait.runtime.loader import ModelLoadError, check_model

    if hasattr(a, "model"):
        try:
            check_model(a.model)
        except ModelLoadError as e:
            raise UsageError(f"--model: {e}") from None
        _at_least(a, "threads", 1)
        _at_least(a, "max_total_tokens", 1)
        _at_least(a, "kv_cache_memory_gb", 0, strict=True)
        _at_least(a, "mm_cache_memory_gb", 0)
        _check_device(a.device)
    if a.command == "generate":
        from plait.runtime.sampling_params import SamplingParams

        try:
            SamplingParams.from_dict(_sampling_params(a)).verify()
        except ValueError as e:  # names the field: sampling_params.temperature=-1.0: ...
            raise UsageError(_as_flag(str(e).removeprefix("sampling_params."))) from None
    if a.command == "serve":
        if not 0 <= a.port <= 65535:
            raise UsageError(f"--port={a.port}: must be in 0..65535")
        for attr in ("max_request_bytes", "chunked_prefill_size", "max_running_requests"):
            _at_least(a, attr, 1)
        _at_least(a, "context_length", 1)
        _at_least(a, "max_top_logprobs_num", 0)
        _at_least(a, "grammar_compile_timeout", 0, strict=True)
        _check_media_args(a)
        _check_image_args(a)


def _check_image_args(a: argparse.Namespace) -> None:
    if a.image_model is not None and a.image_backend is not None:
        raise UsageError("--image-model and --image-backend: give one image generator, not both")
    if a.image_model is not None and not pathlib.Path(a.image_model).expanduser().is_dir():
        raise UsageError(f"--image-model={a.image_model}: not a directory")
    if a.image_backend is None:
        for flag in ("image_backend_model", "image_backend_api_key"):
            if getattr(a, flag) is not None:
                raise UsageError(f"--{flag.replace('_', '-')}: needs --image-backend URL")
    elif urllib.parse.urlsplit(a.image_backend).scheme not in ("http", "https"):
        raise UsageError(f"--image-backend={a.image_backend}: not an http:// or https:// URL")
    _at_least(a, "image_backend_timeout", 0, strict=True)
    if a.image_model is None:
        for flag in ("image_scheduler", "image_idle_offload", "image_batch_invariant"):
            if getattr(a, flag) not in (None, False):
                raise UsageError(f"--{flag.replace('_', '-')}: needs --image-model DIR")
    _at_least(a, "image_idle_offload", 0)
    _at_least(a, "image_max_batch", 1)


def _check_media_args(a: argparse.Namespace) -> None:
    _at_least(a, "media_fetch_timeout", 0, strict=True)
    _at_least(a, "max_media_bytes", 1)
    root = a.allowed_local_media_path
    if root is not None and not pathlib.Path(root).expanduser().is_dir():
        raise UsageError(f"--allowed-local-media-path={root}: not a directory")
    for host in a.allowed_media_domains or ():
        if not host.strip(" .") or any(c in host for c in "/:@ "):
            raise UsageError(
                f"--allowed-media-domains: {host!r} is not a host name (give names like "
                "example.com, without scheme, port or path)"
            )


def _as_flag(message: str) -> str:
    """``max_new_tokens=-1: ...`` -> ``--max-new-tokens=-1: ...``."""
    name, sep, rest = message.partition("=")
    return f"--{name.replace('_', '-')}{sep}{rest}" if sep and name.isidentifier() else message


# ---- commands -------------------------------------------------------------------------------


def _generate(a: argparse.Namespace) -> int:
    from plait.runtime.engine import Engine

    params = _sampling_params(a)
    with Engine(model=a.model, **_engine_kwargs(a)) as engine:
        prompt = a.prompt
        if a.chat:
            prompt = engine.apply_chat_template([{"role": "user", "content": prompt}])
        if a.stream:
            for chunk in engine.generate(prompt, params, stream=True):
                sys.stdout.write(chunk["text"])
                sys.stdout.flush()
            sys.stdout.write("\n")
            return 0
        out = engine.generate(prompt, params)
        if a.json:
            print(json.dumps(out, indent=2))
        else:
            print(out["text"])
    return 0


def _model_name(model: str) -> str:
    """The name a server shows for ``--model``: an alias as it is, a directory or file by
    its last component (never its path)."""
    path = pathlib.Path(model.rstrip("/\\"))
    name = path.name if path.name not in ("", ".", "..") else path.resolve().name
    name = name or model
    return name.removesuffix(".gguf")


def _serve(a: argparse.Namespace) -> int:
    from plait.runtime.server import ServerConfig, serve

    config = ServerConfig(
        served_model_name=a.served_model_name or _model_name(a.model),
        api_key=a.api_key,
        max_request_bytes=a.max_request_bytes,
        allow_origins=tuple(a.allow_origins or ()),
        incremental_streaming_output=a.incremental_streaming_output,
        profile_dir=a.profile_dir,
        allowed_local_media_path=a.allowed_local_media_path,
        allowed_media_domains=(
            None if a.allowed_media_domains is None else tuple(a.allowed_media_domains)
        ),
        media_fetch_timeout_s=a.media_fetch_timeout,
        max_media_bytes=a.max_media_bytes,
        image_model=a.image_model,
        image_backend=a.image_backend,
        image_backend_model=a.image_backend_model,
        image_backend_api_key=a.image_backend_api_key,
        image_backend_timeout_s=a.image_backend_timeout,
        image_scheduler=a.image_scheduler,
        image_idle_offload_s=a.image_idle_offload,
        image_max_batch=a.image_max_batch,
        image_batch_invariant=a.image_batch_invariant,
    )
    serve(
        host=a.host,
        port=a.port,
        server=config,
        log_level=a.log_level,
        model=a.model,
        **_engine_kwargs(a),
        schedule_policy=a.schedule_policy,
        chunked_prefill_size=a.chunked_prefill_size,
        max_running_requests=a.max_running_requests,
        context_length=a.context_length,
        grammar_backend=a.grammar_backend,
        disable_radix_cache=a.disable_radix_cache,
        disable_jump_forward=a.disable_jump_forward,
        max_top_logprobs_num=a.max_top_logprobs_num,
        grammar_compile_timeout_s=a.grammar_compile_timeout,
    )
    return 0


def _bench(a: argparse.Namespace) -> int:
    from plait.bench import load

    return load(a.workload).main(a)


# ---- the parser -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="plait", description=DESCRIPTION, epilog=EXAMPLES, formatter_class=_HelpFormatter
    )
    parser.add_argument(
        "--log-level",
        default="info",
        type=str.lower,
        choices=LOG_LEVELS,
        help="what plait logs to stderr; debug also shows tracebacks (also accepted after "
        "the command; default: info)",
    )
    # --log-level after the command too; SUPPRESS keeps the value given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--log-level",
        default=argparse.SUPPRESS,
        type=str.lower,
        choices=LOG_LEVELS,
        help="as before the command",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name, help=help, description=help, parents=[common], formatter_class=_HelpFormatter
        )

    g = command("generate", "generate text for one prompt")
    g.add_argument("prompt", help="the prompt (raw text; --chat wraps it in the chat template)")
    _engine_args(g)
    s = g.add_argument_group("sampling")
    s.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most")
    s.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    s.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    s.add_argument("--top-k", type=int, default=-1, help="-1 keeps every token")
    s.add_argument("--stop", action="append", help="a stop string (repeatable)")
    s.add_argument("--seed", type=int, default=None, help="sampling seed")
    o = g.add_argument_group("output")
    o.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    o.add_argument("--stream", action="store_true", help="print the text as it is generated")
    o.add_argument("--json", action="store_true", help="print the whole result dict")
    g.set_defaults(func=_generate)

    v = command("serve", "serve SGLang's native HTTP API and OpenAI's")
    _engine_args(v)
    v.add_argument("--host", default="127.0.0.1", help="address to listen on")
    v.add_argument("--port", type=int, default=30000, help="port to listen on")
    v.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    v.add_argument(
        "--served-model-name",
        default=None,
        help="the model name clients send (default: the --model alias, or its file name)",
    )
    v.add_argument(
        "--max-request-bytes",
        type=int,
        default=4 * 2**20,
        help="request bodies past this get 413, before any tokenizing (default: 4 MiB)",
    )
    v.add_argument(
        "--allow-origins",
        nargs="+",
        default=None,
        help="origins browsers may call from (CORS); none by default",
    )
    v.add_argument(
        "--incremental-streaming-output",
        action="store_true",
        help="/generate stream events carry only what is new (text, ids, output logprobs), "
        "as SGLang's flag of the same name; a request's incremental_streaming_output wins",
    )
    v.add_argument(
        "--profile-dir",
        default=None,
        help="enables /start_profile and /stop_profile, which write torch profiler traces "
        "here (off by default)",
    )
    m = v.add_argument_group("media (images a request may make the server read)")
    m.add_argument(
        "--allowed-local-media-path",
        metavar="DIR",
        default=None,
        help="requests may name local image files by plain path inside DIR (file:// URLs are "
        "always refused), "
        "symlinks resolved; by default a request reads no local file",
    )
    m.add_argument(
        "--allowed-media-domains",
        metavar="HOST",
        nargs="+",
        default=None,
        help="image URLs may only name these exact host names (redirects too); by default "
        "any host, local addresses included",
    )
    m.add_argument(
        "--media-fetch-timeout",
        type=float,
        default=5.0,
        help="seconds an image URL's whole fetch may take",
    )
    m.add_argument(
        "--max-media-bytes",
        type=int,
        default=20 * 2**20,
        help="the most bytes of one image, fetched, read or decoded (default: 20 MiB)",
    )
    i = v.add_argument_group("images out (POST /v1/images/generations)")
    i.add_argument(
        "--image-model",
        metavar="DIR",
        default=None,
        help="a local diffusers text-to-image pipeline directory that draws the images "
        "(needs plait[diffusion])",
    )
    i.add_argument(
        "--image-backend",
        metavar="URL",
        default=None,
        help="a server with /v1/images/generations that draws them instead (plait, SGLang "
        "Diffusion, vLLM-Omni, OpenAI: e.g. https://api.openai.com/v1)",
    )
    i.add_argument(
        "--image-backend-model",
        metavar="NAME",
        default=None,
        help="the model name sent to --image-backend (default: none sent, the server's own)",
    )
    i.add_argument(
        "--image-backend-api-key", metavar="KEY", default=None, help="its API key (Bearer)"
    )
    i.add_argument(
        "--image-backend-timeout",
        type=float,
        default=300.0,
        help="seconds one call to --image-backend may take",
    )
    i.add_argument(
        "--image-scheduler",
        metavar="NAME",
        choices=SCHEDULER_NAMES,
        default=None,
        help="the --image-model pipeline's scheduler: "
        + ", ".join(SCHEDULER_NAMES)
        + " (default: the pipeline's own)",
    )
    i.add_argument(
        "--image-idle-offload",
        metavar="SECONDS",
        type=float,
        default=None,
        help="after this many seconds without image requests the --image-model weights "
        "leave the device (released on a CPU) until the next request (default: never)",
    )
    i.add_argument(
        "--image-max-batch",
        metavar="N",
        type=int,
        default=8,
        help="the most images of concurrent requests drawn in one pipeline call",
    )
    i.add_argument(
        "--image-batch-invariant",
        action="store_true",
        help="each image of a batched --image-model call equal, bit for bit, to its request "
        "drawn alone (layers whose kernels round by batch size run sample by sample; slower)",
    )
    v.add_argument(
        "--max-top-logprobs-num",
        type=int,
        default=20,
        help="the most top logprobs a request may ask for per token",
    )
    v.add_argument(
        "--grammar-compile-timeout",
        type=float,
        default=10.0,
        help="seconds a grammar may take to compile before the request gets a 400",
    )
    v.add_argument(
        "--schedule-policy",
        choices=["lpm", "fcfs"],
        default="lpm",
        help="lpm: longest cached prefix first; fcfs: arrival order",
    )
    v.add_argument(
        "--chunked-prefill-size", type=int, default=2048, help="prompt tokens per forward pass"
    )
    v.add_argument("--max-running-requests", type=int, default=64, help="requests decoded together")
    v.add_argument("--context-length", type=int, default=None, help="(default: the model's own)")
    v.add_argument(
        "--grammar-backend",
        choices=["llguidance", "outlines"],
        default="llguidance",
        help="the first grammar backend tried (the other is the fallback)",
    )
    v.add_argument("--disable-radix-cache", action="store_true", help="cache no prefixes")
    v.add_argument(
        "--disable-jump-forward", action="store_true", help="decode forced grammar text too"
    )
    v.set_defaults(func=_serve)

    from plait.bench import WORKLOADS  # the table only: no benchmark module is imported

    b = command("bench", "benchmarks against HF transformers and peers")
    workloads = b.add_subparsers(
        dest="workload", required=True, metavar="WORKLOAD", parser_class=_WorkloadParser
    )
    for name, workload in WORKLOADS.items():
        w = workloads.add_parser(
            name,
            help=workload.help,
            description=workload.help,
            parents=[common],
            formatter_class=_HelpFormatter,
            workload=name,
        )
        _engine_args(w)
        w.add_argument("--quick", action="store_true", help="fewer tokens (a smoke run)")
        w.add_argument("--skip-hf", action="store_true", help="measure plait only")
    b.set_defaults(func=_bench)
    return parser


# ---- logging and errors ---------------------------------------------------------------------


def setup_logging(level: str) -> None:
    """plait's loggers at ``level`` on stderr; other libraries' at WARNING (all at DEBUG)."""
    handler = logging.StreamHandler()
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if level == "debug" else logging.WARNING)
    logging.getLogger("plait").setLevel(level.upper())


def _fail(message: str, status: int, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    hint = "" if debug or status == 2 else " (--log-level debug shows the traceback)"
    print(f"plait: error: {message}{hint}", file=sys.stderr)
    return status


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    debug = args.log_level == "debug"
    try:
        check_args(args)
        return args.func(args)
    except KeyboardInterrupt:
        print("plait: interrupted", file=sys.stderr)
        return 130
    except UsageError as e:
        return _fail(str(e), 2, debug)
    except ValueError as e:  # bad input met while running: a model that cannot load, ...
        return _fail(str(e), 2, debug)
    except Exception as e:
        return _fail(f"{type(e).__name__}: {e}", 1, debug)


if __name__ == "__main__":
    raise SystemExit(main())
