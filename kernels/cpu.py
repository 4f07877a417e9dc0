"""The CPU provider of plait.kernels: fused C++ kernels for the decoder-layer glue.

``cpu_ops.cpp`` (beside this file) is built once per machine with torch's C++
extension tooling into ``<plait cache dir>/kernels/`` and registers its ops
as ``torch.ops.plait_cpu.*``, one for each op of ``plait.kernels.KernelSet``.
``provide(dtype)`` gives them for float32 (``plait.kernels.kernel_set`` asks it
for CPU models unless ``PLAIT_CPU_KERNELS=0``); the torch references in
``plait.kernels`` are what the tests hold them to.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import pathlib
import sys
import sysconfig
import threading
import time

import torch

from plait import switches
from plait.kernels import KernelSet, Unavailable

logger = logging.getLogger(__name__)

_SOURCE = pathlib.Path(__file__).with_name("cpu_ops.cpp")
_lock = threading.Lock()
_BUILD_NOTICE_AFTER_S = 1.0  # a load slower than this is a build, and is announced
_loaded: bool | None = None
_load_error: str | None = None


# ---- the compiled ops --------------------------------------------------------------------------


def _capability_flags() -> tuple[str, list[str]]:
    """The widest SIMD level this CPU has that ATen's Vectorized knows, and its compiler flags."""
    try:
        flags = set(pathlib.Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "avx512", [
            "-mavx512f",
            "-mavx512bw",
            "-mavx512vl",
            "-mavx512dq",
            "-mfma",
            "-DCPU_CAPABILITY=AVX512",
            "-DCPU_CAPABILITY_AVX512",
        ]
    if {"avx2", "fma"} <= flags:
        return "avx2", ["-mavx2", "-mfma", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return "default", []


def _build() -> tuple[pathlib.Path, str]:
    """Compile (or find compiled) and load the library; returns its build dir and SIMD level."""
    from torch.utils import cpp_extension

    cap, cap_flags = _capability_flags()
    cflags = ["-O3", "-fopenmp", *cap_flags]
    # One build per (source, flags, torch, python): an edited source never meets a stale .so.
    digest = hashlib.sha256(_SOURCE.read_bytes() + " ".join(cflags).encode()).hexdigest()[:12]
    py = f"py{sys.version_info[0]}{sys.version_info[1]}"
    build_dir = (
        switches.cache_dir()
        / "kernels"
        / f"torch{torch.__version__.split('+')[0]}-{py}-{cap}-{digest}"
    )
    build_dir.mkdir(parents=True, exist_ok=True)
    # A venv's ninja (the `ninja` dependency) sits beside its python, maybe not on PATH.
    scripts = sysconfig.get_path("scripts")
    if scripts and scripts not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = scripts + os.pathsep + os.environ.get("PATH", "")
    # torch's own build lock is a plain file that a killed build leaves behind, after which
    # every later build waits on it forever. Builders take this flock first (the kernel drops
    # it when a process dies), so a torch lock file seen while holding it is stale.
    with open(build_dir / "plait-build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        (build_dir / "lock").unlink(missing_ok=True)
        # Loading a built library takes well under a second; past that, torch is compiling
        # (the first time on this machine, or after the source file changed), a silent half
        # minute that looks like a hang: say what is happening.
        started = time.perf_counter()
        announced = threading.Event()

        def announce() -> None:
            announced.set()
            logger.info(
                "building plait's CPU kernels (%s; once per machine, ~20-60 s) in %s ...",
                cap,
                build_dir,
            )

        notice = threading.Timer(_BUILD_NOTICE_AFTER_S, announce)
        notice.daemon = True
        notice.start()
        try:
            cpp_extension.load(
                name="plait_cpu_ops",
                sources=[str(_SOURCE)],
                extra_cflags=cflags,
                extra_ldflags=["-fopenmp"],
                build_directory=str(build_dir),
                is_python_module=False,
                verbose=False,
            )
        finally:
            notice.cancel()
            notice.join()
        if announced.is_set():
            logger.info("built plait's CPU kernels in %.1f s", time.perf_counter() - started)
    torch.ops.plait_cpu.silu_mul  # noqa: B018 - fails if the library did not register
    return build_dir, cap


def load() -> bool:
    """Build (first time on this machine) and load ``torch.ops.plait_cpu``; False, with the reason
    in ``load_error()``, where that is impossible (no C++ compiler, no ninja)."""
    global _loaded, _load_error
    with _lock:
        if _loaded is not None:
            return _loaded
        t0 = time.perf_counter()
        try:
            build_dir, cap = _build()
        except Exception as e:  # a missing compiler or source surfaces as several exception types
            _load_error = f"{type(e).__name__}: {e}".strip()[:2000]
            _loaded = False
            return False
        logger.info(
            "plait CPU kernels (%s) ready in %.1f s: %s", cap, time.perf_counter() - t0, build_dir
        )
        _loaded = True
        return True


def load_error() -> str | None:
    return _load_error


def compiled() -> KernelSet:
    """The compiled ops (raises RuntimeError with the build error where they cannot load)."""
    if not load():
        raise RuntimeError(f"plait CPU kernels could not be built: {_load_error}")
    ops = torch.ops.plait_cpu
    return KernelSet(
        fused=True,
        rms_norm=ops.rms_norm,
        add_rms_norm=ops.add_rms_norm,
        rope_=ops.rope_,
        silu_mul=ops.silu_mul,
        store_kv=ops.store_kv,
        decode_attention=ops.decode_attention,
    )


def provide(dtype: torch.dtype) -> KernelSet:
    """The compiled ops for float32 (the provider entry ``plait.kernels.kernel_set`` calls)."""
    if dtype != torch.float32:
        raise Unavailable("plait CPU kernels are float32 only")
    if not load():
        raise Unavailable(f"plait CPU kernels could not be built: {_load_error}", failed=True)
    return compiled()
