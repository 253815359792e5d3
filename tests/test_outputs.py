"""``medssl.outputs``: one atomic writer for every output file, mode 0644 under umask 022, nothing half-written."""

from __future__ import annotations

import csv
import os
import stat

import numpy as np
import pytest
import torch

from medssl.config import save_config
from medssl.data.landmarks import write_landmarks
from medssl.data.readers import save_image
from medssl.outputs import save_atomic
from medssl.outputs import atomic_writer, temporaries, write_atomic


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_every_writer_makes_0644_files_under_umask_022(tmp_path, umask_022):
    with atomic_writer(tmp_path / "table.csv", "w") as handle:
        csv.writer(handle, lineterminator="\n").writerow(["a", "b"])
    written = [
        write_atomic(tmp_path / "text.json", "{}\n"),
        write_atomic(tmp_path / "deep" / "bytes.bin", b"\x00\x01"),
        save_atomic({"x": torch.arange(3)}, tmp_path / "state.pt"),
        tmp_path / "table.csv",
        save_image(np.zeros((4, 4), np.uint8), np.eye(3), tmp_path / "image.png"),
        save_image(np.zeros((4, 4, 4), np.float32), np.eye(4), tmp_path / "volume.mhd"),
    ]
    save_config({"seed": 0}, tmp_path / "config.yaml")
    write_landmarks(tmp_path / "landmarks.csv", {"a": {"p": np.zeros(2)}}, spatial_dims=2)
    written += [tmp_path / "config.yaml", tmp_path / "landmarks.csv", tmp_path / "volume.raw"]
    assert {path.name: _mode(path) for path in written} == {path.name: 0o644 for path in written}
    assert (tmp_path / "table.csv").read_text() == "a,b\n" and (tmp_path / "deep" / "bytes.bin").read_bytes() == b"\0\1"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporaries


def test_the_mode_follows_the_umask(tmp_path):
    previous = os.umask(0o077)
    try:
        write_atomic(tmp_path / "private.txt", "x")
    finally:
        os.umask(previous)
    assert _mode(tmp_path / "private.txt") == 0o600


def test_an_error_mid_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "report.md"
    write_atomic(path, "old\n")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_writer(path, "w") as handle:
            handle.write("new, half written")
            raise RuntimeError("disk on fire")
    assert path.read_text() == "old\n"
    assert temporaries(path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]
