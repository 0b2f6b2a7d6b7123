"""Security and data safety through the real CLI (issue 18): files that would run code when unpickled are refused
before any of it runs, an interrupted ``fit`` keeps its logs and says so with a non-zero status, and the first-hour
cases of the adversarial run (a missing ``last.ckpt``, an empty scorer set, a key given twice, a mistyped flag).

The malicious files carry a real ``__reduce__`` payload that would create a marker file; every test asserts that the
marker does not exist afterwards."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from lightning_ood.checkpoints import AtomicCheckpointIO
from lightning_ood.errors import CheckpointError
from lightning_ood.features import FeatureCache
from tests import test_faults
from tests.test_cli import cli_error, run_cli
from tests.test_faults import args, nothing_left, one_line
from tests.test_resume import cli

trained = test_faults.trained  # the module-scoped fixture: generated CIFAR folder, 1-epoch ResNet-20 checkpoint

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


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


# ============================================================================================ untrusted files
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


def test_weights_only_false_is_not_offered(trained, tmp_path, capsys):
    data, ckpt = trained
    err = cli_error(capsys, "test", *args(tmp_path / "logs", data, "--ckpt_path", str(ckpt), "--weights_only", "false"))
    one_line(err)
    assert "--weights_only false would let the checkpoint's pickle run arbitrary code" in err
    nothing_left(tmp_path / "logs")


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


# ============================================================================================ interrupted runs
def event_steps(folder: Path, tag: str = "train/loss") -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return [e.step for e in events.Scalars(tag)] if tag in events.Tags()["scalars"] else []


@pytest.mark.parametrize(("name", "status"), [("SIGTERM", 143), ("SIGINT", 130)])
def test_an_interrupted_fit_keeps_its_logs_exits_non_zero_and_resumes(trained, tmp_path, name, status):
    data, _ = trained
    common = args(tmp_path / "logs", data, "--data.batch_size", "8", "--trainer.max_epochs", "3",
                  "--trainer.log_every_n_steps", "1", "--checkpoint.dirpath", str(tmp_path / "ckpt"))  # fmt: skip
    # 40 images in batches of 8: 5 steps per epoch; the signal arrives in the middle of epoch 1
    stopped = cli("fit", *common, "--trainer.callbacks+=tests.helpers.SignalAtStep", "--trainer.callbacks.step", "7",
                  "--trainer.callbacks.signal", name, expect=status)  # fmt: skip
    first = tmp_path / "logs" / "lightning_ood" / "version_0"
    steps = event_steps(first)
    assert steps and max(steps) >= 5, "the curves up to the interruption are kept"
    assert (first / "config.yaml").exists() and not (first / ".lightning-ood.lock").exists()
    assert f"interrupted: fit stopped by {'SIGTERM' if name == 'SIGTERM' else 'Ctrl-C (SIGINT)'}" in stopped.stderr
    assert f"Kept: the logs in {first}; {tmp_path / 'ckpt' / 'last.ckpt'} (end of epoch 0)" in " ".join(
        stopped.stderr.split()
    )
    assert "--ckpt_path last" in stopped.stderr
    cli("fit", *common, "--ckpt_path", "last")
    resumed = event_steps(tmp_path / "logs" / "lightning_ood" / "version_1")
    assert resumed and min(resumed) >= 5, "the resumed run logs into a new version, its steps continuing"
    assert set(event_steps(first)) == set(steps), "the interrupted run's events are untouched"


def test_a_sigterm_after_training_still_exits_non_zero(trained, tmp_path, capsys, monkeypatch):
    """A SIGTERM that arrives after the last loop check (during the statistics pass) is not reported as success."""
    from lightning_ood.callbacks.statistics import FitOODStatistics

    real = FitOODStatistics.on_train_end

    def terminated(self, trainer, pl_module):
        assert trainer._signal_connector._original_handlers, "Lightning's SIGTERM handler is in place"
        os.kill(os.getpid(), signal.SIGTERM)
        return real(self, trainer, pl_module)

    monkeypatch.setattr(FitOODStatistics, "on_train_end", terminated)
    data, _ = trained
    with pytest.raises(SystemExit) as exit_info:
        run_cli("fit", *args(tmp_path / "logs", data, "--trainer.max_epochs", "1", "--checkpoint.dirpath",
                             str(tmp_path / "ckpt")))  # fmt: skip
    assert exit_info.value.code == 143
    assert "interrupted: fit stopped by SIGTERM" in capsys.readouterr().err
    assert (tmp_path / "ckpt" / "last.ckpt").exists()


# ============================================================================================ first-hour cases
def test_resume_from_last_without_a_last_checkpoint_is_an_error(trained, tmp_path, capsys):
    data, _ = trained
    err = cli_error(capsys, "fit", *args(tmp_path / "logs", data, "--checkpoint.dirpath", str(tmp_path / "ckpt"),
                                         "--ckpt_path", "last"))  # fmt: skip
    one_line(err)
    assert f"--ckpt_path last: there is no last.ckpt in {tmp_path / 'ckpt'}, so there is nothing to resume" in err
    nothing_left(tmp_path / "logs")
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("scorers", ["{}", "[]"])
def test_an_empty_scorer_set_is_refused(trained, tmp_path, capsys, scorers):
    data, ckpt = trained
    err = cli_error(capsys, "test", *args(tmp_path / "logs", data, "--ckpt_path", str(ckpt), "--model.scorers",
                                          scorers))  # fmt: skip
    one_line(err)
    assert "The scorer set is empty" in err and "no OOD sets configured" not in err
    nothing_left(tmp_path / "logs")


def test_a_label_given_twice_in_a_mapping_is_refused(trained, tmp_path, capsys):
    data, ckpt = trained
    value = "{a: {scorer: msp}, a: {scorer: energy}}"
    err = cli_error(capsys, "test", *args(tmp_path / "logs", data, "--ckpt_path", str(ckpt), "--model.scorers", value))
    one_line(err)
    assert f"The key 'a' appears twice in one YAML mapping (in {value})" in err
    config = tmp_path / "scorers.yaml"
    config.write_text("model:\n  scorers:\n    a: {scorer: msp}\n    a: {scorer: energy}\n")
    err = cli_error(capsys, "test", *args(tmp_path / "logs", data, "--ckpt_path", str(ckpt), "-c", str(config)))
    one_line(err)
    assert f"{config}: The key 'a' appears twice in one YAML mapping (lines 3 and 4 of a config)" in err
    nothing_left(tmp_path / "logs")


def test_a_mistyped_flag_prints_the_error_first_and_briefly(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli("test", "-c", "configs/demo.yaml", "--model.scorerz", "[msp]")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: "), err[:300]
    assert "--model.scorerz" in err and "usage:" not in err
    assert len(err.splitlines()) <= 14
    assert "See `lightning-ood test --help` for the options." in err or "--help` for the options." in err


def test_help_describes_every_subcommand_in_full(capsys):
    with pytest.raises(SystemExit):
        run_cli("--help")
    out = " ".join(capsys.readouterr().out.split())
    assert "test One pass over the ID test set and every OOD set, scoring every configured detector" in out
    assert "never run on your" not in out
