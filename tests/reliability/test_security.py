"""Security through the real CLI (issue 18): files that would run code when unpickled are refused before any of it
runs (the malicious files carry a real ``__reduce__`` payload that would create a marker file; every test asserts
that the marker does not exist afterwards); YAML bombs end fast with a short message; no unsafe-load message."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lightning_ood.checkpoints import AtomicCheckpointIO
from lightning_ood.errors import CheckpointError
from lightning_ood.features import FeatureCache
from tests.conftest import REPO, make_cifar_folder
from tests.helpers import args, cli_error, nothing_left, one_line


def test_fit_prints_no_weights_only_message(tmp_path):
    """Lightning's "`weights_only` was not set, defaulting to `False`" after a fit reads like an unsafe load (it came
    from the statistics callback's save); a fit's whole output, as a user sees it, has none."""
    data = make_cifar_folder(tmp_path / "data", train=2, test=1)
    command = [sys.executable, "-m", "lightning_ood", "fit", "--data", "CIFARDataModule", "--data.root", str(data),
               "--data.num_workers", "0", "--data.batch_size", "20", "--model.backbone", "resnet20",
               "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
               "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"), "--checkpoint.dirpath",
               str(tmp_path / "ckpt")]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "with the OOD statistics" in output  # the save that the message came with
    assert "weights_only" not in output


BILLION_LAUGHS = "\n".join(
    [f"a: &a [{', '.join(['lol'] * 9)}]"]
    + [f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]" for a, b in zip("abcdefgh", "bcdefghi", strict=True)]
)


@pytest.mark.parametrize("how", ["-c", "--config=", "value"])
def test_a_billion_laughs_config_ends_fast_with_a_short_message(case, capsys, how):
    tmp, _, _, scratch = case
    bomb = scratch / "bomb.yaml"
    bomb.write_text(BILLION_LAUGHS + "\ntrainer:\n  max_epochs: *i\n")  # 9^9 = 387,420,489 "lol"s: gigabytes
    assert bomb.stat().st_size < 1000
    where = {"-c": ["-c", str(bomb)], "--config=": [f"--config={bomb}"],
             "value": ["--trainer.max_epochs", "{" + BILLION_LAUGHS.replace("\n", ", ") + "}"]}[how]  # fmt: skip
    start = time.perf_counter()
    err = cli_error(capsys, "fit", *where, "--trainer.logger.init_args.save_dir", str(tmp / "logs"))
    assert time.perf_counter() - start < 10
    assert len(err) < 600
    expands = r"expands to [\d,]{11,} values \([\d,]{13,} characters\) once its aliases \(\*name\) are expanded"
    assert re.search(expands + "; more than 100,000 values or 4,000,000 characters is refused", err), err
    if how != "value":
        assert f"error: {bomb}: The YAML expands to" in err


def test_an_alias_inside_its_own_anchor_is_refused(case, capsys):
    tmp, _, _, scratch = case
    loop = scratch / "loop.yaml"
    loop.write_text("model:\n  milestones: &m [1, *m]\n")
    err = cli_error(capsys, "fit", "-c", str(loop), "--trainer.logger.init_args.save_dir", str(tmp / "logs"))
    assert f"error: {loop}: The YAML holds an alias inside its own anchor (&name ... *name), an endless value." in err


class Payload:
    """Unpickling this runs ``touch <marker>``: what an attacker's checkpoint would do with ``os.system``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def evil_weights(path: Path, marker: Path, state: dict, legacy: bool = False) -> Path:
    """``legacy``: torch's pre-1.6 format (not a zip), which older published ``.pth.tar`` files use."""
    payload = {"state_dict": state, "epoch": 300, "note": Payload(marker)}
    torch.save(payload, path, _use_new_zipfile_serialization=not legacy)
    return path


