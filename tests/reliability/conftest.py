"""What the reliability tests share: a 1-epoch ResNet-20 checkpoint on a generated CIFAR folder (``trained``),
the CLI in a subprocess (``cli``), the checks of what a refused or failed run leaves on disk."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, fit_one_epoch


def cli(*args: str, expect: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "lightning_ood", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A generated CIFAR folder and a 1-epoch ResNet-20 checkpoint with statistics."""
    return fit_one_epoch(tmp_path_factory.mktemp("faults"), test=3)


RUN_RECORDS = ("config.yaml", "hparams.yaml", "events.out.tfevents.*")  # what a run writes from its first step


def only_run_records(logs: Path) -> None:
    """A run that failed after it started keeps what it wrote (its config and TensorBoard events: never deleted) but
    leaves no results, no lock, no temporary file and no empty folder."""
    files = [p for p in logs.rglob("*") if p.is_file()] if logs.exists() else []
    assert all(any(p.match(pattern) for pattern in RUN_RECORDS) for p in files), files
    assert all(any(p.iterdir()) for p in logs.rglob("*") if p.is_dir()), sorted(logs.rglob("*"))


@pytest.fixture
def unwritable(monkeypatch):
    """As root every folder is writable: make the writability check see the given folders as read-only."""
    folders: list[Path] = []
    real = os.access

    def access(path, mode, *a, **k):
        if mode & os.W_OK and any(Path(path) == f for f in folders):
            return False
        return real(path, mode, *a, **k)

    monkeypatch.setattr("lightning_ood.io.os.access", access)
    return folders


def nan_checkpoint(ckpt: Path, path: Path) -> Path:
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["state_dict"]["backbone.conv1.weight"][0, 0, 0, 0] = float("nan")
    checkpoint["ood_statistics"]["weights"] = ""  # statistics of unknown weights are trusted: the features fail
    torch.save(checkpoint, path)
    return path


def no_results(tmp):
    """Nothing half-written: no result files, no temporary files, no new checkpoints."""
    assert not list((tmp / "logs").rglob("ood_results.*")) if (tmp / "logs").exists() else True
    assert not list(tmp.rglob("*.tmp"))
    assert sorted(p.name for p in (tmp / "ckpt").iterdir()) == ["epoch000.ckpt", "last.ckpt"]
