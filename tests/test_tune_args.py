"""`lightning-ood tune` and `sweep` arguments through the real CLI on the offline demo (issue 18): a repeated grid value
is evaluated once, with one console line saying so, and the written CSV has no repeated rows; tune's default number of
held-out ID validation images fits a small dataset (the demo's 758 training images)."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.test_cli import cli_error, run_cli

pytest.importorskip("sklearn")
pytest.importorskip("skimage")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

DEMO = str(REPO / "configs" / "demo.yaml")
DEMO_TRAIN = 758  # scikit-learn's digits 0-5 less the demo's stratified 30% test split
FEW_OOD = ["--data.init_args.demo_ood", "[faces]", "--data.init_args.ood", '[{"name": "gaussian_noise", "size": 40}]']


@pytest.fixture(autouse=True)
def info_logs(caplog):
    caplog.set_level(logging.INFO)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A 1-epoch ResNet-20 on the demo data (generated offline) and a feature cache the tests share."""
    tmp = tmp_path_factory.mktemp("tune_args")
    run_cli("fit", "-c", DEMO, "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.logger.init_args.save_dir", str(tmp / "fitlogs"),
            "--checkpoint.dirpath", str(tmp / "ckpt"))  # fmt: skip
    return tmp, tmp / "ckpt" / "last.ckpt"


def command(demo, name: str, logs: Path, version: str, *extra: str) -> Path:
    """Run ``lightning-ood <name> -c configs/demo.yaml`` on the demo checkpoint; returns its run folder."""
    tmp, ckpt = demo
    run_cli(name, "-c", DEMO, "--ckpt_path", str(ckpt), "--cache_dir", str(tmp / "cache"),
            "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(logs),
            "--trainer.logger.init_args.version", version, *extra)  # fmt: skip
    return logs / "demo" / version


def messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records]


def rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


# ============================================================================================ held-out images
def test_tune_on_the_demo_config_works_out_of_the_box(demo, tmp_path, caplog):
    folder = command(demo, "tune", tmp_path / "logs", "default")
    held_out = DEMO_TRAIN // 5
    said = messages(caplog)
    assert any(
        m.startswith(f"ID validation: {held_out} training images held out (seed 0; the default --val_size: a fifth "
                     f"of the {DEMO_TRAIN} training images)")
        for m in said
    ), said  # fmt: skip
    assert any(f"Fitted OOD statistics on {DEMO_TRAIN - held_out} training images" in m for m in said), said
    assert any(m.startswith("Selected percentile = ") for m in said)
    assert len(rows(folder / "tune_grid.csv")) == 9 * 8  # the paper's grid
    assert (folder / "selected.yaml").is_file()


def test_tune_refuses_an_explicit_val_size_that_leaves_no_training_image(demo, tmp_path, capsys):
    _, ckpt = demo
    err = cli_error(capsys, "tune", "-c", DEMO, "--ckpt_path", str(ckpt), "--val_size", str(DEMO_TRAIN),
                    "--cache_dir", str(tmp_path / "cache"),
                    "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"))  # fmt: skip
    assert f"Cannot hold out {DEMO_TRAIN} of the {DEMO_TRAIN} training images" in err
    assert f"leave it unset ({DEMO_TRAIN // 5} here)" in err
    assert not (tmp_path / "logs").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    ("command", "extra", "message"),
    [
        (
            "tune",
            ["--grid", '{"clip_percentile": [90, 97.55]}'],
            "--grid: clip_percentile: 97.55 is not a multiple of 0.1",
        ),
        (
            "sweep",
            ["--values", '{"clip_percentile": [0.05]}'],
            "--values: clip_percentile: 0.05 is not a multiple of 0.1",
        ),
    ],
)
def test_activation_percentiles_off_the_stored_grid_are_one_line(demo, tmp_path, capsys, command, extra, message):
    _, ckpt = demo
    err = cli_error(capsys, command, "-c", DEMO, "--ckpt_path", str(ckpt), *extra, "--cache_dir",
                    str(tmp_path / "cache"), "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"))  # fmt: skip
    assert err.startswith("error: ") and message in err
    assert not (tmp_path / "logs").exists() and not (tmp_path / "cache").exists()


