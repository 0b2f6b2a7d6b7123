"""Run folders: a second or concurrent run never overwrites an earlier one's results, checkpoints or logs; a failed
run keeps what it wrote but no results or lock; read-only folders and full disks are one line, before any work."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_ood.checkpoints import read_checkpoint
from tests.helpers import args, cli_error, nothing_left, one_line, run_cli
from tests.reliability.conftest import nan_checkpoint, only_run_records

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_read_only_logs_or_checkpoint_folder_fails_before_any_work(trained, tmp_path, capsys, unwritable):
    data, ckpt = trained
    (tmp_path / "logs").mkdir()
    unwritable.append(tmp_path / "logs")
    err = cli_error(capsys, "test", *args(tmp_path / "logs", data, "--ckpt_path", str(ckpt)))
    one_line(err)
    assert (
        f"logs: cannot write into {tmp_path / 'logs' / 'lightning_ood' / 'version_0'}: {tmp_path / 'logs'} is not"
        in err
    )
    (tmp_path / "ro_ckpt").mkdir()
    unwritable[:] = [tmp_path / "ro_ckpt"]
    err = cli_error(capsys, "fit", *args(tmp_path / "fitlogs", data, "--checkpoint.dirpath", str(tmp_path / "ro_ckpt")))
    one_line(err)
    assert f"checkpoint.dirpath: cannot write into {tmp_path / 'ro_ckpt'}" in err
    nothing_left(tmp_path / "fitlogs")


def test_a_full_disk_for_results_logs_or_cache_is_one_line(trained, tmp_path, capsys, monkeypatch):
    data, ckpt = trained

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("lightning_ood.io.os.fsync", full)  # every atomic write: results, overlays, cache
    err = cli_error(capsys, "test", *args(tmp_path / "logs", data, "--ckpt_path", str(ckpt)))
    one_line(err)
    assert "Cannot write " in err and "ood_results.md: No space left on device" in err
    err = cli_error(capsys, "sweep", *args(tmp_path / "logs2", data, "--ckpt_path", str(ckpt),
                                           "--cache_dir", str(tmp_path / "cache")))  # fmt: skip
    one_line(err)
    assert f"Cannot write {tmp_path / 'cache'}" in err and "No space left on device" in err
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    monkeypatch.undo()
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    def full_flush(self):
        raise OSError(errno.ENOSPC, "No space left on device", "events.out.tfevents")

    monkeypatch.setattr(EventFileWriter, "flush", full_flush)
    err = cli_error(capsys, "test", *args(tmp_path / "logs3", data, "--ckpt_path", str(ckpt)))
    one_line(err)
    assert "Cannot write events.out.tfevents: No space left on device" in err


def test_results_are_readable_and_a_second_run_does_not_overwrite_them(trained, tmp_path, capsys):
    data, ckpt = trained
    common = args(tmp_path / "logs", data, "--ckpt_path", str(ckpt), "--trainer.logger.init_args.version", "v1")
    run_cli("test", *common)
    folder = tmp_path / "logs" / "lightning_ood" / "v1"
    for name in ("ood_results.md", "ood_results.csv", "ood_results.json"):
        assert oct((folder / name).stat().st_mode & 0o777) == "0o644"
    before = (folder / "ood_results.json").read_text()
    err = cli_error(capsys, "test", *common, "--model.scorers", "[msp]")
    one_line(err)
    assert f"{folder} already holds the results of an earlier run" in err and "--overwrite_results true" in err
    assert (folder / "ood_results.json").read_text() == before
    run_cli("test", *common, "--model.scorers", "[msp]", "--overwrite_results", "true")
    assert list(json.loads((folder / "ood_results.json").read_text())["metrics"]) == ["msp"]
    assert not (folder / ".lightning-ood.lock").exists()


def fit_args(tmp: Path, data: Path, *extra: str) -> list[str]:
    return ["--data", "CIFARDataModule", "--data.root", str(data), "--data.num_workers", "0", "--data.batch_size",
            "20", "--model.backbone", "resnet20", "--model.scorers", "[msp]", "--trainer.max_epochs", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(tmp / "logs"),
            "--checkpoint.dirpath", str(tmp / "ckpt"), *extra]  # fmt: skip


def test_a_second_fit_never_replaces_the_first_runs_checkpoints(trained, tmp_path, capsys):
    """Two fits into one checkpoint folder: the second is refused with the ways out, and the first run's last.ckpt (with
    its statistics) is untouched; asked to replace them, it replaces them (its statistics in last.ckpt, no
    last-v1.ckpt without any)."""
    data, _ = trained
    run_cli("fit", *fit_args(tmp_path, data))
    last = tmp_path / "ckpt" / "last.ckpt"
    before = last.read_bytes()
    err = cli_error(capsys, "fit", *fit_args(tmp_path, data, "--seed_everything", "1"))
    one_line(err)
    assert f"{tmp_path / 'ckpt'} already holds the checkpoints of another run (epoch000.ckpt, last.ckpt)" in err
    assert "--ckpt_path last" in err and "--checkpoint.dirpath" in err and "--overwrite_results true" in err
    assert last.read_bytes() == before
    run_cli("fit", *fit_args(tmp_path, data, "--seed_everything", "1", "--overwrite_results", "true"))
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["epoch000.ckpt", "last.ckpt"]
    replaced = read_checkpoint(last)
    assert replaced["ood_statistics"] is not None and last.read_bytes() != before


def test_a_second_run_never_writes_into_an_earlier_runs_log_folder(trained, tmp_path, capsys):
    """A fit into an existing logger version is refused (its config.yaml and hparams.yaml untouched); a fit that
    resumes that run writes into it, its config beside the first one as config-2.yaml, and says so."""
    data, _ = trained
    version = ["--trainer.logger.init_args.version", "mine"]
    run_cli("fit", *fit_args(tmp_path, data, *version))
    folder = tmp_path / "logs" / "lightning_ood" / "mine"
    config = (folder / "config.yaml").read_bytes()
    err = cli_error(capsys, "fit", *fit_args(tmp_path, data, *version, "--checkpoint.dirpath", str(tmp_path / "c2")))
    one_line(err)
    assert f"{folder} already holds the logs of an earlier run (config.yaml" in err
    assert "--trainer.logger.init_args.version" in err and "--overwrite_results true" in err
    assert (folder / "config.yaml").read_bytes() == config and not (tmp_path / "c2").exists()
    run_cli("fit", *fit_args(tmp_path, data, *version, "--trainer.max_epochs", "2", "--ckpt_path", "last"))
    assert (folder / "config.yaml").read_bytes() == config
    assert "ckpt_path: last" in (folder / "config-2.yaml").read_text()


def test_a_concurrent_run_into_the_same_folder_is_refused(trained, tmp_path, capsys):
    data, ckpt = trained
    folder = tmp_path / "logs" / "lightning_ood" / "shared"
    folder.mkdir(parents=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (folder / ".lightning-ood.lock").write_text(str(other.pid))
        common = args(tmp_path / "logs", data, "--ckpt_path", str(ckpt), "--trainer.logger.init_args.version", "shared")
        err = cli_error(capsys, "test", *common)
        one_line(err)
        assert f"Another run (process {other.pid}) is writing into {folder}" in err
    finally:
        other.kill()
        other.wait()
    run_cli("test", *common)  # the lock of a process that no longer runs is taken over
    assert (folder / "ood_results.json").exists() and not (folder / ".lightning-ood.lock").exists()


def test_a_failed_run_keeps_what_it_wrote_but_no_results_or_lock(trained, tmp_path, capsys):
    data, ckpt = trained
    poisoned = nan_checkpoint(ckpt, tmp_path / "nan.ckpt")
    err = cli_error(capsys, "test", *args(tmp_path / "logs", data, "--ckpt_path", str(poisoned)))
    assert "NaN or infinite penultimate features" in err
    only_run_records(tmp_path / "logs")
    assert [p.name for p in (tmp_path / "logs").rglob("config.yaml")] == ["config.yaml"]  # kept, not deleted


def test_a_failed_download_leaves_no_folders_behind(tmp_path, capsys, monkeypatch):
    """Offline, ``fit`` on a data root that does not exist: one line, and neither the data root torchvision created
    for the download nor the logs/<name> and checkpoint folders are left."""
    from torchvision.datasets import CIFAR10

    def offline(self):
        os.makedirs(self.root, exist_ok=True)  # as torchvision's download does before fetching
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(CIFAR10, "download", offline)
    root = tmp_path / "new" / "data" / "cifar10"
    extra = ["--data.download", "true", "--checkpoint.dirpath", str(tmp_path / "ckpt"), "--trainer.max_epochs", "1"]
    err = cli_error(capsys, "fit", *args(tmp_path / "logs" / "deep", root, *extra))
    one_line(err)
    assert "downloading it failed" in err
    assert sorted(tmp_path.iterdir()) == [], sorted(tmp_path.rglob("*"))
