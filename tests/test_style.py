"""Formatting that ruff does not check: the C++ kernels follow the repository's
.clang-format (fix with ``clang-format -i kernels/*.cpp``)."""

import pathlib
import subprocess

import clang_format

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_cpp_sources_are_formatted():
    sources = sorted(ROOT.glob("kernels/**/*.cpp")) + sorted(ROOT.glob("kernels/**/*.h"))
    assert ROOT / "kernels" / "cpu_ops.cpp" in sources
    done = subprocess.run(
        [clang_format.get_executable("clang-format"), "--dry-run", "--Werror", *sources],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
