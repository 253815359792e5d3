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


def test_threads_option_sets_torch_threads_and_refuses_nonsense(tmp_path, capsys):
    import torch

    before = torch.get_num_threads()
    wanted = 2 if before == 1 else 1  # another count than the current one, so the option must act
    try:
        assert main(["--threads", str(wanted), "data", "demo", "--dim", "2", "--subjects", "2", "--out",
                     str(tmp_path / "d")]) == 0
        assert torch.get_num_threads() == wanted
    finally:
        torch.set_num_threads(before)
    for bad in ("0", "two"):
        with pytest.raises(SystemExit) as stop:
            main(["--threads", bad, "data", "demo", "--out", str(tmp_path / "e")])
        assert stop.value.code == 2 and "--threads" in capsys.readouterr().err


def test_a_busy_cpu_is_reported_with_what_to_do(monkeypatch, caplog):
    import logging
    import os

    import torch

    from medssl.engine.runner import log_cpu_threads

    monkeypatch.setattr(os, "getloadavg", lambda: (64.0, 64.0, 64.0))
    with caplog.at_level(logging.INFO, logger="medssl.engine.runner"):
        log_cpu_threads(torch.device("cpu"))
    messages = [record.getMessage() for record in caplog.records]
    assert any("torch thread(s)" in m and "--threads" in m for m in messages)
    assert any(r.levelno == logging.WARNING and "already busy" in r.getMessage() for r in caplog.records)
