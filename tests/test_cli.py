import subprocess
import sys
from pathlib import Path
from unittest.mock import patch

import pytest
import torch

from lightning_ood.cli import main
from tests.conftest import REPO

CONFIGS = sorted([*(REPO / "configs").glob("*.yaml"), *(REPO / "configs" / "paper").glob("*.yaml")])  # complete
OVERLAYS = sorted(p for folder in ("overlays", "ood", "scorers") for p in (REPO / "configs" / folder).glob("*.yaml"))


def run_cli(*args: str) -> None:
    with patch.object(sys, "argv", ["lightning-ood"]):
        main(list(args))


def quiet(tmp_path: Path) -> list[str]:
    """Arguments that keep a CLI run's files inside the test's folder."""
    return [
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "logs"),
        "--checkpoint.dirpath",
        str(tmp_path / "ckpt"),
    ]


def cli_error(capsys, *args: str) -> str:
    """Run the CLI expecting a user error: exit status 2 and a one-line message on stderr."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(*args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return " ".join(err.split())


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli("fit", "-c", str(config), "--print_config")
    assert exit_info.value.code == 0
    assert "class_path: lightning_ood.data." in capsys.readouterr().out


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_overlay_composes_with_a_full_config(overlay, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli("fit", "-c", str(REPO / "configs/cifar10_resnet18.yaml"), "-c", str(overlay), "--print_config")
    assert exit_info.value.code == 0


def test_quick_overlay_composes(capsys):
    with pytest.raises(SystemExit):
        run_cli("fit", "-c", str(REPO / "configs/cifar10_resnet18.yaml"), "-c",
                str(REPO / "configs/overlays/quick_cpu.yaml"), "--print_config")  # fmt: skip
    out = capsys.readouterr().out
    assert "backbone: resnet20" in out and "max_epochs: 6" in out and "dataset: cifar10" in out


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


def test_unknown_backbone(capsys):
    err = cli_error(capsys, "fit", "--data", "CIFARDataModule", "--model.backbone", "resnet99")
    assert "error: Unknown backbone 'resnet99'. Choose one of: densenet, densenet100" in err


def test_unknown_dataset(capsys):
    err = cli_error(capsys, "fit", "--data", "CIFARDataModule", "--data.dataset", "svhn")
    assert "error: Unknown dataset 'svhn'. Choose one of: cifar10, cifar100." in err


def test_missing_data(capsys, tmp_path):
    err = cli_error(
        capsys, "fit", "--data", "CIFARDataModule", "--data.root", str(tmp_path / "none"), "--data.download", "false",
        *quiet(tmp_path),
    )  # fmt: skip
    assert f"error: CIFAR-10 not found under {tmp_path / 'none'}" in err
    assert not (tmp_path / "ckpt").exists()


def test_checkpoint_with_other_class_count(capsys, cifar_folder, tmp_path):
    from lightning_ood.module import OODClassifier

    ckpt = tmp_path / "c100.ckpt"
    torch.save(
        {
            "state_dict": OODClassifier(backbone="resnet20", num_classes=100).state_dict(),
            "hyper_parameters": {"backbone": "resnet20", "num_classes": 100},
            "pytorch-lightning_version": "2.6.0",
        },
        ckpt,
    )
    err = cli_error(
        capsys, "test", "--data", "CIFARDataModule", "--data.root", str(cifar_folder), "--data.num_workers", "0",
        "--model.backbone", "resnet20", "--ckpt_path", str(ckpt), *quiet(tmp_path),
    )  # fmt: skip
    assert "was trained for 100 classes" in err and "has 10 classes" in err


def test_console_script_exit_code_and_message():
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_ood", "fit", "--data", "CIFARDataModule", "--model.backbone", "vgg"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 2
    assert "error: Unknown backbone 'vgg'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_an_unknown_featurenorm_block_fails_before_any_work(capsys, tmp_path):
    """The block is checked when the model is built, not at the first test batch after the statistics pass."""
    err = cli_error(capsys, "test", "--data", "SyntheticDataModule", "--model.backbone", "densenet100",
                    "--model.scorers", '{"featurenorm": {"block": "layer3.0"}}', *quiet(tmp_path))  # fmt: skip
    assert "featurenorm block 'layer3.0' is not a block of DenseNetBC: one of dense1, dense2, dense3" in err
    assert not (tmp_path / "logs").exists()
