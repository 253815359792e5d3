"""The command line frame: help, version, fast start, exit codes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from medssl import __version__
from medssl.cli import main


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_help_lists_commands_and_each_command_has_an_example(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for name in ("data", "evaluate"):
        assert name in out
    with pytest.raises(SystemExit):
        main(["data", "demo", "--help"])
    assert "example:" in capsys.readouterr().out


def test_help_does_not_import_heavy_libraries():
    code = "import sys; from medssl.cli import build_parser; build_parser(); print(sorted(m for m in ('torch','monai','numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["data", "demo"])  # --out missing
    assert stop.value.code == 2
