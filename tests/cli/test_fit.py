"""`lightning-ood fit` through the CLI: every backbone, and fit, resume and test from a checkpoint."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import quiet, run_cli


@pytest.mark.parametrize("backbone", ["resnet20", "resnet18", "densenet100"])
def test_fast_dev_run_fit(backbone, cifar_folder, tmp_path):
    run_cli(
        "fit",
        "--data", "CIFARDataModule", "--data.root", str(cifar_folder), "--data.batch_size", "4",
        "--data.num_workers", "0", "--model.backbone", backbone, "--trainer.fast_dev_run", "true",
        *quiet(tmp_path),
    )  # fmt: skip


def test_fit_resume_and_test_from_checkpoint(cifar_folder, tmp_path, capsys):
    common = [
        "--data", "CIFARDataModule", "--data.root", str(cifar_folder), "--data.batch_size", "16",
        "--data.num_workers", "0", "--model.backbone", "resnet20", "--trainer.enable_progress_bar", "false",
        *quiet(tmp_path),
    ]  # fmt: skip
    run_cli("fit", *common, "--trainer.max_epochs", "1")
    last = tmp_path / "ckpt" / "last.ckpt"
    assert last.exists()
    first = torch.load(last, weights_only=True)
    assert first["global_step"] == 4  # 60 images, batch 16
    assert "ood_statistics" in first, "last.ckpt is rewritten once the statistics exist"
    run_cli("fit", *common, "--trainer.max_epochs", "2", "--ckpt_path", "last")
    assert torch.load(last, weights_only=True)["global_step"] == 8, "resumed from last.ckpt and ran one more epoch"
    run_cli("test", *common, "--ckpt_path", str(last))
    assert "ID accuracy on cifar10" in capsys.readouterr().out
