"""The ``plait`` command (also ``python -m plait``).

plait generate "The capital of France is" --max-new-tokens 16
plait serve --model smollm2 --port 30000
plait bench engine --threads 2
plait bench prefix --threads 2
plait bench grammar --threads 2
plait bench kernels --threads 2
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="alias, HF model dir or .gguf file")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if present)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: auto)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--max-total-tokens", type=int, default=None, help="KV cache size in tokens")
    p.add_argument("--kv-cache-memory-gb", type=float, default=1.0, help="KV cache budget")


def _engine_kwargs(a: argparse.Namespace) -> dict:
    return {
        "device": a.device,
        "dtype": a.dtype,
        "num_threads": a.threads,
        "max_total_tokens": a.max_total_tokens,
        "kv_cache_memory_gb": a.kv_cache_memory_gb,
    }


def _generate(a: argparse.Namespace) -> int:
    from plait.runtime.engine import Engine

    params = {
        "max_new_tokens": a.max_new_tokens,
        "temperature": a.temperature,
        "top_p": a.top_p,
        "top_k": a.top_k,
        "stop": a.stop or [],
        "seed": a.seed,
    }
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
    name = pathlib.Path(model.rstrip("/\\")).name or model
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
    if a.workload == "engine":
        from plait.runtime import bench

        return bench.main(a)
    if a.workload == "programs":
        from plait import bench_programs

        return bench_programs.main(a)
    if a.workload == "server":
        from plait.runtime.server import bench as bench_server

        return bench_server.main(a)
    if a.workload == "memory":
        from plait.runtime import bench_memory

        return bench_memory.main(a)
    if a.workload == "kernels":
        from plait.runtime import bench_kernels

        return bench_kernels.main(a)
    if a.workload == "grammar":
        from plait.runtime import bench_grammar

        return bench_grammar.main(a)
    from plait.runtime import bench_prefix

    return bench_prefix.main(a)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plait", description=__doc__.split("\n\n")[0])
    parser.add_argument("--log-level", default="warning")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text for one prompt")
    g.add_argument("prompt")
    _engine_args(g)
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    g.add_argument("--stream", action="store_true")
    g.add_argument("--json", action="store_true", help="print the whole result dict")
    g.set_defaults(func=_generate)

    v = sub.add_parser("serve", help="serve the native and OpenAI-compatible HTTP API")
    _engine_args(v)
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=30000)
    v.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    v.add_argument("--served-model-name", default=None, help="the model name clients send")
    v.add_argument(
        "--max-request-bytes",
        type=int,
        default=4 * 2**20,
        help="request bodies past this get 413, before any tokenizing (default 4 MiB)",
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
    v.add_argument("--schedule-policy", choices=["lpm", "fcfs"], default="lpm")
    v.add_argument("--chunked-prefill-size", type=int, default=2048)
    v.add_argument("--max-running-requests", type=int, default=64)
    v.add_argument("--context-length", type=int, default=None)
    v.add_argument("--grammar-backend", choices=["llguidance", "outlines"], default="llguidance")
    v.add_argument("--disable-radix-cache", action="store_true")
    v.add_argument("--disable-jump-forward", action="store_true")
    v.add_argument("--log-level", default=argparse.SUPPRESS, help="also settable before serve")
    v.set_defaults(func=_serve)

    b = sub.add_parser("bench", help="benchmarks against HF transformers")
    b.add_argument(
        "workload",
        choices=[
            "engine",
            "few-shot",
            "multi-turn",
            "fork",
            "prefix",
            "grammar",
            "programs",
            "server",
            "kernels",
            "memory",
        ],
        help="engine: raw speed; few-shot, multi-turn, fork: prefix reuse; prefix: all three; "
        "grammar: constrained decoding; programs: DSL programs; server: HTTP serving; "
        "kernels: the fused CPU kernels against the torch ops they replace; "
        "memory: resident memory under a steady chat load",
    )
    _engine_args(b)
    b.add_argument("--quick", action="store_true", help="fewer tokens (a smoke run)")
    b.add_argument("--skip-hf", action="store_true", help="measure plait only")
    b.add_argument(
        "--size",
        default="",
        help="few-shot/multi-turn/fork: override workload sizes, e.g. sessions=1,turns=8",
    )
    from plait.runtime.bench_grammar import add_arguments as add_grammar_arguments

    add_grammar_arguments(b)
    b.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
