"""Checkpoints under faults: written atomically (a kill or a failed write keeps the previous one, and resuming
works), and a missing, truncated, corrupt, foreign or NaN checkpoint is one clear message, exit status 2, nothing
half-written."""

from __future__ import annotations

import json
import os
import shutil
import signal

import pytest
import torch

from lightning_ood.checkpoints import AtomicCheckpointIO, read_checkpoint
from tests.helpers import args, case_args, cli_error, nothing_left, one_line, quiet, run_cli
from tests.reliability.conftest import cli, nan_checkpoint, no_results, only_run_records


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


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "epoch": 1}, path)

    def dies_half_way(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "epoch": 2}, path)
    monkeypatch.undo()
    assert read_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_the_cli_trainer_writes_checkpoints_atomically(trained, tmp_path):
    data, _ = trained
    record = tmp_path / "io.txt"
    run_cli("fit", *args(tmp_path / "logs", data, "--trainer.max_epochs", "1", "--checkpoint.dirpath",
                         str(tmp_path / "ckpt"), "--trainer.callbacks+=tests.helpers.RecordCheckpointIO",
                         "--trainer.callbacks.path", str(record)))  # fmt: skip
    assert record.read_text() == "lightning_ood.checkpoints.AtomicCheckpointIO"


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_kill_while_last_ckpt_is_written_keeps_the_previous_one_and_resume_works(trained, tmp_path):
    data, _ = trained
    common = args(tmp_path / "logs", data, "--data.batch_size", "20", "--trainer.max_epochs", "3",
                  "--checkpoint.dirpath", str(tmp_path / "ckpt"))  # fmt: skip
    cli("fit", *common, "--trainer.callbacks+=tests.helpers.KillDuringCheckpointWrite", "--trainer.callbacks.epoch",
        "1", expect=-signal.SIGKILL)  # fmt: skip
    last = tmp_path / "ckpt" / "last.ckpt"
    assert read_checkpoint(last)["epoch"] == 0  # the end of epoch 0, intact
    (stale,) = (tmp_path / "ckpt").glob(".last.ckpt.*.tmp")  # the half-written file of the killed process
    assert stale.stat().st_size > 0
    cli("fit", *common, "--ckpt_path", "last")
    assert read_checkpoint(last)["global_step"] == 3 * 2  # three epochs of 40 images in batches of 20
    assert not list((tmp_path / "ckpt").glob("*.tmp"))  # the next write removed the dead process's file


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_resume_from_a_truncated_last_checkpoint_is_one_error(trained, tmp_path, capsys):
    data, ckpt = trained
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "last.ckpt").write_bytes(ckpt.read_bytes()[:100_000])
    err = cli_error(capsys, "fit", *args(tmp_path / "logs", data, "--checkpoint.dirpath", str(folder),
                                         "--ckpt_path", "last"))  # fmt: skip
    one_line(err)
    assert f"Checkpoint {folder / 'last.ckpt'} cannot be read" in err
    nothing_left(tmp_path / "logs")


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("command", ["tune", "sweep"])
def test_nan_weights_in_tune_and_sweep(trained, tmp_path, capsys, command):
    data, ckpt = trained
    poisoned = nan_checkpoint(ckpt, tmp_path / "nan.ckpt")
    extra = ["--val_size", "10"] if command == "tune" else []
    err = cli_error(capsys, command, *args(tmp_path / "logs", data, "--ckpt_path", str(poisoned), "--cache_dir",
                                           str(tmp_path / "cache"), *extra))  # fmt: skip
    one_line(err)
    assert "NaN or infinite" in err
    nothing_left(tmp_path / "logs")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_foreign_checkpoint_of_another_architecture(trained, tmp_path, capsys):
    data, ckpt = trained
    checkpoint = torch.load(ckpt, weights_only=True)
    del checkpoint["hyper_parameters"]
    foreign = tmp_path / "foreign.ckpt"
    torch.save(checkpoint, foreign)
    err = cli_error(capsys, "test", *args(tmp_path / "logs", data, "--ckpt_path", str(foreign),
                                          "--model.backbone", "densenet100"))  # fmt: skip
    one_line(err)
    assert "The checkpoint's weights do not fit the configured 'densenet100' backbone with 10 classes:" in err
    assert "missing keys" in err and "unexpected keys" in err
    only_run_records(tmp_path / "logs")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_test_refuses_random_weights_unless_asked(trained, tmp_path, capsys):
    data, _ = trained
    err = cli_error(capsys, "test", *args(tmp_path / "logs", data))
    one_line(err)
    assert "test evaluates a trained network: pass --ckpt_path <checkpoint> or --model.weights" in err
    nothing_left(tmp_path / "logs")
    run_cli("test", *args(tmp_path / "logs", data, "--model.weights", "random"))
    (result,) = (tmp_path / "logs").rglob("ood_results.json")
    assert json.loads(result.read_text())["provenance"]["weights"] == "random"


