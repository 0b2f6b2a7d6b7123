"""Reliability under real faults, through the real CLI (or the Trainer it builds): each case asserts the exit status,
the one-line message, and what is (not) left on disk. The list follows the reliability issue: data loss, tracebacks
where one line was promised, silent wrong results, and leftovers."""

from __future__ import annotations

import csv
import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_ood.checkpoints import read_checkpoint
from tests.conftest import make_cifar_folder
from tests.test_cli import cli_error, run_cli
from tests.test_resume import cli

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A generated CIFAR folder and a 1-epoch ResNet-20 checkpoint with statistics."""
    tmp = tmp_path_factory.mktemp("faults")
    data = make_cifar_folder(tmp / "data", train=4, test=3)
    run_cli("fit", "--data", "CIFARDataModule", "--data.root", str(data), "--data.num_workers", "0",
            "--data.batch_size", "20", "--model.backbone", "resnet20", "--trainer.max_epochs", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(tmp / "fitlogs"),
            "--checkpoint.dirpath", str(tmp / "ckpt"))  # fmt: skip
    return data, tmp / "ckpt" / "last.ckpt"


def args(logs: Path, data: Path, *extra: str) -> list[str]:
    return ["--data", "CIFARDataModule", "--data.root", str(data), "--data.num_workers", "0",
            "--model.backbone", "resnet20", "--model.scorers", "[msp, energy, fmls]",
            "--trainer.enable_progress_bar", "false", "--data.ood", '[{"name": "gaussian_noise", "size": 10}]',
            "--trainer.logger.init_args.save_dir", str(logs), *extra]  # fmt: skip


def one_line(err: str) -> None:
    assert err.startswith("error: ") and "Traceback" not in err


def nothing_left(logs: Path) -> None:
    """A run refused before it started leaves no log folder, no results and no temporary files behind."""
    assert not logs.exists() or not [p for p in logs.rglob("*") if p.is_file()], sorted(logs.rglob("*"))


RUN_RECORDS = ("config.yaml", "hparams.yaml", "events.out.tfevents.*")  # what a run writes from its first step


def only_run_records(logs: Path) -> None:
    """A run that failed after it started keeps what it wrote (its config and TensorBoard events: never deleted) but
    leaves no results, no lock, no temporary file and no empty folder."""
    files = [p for p in logs.rglob("*") if p.is_file()] if logs.exists() else []
    assert all(any(p.match(pattern) for pattern in RUN_RECORDS) for p in files), files
    assert all(any(p.iterdir()) for p in logs.rglob("*") if p.is_dir()), sorted(logs.rglob("*"))


# ============================================================================================ data loss
def test_the_cli_trainer_writes_checkpoints_atomically(trained, tmp_path):
    data, _ = trained
    record = tmp_path / "io.txt"
    run_cli("fit", *args(tmp_path / "logs", data, "--trainer.max_epochs", "1", "--checkpoint.dirpath",
                         str(tmp_path / "ckpt"), "--trainer.callbacks+=tests.helpers.RecordCheckpointIO",
                         "--trainer.callbacks.path", str(record)))  # fmt: skip
    assert record.read_text() == "lightning_ood.checkpoints.AtomicCheckpointIO"


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


# ============================================================================================ tracebacks
def broken(path: Path) -> Path:
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    return path


def copy_folder(data: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(data, target)
    return target


def test_a_corrupt_id_test_image_is_named_or_skipped(trained, tmp_path, capsys):
    data, ckpt = trained
    copy = copy_folder(data, tmp_path / "data")
    bad = broken(copy / "test" / "cat" / "0001.png")
    err = cli_error(capsys, "test", *args(tmp_path / "logs", copy, "--ckpt_path", str(ckpt)))
    one_line(err)
    assert f"Cannot decode image {bad}" in err and "bad_images: skip" in err
    only_run_records(tmp_path / "logs")
    run_cli("test", *args(tmp_path / "logs", copy, "--ckpt_path", str(ckpt), "--data.bad_images", "skip"))
    (result,) = (tmp_path / "logs").rglob("ood_results.json")
    report = json.loads(result.read_text())
    assert report["skipped_images"] == {"cifar10": 1} and report["num_images"]["cifar10"] == 29


def test_a_corrupt_training_image_is_named(trained, tmp_path, capsys):
    data, _ = trained
    copy = copy_folder(data, tmp_path / "data")
    bad = broken(copy / "train" / "dog" / "0002.png")
    err = cli_error(capsys, "fit", *args(tmp_path / "logs", copy, "--trainer.max_epochs", "1",
                                         "--checkpoint.dirpath", str(tmp_path / "ckpt")))  # fmt: skip
    one_line(err)
    assert f"Cannot decode image {bad}" in err
    only_run_records(tmp_path / "logs")
    assert not (tmp_path / "ckpt").exists()


def test_an_image_over_the_decompression_bomb_limit(trained, tmp_path, capsys, monkeypatch):
    data, ckpt = trained
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # a 100 x 100 image is then a "bomb" (over 2x the limit)
    folder = tmp_path / "ood"
    folder.mkdir()
    Image.new("RGB", (20, 20)).save(folder / "small.png")
    Image.new("RGB", (100, 100)).save(folder / "huge.png")
    ood = json.dumps([{"name": "folder", "root": str(folder)}])
    err = cli_error(capsys, "test", *args(tmp_path / "logs", data, "--ckpt_path", str(ckpt), "--data.ood", ood))
    one_line(err)
    assert f"Image {folder / 'huge.png'} is larger than Pillow's decompression-bomb limit" in err
    ood = json.dumps([{"name": "folder", "root": str(folder), "bad_images": "skip"}])
    run_cli("test", *args(tmp_path / "logs", data, "--ckpt_path", str(ckpt), "--data.ood", ood))
    (result,) = (tmp_path / "logs").rglob("ood_results.json")
    assert json.loads(result.read_text())["skipped_images"] == {"folder": 1}


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


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model.tpr", "1.5"], "tpr (of the FPR@TPR metric) must be in (0, 1], got 1.5"),
        (["--model.tpr", "0"], "tpr (of the FPR@TPR metric) must be in (0, 1], got 0"),
        (["--model.scorers", '{"fmls": {"percentile": "abc"}}'], "percentile must be a number, got 'abc'"),
        (["--model.scorers", '{"energy": {"temperature": -1}}'], "temperature must be > 0, got -1"),
        (["--model.scorers", '{"energy": {"temperature": 0}}'], "temperature must be > 0, got 0"),
    ],
)
def test_bad_values_are_refused_at_construction(trained, tmp_path, capsys, extra, message):
    data, ckpt = trained
    err = cli_error(capsys, "test", *args(tmp_path / "logs", data, "--ckpt_path", str(ckpt), *extra))
    one_line(err)
    assert message in err
    nothing_left(tmp_path / "logs")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--grid", '{"clip_percentile": [150]}'], "--grid: clip_percentile: 150 is outside [0, 100]."),
        (["--grid", '{"percentile": []}'], "--grid: percentile needs a non-empty list of values, got []."),
        (["--val_size", "0"], "tune --val_size must be >= 1, got 0."),
        (["--output", "DIR"], "is a folder; give the file to write"),
        (["--output", "RO/selected.yaml"], "--output: cannot write into"),
    ],
)
def test_tune_checks_its_arguments_before_the_work(trained, tmp_path, capsys, unwritable, extra, message):
    data, ckpt = trained
    (tmp_path / "DIR").mkdir()
    (tmp_path / "RO").mkdir()
    unwritable.append(tmp_path / "RO")
    extra = [e.replace("DIR", str(tmp_path / "DIR")).replace("RO/", str(tmp_path / "RO") + "/") for e in extra]
    err = cli_error(capsys, "tune", *args(tmp_path / "logs", data, "--ckpt_path", str(ckpt), "--cache_dir",
                                          str(tmp_path / "cache"), *extra))  # fmt: skip
    one_line(err)
    assert message in err
    assert not (tmp_path / "cache").exists()  # refused before any feature was extracted
    nothing_left(tmp_path / "logs")


def nan_checkpoint(ckpt: Path, path: Path) -> Path:
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["state_dict"]["backbone.conv1.weight"][0, 0, 0, 0] = float("nan")
    checkpoint["ood_statistics"]["weights"] = ""  # statistics of unknown weights are trusted: the features fail
    torch.save(checkpoint, path)
    return path


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


def test_validate_needs_held_out_images_and_predict_is_not_offered(trained, tmp_path, capsys, caplog):
    data, ckpt = trained
    err = cli_error(capsys, "validate", *args(tmp_path / "logs", data, "--ckpt_path", str(ckpt)))
    one_line(err)
    assert "validate measures the accuracy on held-out training images: set --data.init_args.val_split N" in err
    run_cli("validate", *args(tmp_path / "logs", data, "--ckpt_path", str(ckpt), "--data.val_split", "10"))
    with pytest.raises(SystemExit) as info:
        run_cli("predict", *args(tmp_path / "logs", data))
    assert info.value.code == 2 and "predict" in capsys.readouterr().err  # not a subcommand


# ============================================================================================ silent wrong results
def test_a_16_bit_png_keeps_its_brightness(tmp_path):
    from lightning_ood.data.images import decode_image

    gradient = np.tile(np.linspace(0, 65535, 64), (64, 1)).astype(np.uint16)
    Image.fromarray(gradient).save(tmp_path / "grey16.png")  # uint16: mode I;16
    opened = Image.open(tmp_path / "grey16.png")
    assert opened.mode in ("I;16", "I")  # Pillow's own convert("RGB") would clip this to 255
    rgb = np.asarray(decode_image(tmp_path / "grey16.png"), dtype=np.float64) / 255
    assert rgb.shape == (64, 64, 3) and abs(rgb.mean() - 0.5) < 0.01
    np.testing.assert_allclose(rgb[0, :, 0], np.round(np.linspace(0, 65535, 64) / 257) / 255, atol=1 / 255)
    Image.fromarray(np.ones((8, 8), np.float32)).save(tmp_path / "float.tiff")  # float32: mode F
    from lightning_ood.errors import DataError

    with pytest.raises(DataError, match="32-bit floating-point image"):
        decode_image(tmp_path / "float.tiff")


def test_test_refuses_random_weights_unless_asked(trained, tmp_path, capsys):
    data, _ = trained
    err = cli_error(capsys, "test", *args(tmp_path / "logs", data))
    one_line(err)
    assert "test evaluates a trained network: pass --ckpt_path <checkpoint> or --model.weights" in err
    nothing_left(tmp_path / "logs")
    run_cli("test", *args(tmp_path / "logs", data, "--model.weights", "random"))
    (result,) = (tmp_path / "logs").rglob("ood_results.json")
    assert json.loads(result.read_text())["provenance"]["weights"] == "random"


def test_a_damaged_cache_entry_is_recomputed(trained, tmp_path):
    data, ckpt = trained
    sweep = args(tmp_path / "logs", data, "--ckpt_path", str(ckpt), "--cache_dir", str(tmp_path / "cache"),
                 "--values", '{"clip_percentile": [50, 90], "percentile": [0, 60]}')  # fmt: skip
    run_cli("sweep", *sweep, "--trainer.logger.init_args.version", "clean")
    entry = next(p for p in (tmp_path / "cache").glob("cifar10-*.pt"))
    raw = bytearray(entry.read_bytes())
    for i in range(len(raw) - 200, len(raw) - 160):  # 40 flipped bytes in the tensor data
        raw[i] ^= 0xFF
    entry.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match=f"Cache entry {entry} does not match its checksum: recomputing it"):
        run_cli("sweep", *sweep, "--trainer.logger.init_args.version", "damaged")
    clean, again = (list(csv.DictReader((tmp_path / "logs" / "lightning_ood" / v / "sensitivity.csv").open()))
                    for v in ("clean", "damaged"))  # fmt: skip
    assert clean == again


# ============================================================================================ leftovers
def test_a_killed_cache_write_leaves_no_temporary_file_for_long(trained, tmp_path):
    from lightning_ood.features import FeatureCache

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder = tmp_path / "cache"
    folder.mkdir()
    stale = folder / f".x-abc.pt.{dead.pid}.k2j4.tmp"
    stale.write_bytes(b"half")
    mine = folder / f".y-abc.pt.{os.getpid()}.k2j4.tmp"  # a live writer's file stays
    mine.write_bytes(b"half")
    FeatureCache(folder).store("z", "abc", {"t": torch.zeros(2)})
    assert not stale.exists() and mine.exists()


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


def test_the_fpr_is_labelled_with_the_tpr_in_use(trained, tmp_path):
    data, ckpt = trained
    run_cli("test", *args(tmp_path / "logs", data, "--ckpt_path", str(ckpt), "--model.tpr", "1.0"))
    (folder,) = {p.parent for p in (tmp_path / "logs").rglob("ood_results.csv")}
    header = (folder / "ood_results.csv").read_text().splitlines()[0]
    assert ",fpr100,auroc," in header and "fpr95," not in header.replace("paper_fpr95", "").replace("diff_fpr95", "")
    assert "FPR100↓" in (folder / "ood_results.md").read_text()
    report = json.loads((folder / "ood_results.json").read_text())
    assert report["tpr"] == 1.0 and "fpr100" in report["average"]["fmls"]


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


def test_the_result_table_in_a_log_marks_the_best_without_colours(trained, tmp_path, capsys, monkeypatch):
    """Output to a file (no terminal, no colours): the CLI's table marks the best of each column with '*'."""
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    data, ckpt = trained
    run_cli("test", *args(tmp_path / "logs", data, "--ckpt_path", str(ckpt)))
    out = capsys.readouterr().out
    assert "*: the best" in out and "green" not in out
    assert any(line.split()[0] in ("msp", "energy", "fmls") and line.rstrip().endswith("*") for line in
               out.splitlines() if line.split())  # fmt: skip
