"""Fault tolerance: a training process killed hard (SIGKILL) mid-epoch and resumed with ``fit --ckpt_path last``
ends with the same weights and test metrics as an uninterrupted run; checkpoints are written atomically."""

from __future__ import annotations

import json
import signal

import pytest
import torch

from lightning_ood.checkpoints import read_checkpoint
from tests.conftest import make_cifar_folder
from tests.reliability.conftest import cli


@pytest.fixture(scope="module", params=["tensor", "pil"])
def runs(tmp_path_factory, request):
    tmp = tmp_path_factory.mktemp(f"resume_{request.param}")
    data = make_cifar_folder(tmp / "data", train=6, test=3)  # 60 training images: 4 steps of 16 per epoch

    def args(run: str) -> list[str]:
        return ["--data", "CIFARDataModule", "--data.root", str(data), "--data.batch_size", "16",
                "--data.pipeline", request.param,  # tensor: augmented on the device; pil: in a loader worker
                "--data.num_workers", "1",  # pil: augmentation in a worker process, resuming must still be exact
                "--model.backbone", "resnet20", "--model.scorers", "[msp, energy, fmls]",
                "--model.milestones", "[2]", "--trainer.max_epochs", "3", "--trainer.enable_progress_bar", "false",
                "--data.ood", '[{"name": "gaussian_noise", "size": 20}]',
                "--trainer.logger.init_args.save_dir", str(tmp / run / "logs"),
                "--checkpoint.dirpath", str(tmp / run / "ckpt")]  # fmt: skip

    cli("fit", *args("straight"))
    killed = cli("fit", *args("killed"), "--trainer.callbacks+=tests.helpers.KillAtStep",
                 "--trainer.callbacks.step", "6", expect=-signal.SIGKILL)  # fmt: skip
    interrupted = read_checkpoint(tmp / "killed" / "ckpt" / "last.ckpt")
    cli("fit", *args("killed"), "--ckpt_path", "last")
    for run in ("straight", "killed"):
        cli("test", *args(run), "--ckpt_path", str(tmp / run / "ckpt" / "last.ckpt"),
            "--trainer.logger.init_args.version", "test")  # fmt: skip
    return tmp, interrupted, killed


def test_the_kill_happened_mid_training(runs):
    _, interrupted, killed = runs
    assert killed.returncode == -signal.SIGKILL
    assert interrupted["global_step"] == 4, "the last checkpoint before the kill is the end of epoch 0"


def test_resumed_run_equals_uninterrupted_run(runs):
    tmp, _, _ = runs
    straight = read_checkpoint(tmp / "straight" / "ckpt" / "last.ckpt")
    resumed = read_checkpoint(tmp / "killed" / "ckpt" / "last.ckpt")
    assert straight["global_step"] == resumed["global_step"] == 12
    assert straight["state_dict"].keys() == resumed["state_dict"].keys()
    for name, tensor in straight["state_dict"].items():
        assert torch.equal(tensor, resumed["state_dict"][name]), name
    for key, value in straight["ood_statistics"].items():
        other = resumed["ood_statistics"][key]
        assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, key
    results = [json.loads((tmp / run / "logs" / "lightning_ood" / "test" / "ood_results.json").read_text())
               for run in ("straight", "killed")]  # fmt: skip
    assert results[0]["metrics"] == results[1]["metrics"] and results[0]["accuracy"] == results[1]["accuracy"]


def test_no_temporary_or_truncated_files_left(runs):
    tmp, _, _ = runs
    assert not list(tmp.rglob("*.tmp"))
    for path in tmp.rglob("*.ckpt"):
        read_checkpoint(path)  # every checkpoint on disk loads
