"""An interrupted ``fit`` (SIGTERM, SIGINT) keeps its logs, says so with a non-zero status, and resumes."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.helpers import args, run_cli
from tests.reliability.conftest import cli

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


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