def evil_checkpoint(ckpt: Path, path: Path, marker: Path) -> Path:
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["hyper_parameters"]["note"] = Payload(marker)
    torch.save(checkpoint, path)
    return path


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_the_payload_really_runs_when_unpickled_unsafely(tmp_path):
    """The fixture's payload is real: ``weights_only=False`` runs it (so the tests below can fail)."""
    marker = tmp_path / "PWNED"
    path = evil_weights(tmp_path / "evil.pth.tar", marker, {"w": torch.zeros(1)})
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()
    torch.load(
        evil_weights(tmp_path / "legacy.pth.tar", marker, {"w": torch.zeros(1)}, legacy=True), weights_only=False
    )
    assert marker.exists()


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_weights_with_a_code_payload_are_refused_and_nothing_runs(trained, tmp_path, capsys, legacy):
    data, ckpt = trained
    state = {k.removeprefix("backbone."): v for k, v in torch.load(ckpt, weights_only=True)["state_dict"].items()}
    marker = tmp_path / "PWNED"
    evil = evil_weights(tmp_path / "evil.pth.tar", marker, state, legacy)
    err = cli_error(capsys, "test", *args(tmp_path / "logs", data, "--model.weights", str(evil)))
    one_line(err)
    assert f"Weights file {evil} was not loaded: its pickle calls posix.system" in err
    assert not marker.exists()
    nothing_left(tmp_path / "logs")


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("command", ["test", "fit", "tune"])
def test_a_lightning_checkpoint_with_a_code_payload_is_refused(trained, tmp_path, capsys, command):
    data, ckpt = trained
    marker = tmp_path / "PWNED"
    evil = evil_checkpoint(ckpt, tmp_path / "evil.ckpt", marker)
    extra = ["--checkpoint.dirpath", str(tmp_path / "ckpt")] if command == "fit" else []
    err = cli_error(capsys, command, *args(tmp_path / "logs", data, "--ckpt_path", str(evil), *extra))
    one_line(err)
    assert f"Checkpoint {evil} was not loaded: its pickle calls posix.system" in err
    assert not marker.exists()
    nothing_left(tmp_path / "logs")
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_lightning_restore_in_the_cli_trainer_never_unpickles_code(trained, tmp_path):
    """The CheckpointIO of the Trainer the CLI builds (which Lightning's own ``--ckpt_path`` restore and SLURM's
    ``hpc`` checkpoints go through) loads with ``weights_only=True`` even when asked for ``False``."""
    _, ckpt = trained
    marker = tmp_path / "PWNED"
    evil = evil_checkpoint(ckpt, tmp_path / "evil.ckpt", marker)
    io = AtomicCheckpointIO()
    with pytest.raises(CheckpointError, match=r"posix\.system"):
        io.load_checkpoint(evil, weights_only=False)
    assert not marker.exists()
    assert io.load_checkpoint(ckpt, weights_only=False)["global_step"] > 0  # our own checkpoints load


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_weights_only_false_is_not_offered(trained, tmp_path, capsys):
    data, ckpt = trained
    err = cli_error(capsys, "test", *args(tmp_path / "logs", data, "--ckpt_path", str(ckpt), "--weights_only", "false"))
    one_line(err)
    assert "--weights_only false would let the checkpoint's pickle run arbitrary code" in err
    nothing_left(tmp_path / "logs")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_cache_entry_with_a_code_payload_is_recomputed_not_run(tmp_path):
    """A feature / decoded-image cache entry whose checksum matches but whose pickle calls code (a planted file):
    not executed, recomputed."""
    cache = FeatureCache(tmp_path / "cache")
    marker = tmp_path / "PWNED"
    stored, hit = cache.get_or_compute("feats", "k1", lambda: {"x": torch.ones(2)})
    assert not hit
    (entry,) = (tmp_path / "cache").glob("feats-*.pt")
    torch.save({"x": torch.ones(2), "note": Payload(marker)}, entry)
    meta = entry.with_suffix(".json")
    import hashlib
    import json

    summary = json.loads(meta.read_text())
    summary["sha256"] = hashlib.sha256(entry.read_bytes()).hexdigest()
    meta.write_text(json.dumps(summary))
    stored, hit = cache.get_or_compute("feats", "k1", lambda: {"x": torch.full((2,), 3.0)})
    assert not hit and stored["x"].tolist() == [3.0, 3.0]
    assert not marker.exists()
