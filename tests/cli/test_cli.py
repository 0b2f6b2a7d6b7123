"""The command line (lightning_ood/cli.py): every shipped config parses, every overlay composes, the console script's
exit status and message, the help of every subcommand."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.helpers import run_cli

CONFIGS = sorted([*(REPO / "configs").glob("*.yaml"), *(REPO / "configs" / "paper").glob("*.yaml")])  # complete
OVERLAYS = sorted(p for folder in ("overlays", "ood", "scorers") for p in (REPO / "configs" / folder).glob("*.yaml"))


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


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_help_describes_every_subcommand_in_full(capsys):
    with pytest.raises(SystemExit):
        run_cli("--help")
    out = " ".join(capsys.readouterr().out.split())
    assert "test One pass over the ID test set and every OOD set, scoring every configured detector" in out
    assert "never run on your" not in out
