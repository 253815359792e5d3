"""``torchrun --nproc_per_node 2 -m medssl pretrain`` on CPU (gloo): one run folder (``broadcast_object``), per-rank
sampler states (``gather_objects``), the MSF bank fed by both processes (``concat_across_ranks``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import yaml

from medssl.networks import load_network
from medssl.engine.pretrain import CHECKPOINT


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 ARGS`` (as a module of this Python, so the venv is used)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_two_process_msf_pretraining_writes_one_run_folder_with_a_shared_bank(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for k in range(2):
        image = rng.normal(size=(40, 36)).cumsum(0).cumsum(1).astype(np.float32)  # smooth, textured
        nib.save(nib.Nifti1Image(image, np.eye(4)), data / f"scan{k}.nii.gz")
    config = {
        "method": "msf", "spatial_dims": 2, "seed": 1,
        "data": {"patch_size": [16, 16]}, "network": {"channels": [4, 8, 4]},
        "objective": {"msf": {"proj_dim": 8, "hidden_dim": 16, "bank_size": 16, "k": 2}},
        "train": {"steps": 2, "batch_size": 2, "lr": 1e-3, "log_every": 1, "checkpoint_every": 2},
    }
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    result = torchrun("-m", "medssl", "pretrain", "tiny.yaml", "--data", "data", "--out", "run", "train.steps=3",
                      cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert {p.name for p in tmp_path.iterdir() if p.is_dir()} == {"data", "run"}
    run = tmp_path / "run"
    state = torch.load(run / CHECKPOINT, weights_only=False)
    assert state["step"] == 3 and len(state["ranks"]) == 2
    assert [r["sampler"]["step"] for r in state["ranks"]] == [0, 0]  # the loop names each step (rank r draws
    # samples r * batch_size ... of the step's global batch: tests/test_prepared.py)
    assert len(list((run / "prepared").glob("*.npy"))) == 2  # both ranks prepared into one folder, atomically
    # 3 steps x 2 samples x 2 processes entered the bank: both ranks' targets (concat_across_ranks), not rank 0's
    assert state["objectives"]["msf.bank.filled"].item() == 12
    rows = (run / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 3, "rank 0 alone writes one row per logged step"
    assert len(list(run.glob("events.out.tfevents.*"))) == 1
    network = load_network(run).network
    assert network(torch.zeros(1, 1, 16, 16)).shape == (1, 4, 16, 16)
