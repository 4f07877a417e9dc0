"""Every PLAIT_* environment switch is read through plait.switches, and documented there."""

from __future__ import annotations

import pathlib
import re

import pytest
import torch

from plait import switches
from plait.runtime.loader import default_cache_dir
from plait.runtime.models import llama

PACKAGE_DIRS = ("lang", "runtime", "radix", "kernels", "multimodal")
ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_the_docstring_table_is_the_list_of_switches():
    assert switches.table() in switches.__doc__
    assert [s.name for s in switches.SWITCHES] == [
        "PLAIT_CACHE_DIR",
        "PLAIT_CPU_KERNELS",
        "PLAIT_ONEDNN",
        "PLAIT_REQUIRE_DEFAULT_MODEL",
    ]


def test_no_module_but_plait_switches_reads_a_plait_variable():
    """A PLAIT_ name next to an environment read anywhere else is a second reader."""
    read = re.compile(r"(environ|getenv)[^\n]*PLAIT_|PLAIT_[^\n]*(environ|getenv)")
    offenders = [
        str(path.relative_to(ROOT))
        for folder in PACKAGE_DIRS
        for path in (ROOT / folder).rglob("*.py")
        if path.name != "switches.py" and read.search(path.read_text())
    ]
    assert offenders == []


@pytest.mark.parametrize(
    ("raw", "on_unless_zero", "on_if_set"),
    [(None, True, False), ("", True, False), ("0", False, True), ("1", True, True)],
)
def test_flags_read_as_documented(monkeypatch, raw, on_unless_zero, on_if_set):
    for switch in switches.SWITCHES:
        if raw is None:
            monkeypatch.delenv(switch.name, raising=False)
        else:
            monkeypatch.setenv(switch.name, raw)
    assert switches.CPU_KERNELS.value() is on_unless_zero
    assert switches.ONEDNN.value() is on_unless_zero
    assert switches.REQUIRE_DEFAULT_MODEL.value() is on_if_set


def test_the_cache_dir_switch_reaches_the_loader(monkeypatch, tmp_path):
    monkeypatch.setenv("PLAIT_CACHE_DIR", "~/plait-here")
    assert default_cache_dir() == pathlib.Path.home() / "plait-here"
    monkeypatch.setenv("PLAIT_CACHE_DIR", "")  # empty: as if unset
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == switches.cache_dir() == tmp_path / "plait"


def test_plait_onednn_0_keeps_the_plain_matmul_layout(monkeypatch):
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch has no oneDNN")
    weight = torch.randn(8, 4)
    monkeypatch.delenv("PLAIT_ONEDNN", raising=False)
    assert llama._onednn_packs(weight)
    monkeypatch.setenv("PLAIT_ONEDNN", "0")
    assert not llama._onednn_packs(weight)