def test_missing_checkpoint(case, capsys):
    tmp, data, _, scratch = case
    err = cli_error(capsys, "test", *case_args(tmp, data, "--ckpt_path", str(scratch / "nope.ckpt")))
    assert f"error: Checkpoint {scratch / 'nope.ckpt'} does not exist." in err
    no_results(tmp)


@pytest.mark.parametrize("how", ["garbage", "truncated"])
def test_corrupt_checkpoint(case, capsys, how):
    tmp, data, ckpt, scratch = case
    bad = scratch / "bad.ckpt"
    bad.write_bytes(os.urandom(4096) if how == "garbage" else ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    err = cli_error(capsys, "test", *case_args(tmp, data, "--ckpt_path", str(bad)))
    assert f"error: Checkpoint {bad} cannot be read" in err and "truncated, corrupt or not a PyTorch checkpoint" in err
    no_results(tmp)


def test_not_a_lightning_checkpoint(case, capsys):
    tmp, data, _, scratch = case
    torch.save({"weights": torch.ones(3)}, scratch / "plain.pt")
    err = cli_error(capsys, "test", *case_args(tmp, data, "--ckpt_path", str(scratch / "plain.pt")))
    assert "is not a Lightning checkpoint (it has no 'state_dict')" in err
    no_results(tmp)


def test_checkpoint_of_another_backbone(case, capsys):
    tmp, data, ckpt, _ = case
    err = cli_error(capsys, "test", *case_args(tmp, data, "--ckpt_path", str(ckpt), "--model.backbone", "resnet18"))
    assert "The checkpoint holds a 'resnet20' backbone but model.backbone is 'resnet18'; set --model.backbone " \
           "resnet20." in err  # fmt: skip
    no_results(tmp)


def test_checkpoint_without_statistics_and_no_training_data(case, capsys):
    tmp, data, ckpt, scratch = case
    bare = scratch / "bare.ckpt"
    checkpoint = torch.load(ckpt, weights_only=True)
    del checkpoint["ood_statistics"]
    torch.save(checkpoint, bare)
    test_only = scratch / "test_only"
    shutil.copytree(data / "test", test_only / "test")
    err = cli_error(capsys, "test", *case_args(tmp, test_only, "--ckpt_path", str(bare)))
    assert "The OOD statistics are not in this checkpoint and computing them needs the training images, which are " \
           f"not available: CIFAR-10: missing folder {test_only / 'train'}" in err  # fmt: skip
    no_results(tmp)


def poisoned_checkpoint(ckpt, path, trust_statistics: bool):
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["state_dict"]["backbone.conv1.weight"][0, 0, 0, 0] = float("nan")
    if trust_statistics:  # statistics of unknown weights are used as they are
        checkpoint["ood_statistics"]["weights"] = ""
    torch.save(checkpoint, path)
    return path


def test_nan_features_are_reported_not_scored(case, capsys):
    tmp, data, ckpt, scratch = case
    poisoned = poisoned_checkpoint(ckpt, scratch / "nan.ckpt", trust_statistics=True)
    err = cli_error(capsys, "test", *case_args(tmp, data, "--ckpt_path", str(poisoned)))
    assert "NaN or infinite penultimate features for 40 of 'cifar10', 10 of 'gaussian_noise' images" in err
    assert "No results were written." in err
    no_results(tmp)


def test_nan_features_stop_the_statistics(case, capsys, caplog):
    tmp, data, ckpt, scratch = case
    poisoned = poisoned_checkpoint(ckpt, scratch / "nan.ckpt", trust_statistics=False)
    with caplog.at_level("INFO"):
        err = cli_error(capsys, "test", *case_args(tmp, data, "--ckpt_path", str(poisoned)))
    assert any("OOD statistics were fitted on other weights" in r.getMessage() for r in caplog.records)
    assert "NaN or infinite penultimate features on training images [0, 1, 2, 3, 4]" in err
    no_results(tmp)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_resume_from_last_without_a_last_checkpoint_is_an_error(trained, tmp_path, capsys):
    data, _ = trained
    err = cli_error(capsys, "fit", *args(tmp_path / "logs", data, "--checkpoint.dirpath", str(tmp_path / "ckpt"),
                                         "--ckpt_path", "last"))  # fmt: skip
    one_line(err)
    assert f"--ckpt_path last: there is no last.ckpt in {tmp_path / 'ckpt'}, so there is nothing to resume" in err
    nothing_left(tmp_path / "logs")
    assert not (tmp_path / "ckpt").exists()
