"""The feature, decoded-image and statistics caches under faults: damaged or swapped entries are recomputed, killed
writes leave no temporary files for long, unwritable or full cache folders are refused before any work."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.helpers import args, case_args, cli_error, run_cli
from tests.reliability.conftest import no_results


@pytest.mark.filterwarnings("ignore::UserWarning")
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


@pytest.mark.filterwarnings("ignore::UserWarning")
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


def without_statistics(ckpt, path):
    checkpoint = torch.load(ckpt, weights_only=True)
    del checkpoint["ood_statistics"]
    torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize(
    ("command", "flag", "shown"),
    [
        ("test", "--model.statistics_cache", "--model.statistics_cache"),
        ("test", "--data.decoded_cache", "--data.init_args.decoded_cache"),
        ("tune", "--cache_dir", "tune --cache_dir"),
        ("sweep", "--cache_dir", "sweep --cache_dir"),
    ],
)
@pytest.mark.parametrize("below", [False, True], ids=["a file", "under a file"])
def test_a_cache_folder_that_is_a_file_is_one_line(case, capsys, command, flag, shown, below):
    tmp, data, ckpt, scratch = case
    afile = scratch / "afile"
    afile.write_text("someone's file")
    bare = without_statistics(ckpt, scratch / "bare.ckpt")  # test computes statistics: the statistics cache is used
    folder = afile / "cache" if below else afile
    err = cli_error(capsys, command, *case_args(tmp, data, "--ckpt_path", str(bare), flag, str(folder)))
    assert f"error: {shown}: cannot write into {folder}: {afile} is a file, not a folder. Choose another folder " \
           f"({shown})." in err  # fmt: skip
    assert afile.read_text() == "someone's file"
    no_results(tmp)


@pytest.fixture
def unwritable(monkeypatch):
    """As root every folder is writable: the writability check sees ``folders["permissions"]`` as not writable,
    ``folders["read-only"]`` on a read-only file system and ``folders["full"]`` on a full disk."""
    from pathlib import Path

    folders = {"permissions": [], "read-only": [], "full": []}
    real_access, real_free = os.access, io_module().free_bytes

    def access(path, mode, *a, **k):
        return not (mode & os.W_OK and Path(path) in folders["permissions"]) and real_access(path, mode, *a, **k)

    monkeypatch.setattr("lightning_ood.io.os.access", access)
    monkeypatch.setattr("lightning_ood.io.read_only_file_system", lambda path: Path(path) in folders["read-only"])
    monkeypatch.setattr("lightning_ood.io.free_bytes", lambda path: 0 if Path(path) in folders["full"] else
                        real_free(path))  # fmt: skip
    return folders


def io_module():
    import lightning_ood.io

    return lightning_ood.io


@pytest.mark.parametrize(
    ("cause", "reason"),
    [
        ("permissions", "is not writable (no write permission). Choose another folder, or fix its permissions"),
        ("read-only", "is on a read-only file system. Choose a folder on a writable disk"),
        ("full", "is full (0 bytes free). Free some space, or choose another disk"),
    ],
)
def test_an_unwritable_cache_folder_is_refused_before_any_work_with_its_cause(case, capsys, unwritable, cause, reason):
    tmp, data, ckpt, scratch = case
    folder = scratch / "caches"
    folder.mkdir()
    unwritable[cause].append(folder)
    bare = without_statistics(ckpt, scratch / "bare.ckpt")
    cases = [
        ("test", ["--ckpt_path", str(bare), "--model.statistics_cache", str(folder / "stats")],
         "--model.statistics_cache"),
        ("test", ["--ckpt_path", str(ckpt), "--data.decoded_cache", str(folder)], "--data.init_args.decoded_cache"),
        ("tune", ["--ckpt_path", str(ckpt), "--cache_dir", str(folder / "features")], "tune --cache_dir"),
        ("sweep", ["--ckpt_path", str(ckpt), "--cache_dir", str(folder / "features")], "sweep --cache_dir"),
    ]  # fmt: skip
    for command, extra, shown in cases:
        with pytest.raises(SystemExit) as exit_info:
            from tests.helpers import run_cli as run

            run(command, *case_args(tmp, data, *extra))
        captured = capsys.readouterr()
        err = " ".join(captured.err.split())
        assert exit_info.value.code == 2 and "Traceback" not in err
        where = folder if cause != "full" else f"the disk holding {folder}"
        assert f"error: {shown}: cannot write into" in err and f"{where} {reason} ({shown})." in err
        assert "Free some space" not in err or cause == "full"
        # before any work: no image decoded, no statistics computed, no feature extracted
        assert "computing them" not in captured.out + captured.err and "Decoding" not in captured.out + captured.err
        assert list(folder.iterdir()) == []
        no_results(tmp)


def test_a_read_only_disk_at_write_time_is_not_called_full(case, capsys, monkeypatch):
    import errno

    tmp, data, ckpt, _ = case

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("lightning_ood.io.os.fsync", read_only)
    err = cli_error(capsys, "test", *case_args(tmp, data, "--ckpt_path", str(ckpt)))
    assert "ood_results.md: Read-only file system. Choose a folder on a writable disk." in err
    assert "Free some space" not in err


def test_a_cache_entry_under_the_checksum_file_of_another_is_recomputed(case):
    tmp, data, ckpt, scratch = case
    cache = scratch / "cache"
    sweep = case_args(tmp, data, "--ckpt_path", str(ckpt), "--cache_dir", str(cache), "--values",
                      '{"clip_percentile": [50, 90], "percentile": [0, 60]}')  # fmt: skip
    run_cli("sweep", *sweep, "--trainer.logger.init_args.version", "clean")
    (id_entry,) = cache.glob("cifar10-*.pt")
    (noise_entry,) = cache.glob("gaussian_noise-*.pt")
    for suffix in (".pt", ".json"):  # a consistent pair, of the noise images, under the ID test set's name
        shutil.copy(noise_entry.with_suffix(suffix), id_entry.with_suffix(suffix))
    with pytest.warns(UserWarning, match=f"Cache entry {id_entry}: its checksum file {id_entry.stem}.json belongs to "
                                         f"another entry \\(name 'gaussian_noise'"):  # fmt: skip
        run_cli("sweep", *sweep, "--trainer.logger.init_args.version", "swapped")
    clean, again = ((tmp / "logs" / "lightning_ood" / v / "sensitivity.csv").read_text() for v in ("clean", "swapped"))
    assert clean == again
    assert json.loads(id_entry.with_suffix(".json").read_text())["name"] == "cifar10"