# ============================================================================================ repeated values
def test_tune_evaluates_a_repeated_grid_value_once(demo, tmp_path, caplog):
    folder = command(demo, "tune", tmp_path / "logs", "repeats", "--val_size", "100", "--noise_size", "50",
                     "--grid", '{"percentile": [90, 90.0, 95], "clip_percentile": [80, 90, 80]}')  # fmt: skip
    said = messages(caplog)
    assert "--grid: percentile: dropped repeated value 90 (grid of 6, not 9)." in said
    assert "--grid: clip_percentile: dropped repeated value 80 (grid of 4, not 6)." in said
    assert any("(grid of 4 in " in m for m in said if m.startswith("Selected"))
    grid = rows(folder / "tune_grid.csv")
    assert [(float(r["percentile"]), float(r["clip_percentile"])) for r in grid] == [
        (90.0, 80.0), (90.0, 90.0), (95.0, 80.0), (95.0, 90.0)
    ]  # fmt: skip


def test_tune_drops_clip_percentiles_that_give_the_same_lambda(demo, tmp_path, caplog):
    """Many activations are exactly 0 after a ReLU: the 0th and 1st percentiles are both lambda = 0."""
    folder = command(demo, "tune", tmp_path / "logs", "same_lambda", "--val_size", "100", "--noise_size", "50",
                     "--grid", '{"percentile": [60], "clip_percentile": [0, 1, 90]}')  # fmt: skip
    assert "--grid: clip_percentile: dropped 1 (clip 0, already given by 0); grid of 2, not 3." in messages(caplog)
    grid = rows(folder / "tune_grid.csv")
    assert [float(r["clip_percentile"]) for r in grid] == [0.0, 90.0]
    assert len({(r["percentile"], r["clip"]) for r in grid}) == len(grid)


def test_tune_grid_of_any_scorer_without_repeats(demo, tmp_path, caplog):
    folder = command(demo, "tune", tmp_path / "logs", "knn", "--val_size", "100", "--noise_size", "50",
                     "--scorer", "knn", "--grid", '{"k": [1, 5, 1.0, 5]}')  # fmt: skip
    assert "--grid: k: dropped repeated values 1, 5 (grid of 2, not 4)." in messages(caplog)
    assert [r["k"] for r in rows(folder / "tune_grid.csv")] == ["1", "5"]


def test_sweep_evaluates_a_repeated_value_once(demo, tmp_path, caplog):
    folder = command(demo, "sweep", tmp_path / "logs", "repeats", *FEW_OOD, "--values",
                     '{"clip_percentile": [50, 90, 50.0], "percentile": [90, 50, 90.0]}')  # fmt: skip
    said = messages(caplog)
    assert "--values: clip_percentile: dropped repeated value 50 (2 values, not 3)." in said
    assert "--values: percentile: dropped repeated value 90 (2 values, not 3)." in said
    assert any(m.startswith("Sweep of 2 clip_percentile, 2 percentile over 2 OOD sets") for m in said), said
    table = rows(folder / "sensitivity.csv")
    keys = [(r["sweep"], r["scorer"], r["value"], r["ood"]) for r in table]
    # fmls/line/react x lambdas, fmls x p with line and react as flat references; 2 sets + average
    assert len(keys) == len(set(keys)) == (2 * 3 + 2 * 3) * 3
    assert sorted({float(r["value"]) for r in table if r["sweep"] == "percentile"}) == [50.0, 90.0]


def test_sweep_absolute_lambdas_without_repeats(demo, tmp_path, caplog):
    folder = command(demo, "sweep", tmp_path / "logs", "lambdas", *FEW_OOD, "--values",
                     '{"clip": [1, 2.5, 1.0], "percentile": [50]}')  # fmt: skip
    assert "--values: clip: dropped repeated value 1 (2 values, not 3)." in messages(caplog)
    table = rows(folder / "sensitivity.csv")
    assert sorted({float(r["value"]) for r in table if r["sweep"] == "clip"}) == [1.0, 2.5]
    keys = [(r["sweep"], r["scorer"], r["value"], r["ood"]) for r in table]
    assert len(keys) == len(set(keys))
