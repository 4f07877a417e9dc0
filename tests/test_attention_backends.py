"""Attention backends register by name in one place, which config and CLI both read."""

from __future__ import annotations

import subprocess
import sys

import pytest

from plait.runtime import attention, cli
from plait.runtime.config import EngineConfig


def engine_option(command: str):
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    sub = subparsers.choices[command]
    (action,) = [a for a in sub._actions if a.dest == "attention_backend"]
    return sub, action


def test_the_registry_names_are_the_cli_choices():
    assert attention.ATTENTION_BACKENDS == ("auto", *attention.BACKENDS) == ("auto", "torch", "cpu")
    for command in ("generate", "serve"):
        _, action = engine_option(command)
        assert tuple(action.choices) == attention.ATTENTION_BACKENDS
        assert action.default == EngineConfig().attention_backend == "auto"


def test_the_cli_help_describes_every_backend():
    sub, _ = engine_option("generate")
    help_text = " ".join(sub.format_help().split())
    assert "--attention-backend {auto,torch,cpu}" in help_text
    for name, entry in attention.BACKENDS.items():
        assert f"{name}: {entry.doc}" in help_text
    assert f"auto: {attention.AUTO_DOC}" in help_text


def test_the_cli_option_reaches_the_engine():
    args = cli.build_parser().parse_args(["generate", "hi", "--attention-backend", "torch"])
    assert cli._engine_kwargs(args)["attention_backend"] == "torch"


def test_engine_config_accepts_exactly_the_registered_names():
    for name in attention.ATTENTION_BACKENDS:
        assert EngineConfig(attention_backend=name).attention_backend == name
    with pytest.raises(ValueError) as e:
        EngineConfig(attention_backend="flash")
    assert str(e.value) == "attention_backend='flash': supported: ['auto', 'torch', 'cpu']"


def test_create_backend_rejects_auto_and_unknown_names():
    for name in ("auto", "flash"):
        with pytest.raises(ValueError, match=f"attention_backend='{name}': supported:"):
            attention.create_backend(name)


def test_a_backend_module_is_imported_only_when_created():
    code = (
        "import sys\n"
        "from plait.runtime import cli, config\n"
        "cli.build_parser(); config.EngineConfig(attention_backend='cpu')\n"
        "print(sorted(m for m in sys.modules if m.startswith('plait.runtime.attention.')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
