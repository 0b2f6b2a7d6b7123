"""`lightning-ood tune` and `sweep` through the CLI on generated data and on the offline demo: the selected overlay
that `test` picks up, sweeps on cached features, any scorer's grid, a repeated grid value evaluated once, tune's
default number of held-out ID validation images, the suggested test command."""

from __future__ import annotations

import csv
import json
import logging
import shlex
from pathlib import Path

import pytest
import torch
import yaml

from tests.cli.conftest import DATA
from tests.conftest import REPO
from tests.helpers import case_args as args
from tests.helpers import cli_error, run_cli

pytest.importorskip("sklearn")
pytest.importorskip("skimage")


@pytest.fixture
def info_logs(caplog):
    caplog.set_level(logging.INFO)


@pytest.mark.usefixtures("info_logs")
def test_tune_writes_an_overlay_that_test_picks_up(trained, caplog):
    tmp, common = trained
    overlay = tmp / "selected.yaml"
    run_cli("tune", *common, "--ckpt_path", str(tmp / "ckpt" / "last.ckpt"), "--val_size", "40", "--noise_size",
            "30", "--grid", '{"percentile": [30, 60], "clip_percentile": [80, 90]}', "--cache_dir", str(tmp / "cache"),
            "--output", str(overlay), "--trainer.logger.init_args.version", "tune",
            "--model.scorers", "[msp, fmls]")  # fmt: skip
    assert any("Selected percentile = " in r.getMessage() for r in caplog.records)
    chosen = yaml.safe_load(overlay.read_text())["model"]["scorers"]
    assert list(chosen) == ["msp", "fmls"]  # the configured scorers, with the choice applied to fmls
    assert chosen["fmls"]["scorer"] == "fmls" and chosen["fmls"]["percentile"] in (30.0, 60.0)
    grid = list(csv.DictReader((tmp / "logs" / "lightning_ood" / "tune" / "tune_grid.csv").open()))
    assert len(grid) == 4
    cached = sorted(p.name.split("-")[0] for p in (tmp / "cache").glob("*.pt"))
    assert cached == ["gaussian_noise_val", "ood_statistics", "synthetic_val"]  # features, and statistics without them
    statistics = torch.load(next((tmp / "cache").glob("ood_statistics-*.pt")), weights_only=True)
    assert int(statistics["counts"].sum()) == 64 - 40  # fitted on the training images that are not held out
    assert statistics["images"] == "synthetic training images, 40 held out (seed 0)"
    validation = torch.load(next((tmp / "cache").glob("synthetic_val-*.pt")), weights_only=True)
    assert len(validation["labels"]) == 40
    run_cli("test", *common, "-c", str(overlay), "--ckpt_path", str(tmp / "ckpt" / "last.ckpt"),
            "--trainer.logger.init_args.version", "tuned")  # fmt: skip
    rows = list(csv.DictReader((tmp / "logs" / "lightning_ood" / "tuned" / "ood_results.csv").open()))
    assert sorted({r["scorer"] for r in rows}) == ["fmls", "msp"]


@pytest.mark.usefixtures("info_logs")
def test_sweep_on_cached_features(trained, caplog):
    tmp, common = trained
    args = [*common, "--ckpt_path", str(tmp / "ckpt" / "last.ckpt"), "--cache_dir", str(tmp / "cache"),
            "--values", '{"clip_percentile": [50, 90, 99], "percentile": [0, 50, 90]}']  # fmt: skip
    run_cli("sweep", *args, "--trainer.logger.init_args.version", "sweep1")
    first = [r.getMessage() for r in caplog.records]
    assert any("features extracted" in m for m in first)
    caplog.clear()
    run_cli("sweep", *args, "--trainer.logger.init_args.version", "sweep2")
    second = [r.getMessage() for r in caplog.records]
    assert not any("features extracted" in m for m in second) and any("from the cache" in m for m in second)
    folder = tmp / "logs" / "lightning_ood" / "sweep2"
    rows = list(csv.DictReader((folder / "sensitivity.csv").open()))
    # (3 lambdas x fmls/line/react + 3 percentiles x fmls, with line and react as flat references) x (2 OOD sets +
    # their average)
    assert len(rows) == (3 * 3 + 3 * 3) * 3
    assert (folder / "sensitivity_clip.png").stat().st_size > 10_000
    assert (folder / "sensitivity_percentile.png").stat().st_size > 10_000


@pytest.mark.usefixtures("info_logs")
def test_tune_needs_a_checkpoint(capsys):
    err = cli_error(capsys, "tune", *DATA)
    assert "pass --ckpt_path" in err


@pytest.mark.usefixtures("info_logs")
def test_normratio_chooses_a_block_and_test_scores_it(trained, caplog):
    tmp, common = trained
    overlay = tmp / "featurenorm.yaml"
    run_cli("tune", *common, "--ckpt_path", str(tmp / "ckpt" / "last.ckpt"), "--scorer", "featurenorm",
            "--settings", '{"normratio_images": 32}',
            "--output", str(overlay), "--trainer.logger.init_args.version", "normratio",
            "--model.scorers", "[energy]")  # fmt: skip
    folder = tmp / "logs" / "lightning_ood" / "normratio"
    rows = list(csv.DictReader((folder / "normratio.csv").open()))
    assert [r["block"] for r in rows] == [f"layer{i}.{j}" for i in (1, 2, 3) for j in range(3)]  # ResNet-20 blocks
    chosen = next(r["block"] for r in rows if r["selected"] == "1")
    assert chosen == max(rows, key=lambda r: float(r["norm_ratio"]))["block"]
    assert (folder / "normratio.png").stat().st_size > 5_000
    scorers = yaml.safe_load(overlay.read_text())["model"]["scorers"]
    assert scorers == {"energy": {"scorer": "energy"}, "featurenorm": {"scorer": "featurenorm", "block": chosen}}
    run_cli("test", *common, "-c", str(overlay), "--ckpt_path", str(tmp / "ckpt" / "last.ckpt"),
            "--trainer.logger.init_args.version", "featurenorm")  # fmt: skip
    report = (tmp / "logs" / "lightning_ood" / "featurenorm" / "ood_results.csv").read_text()
    assert "featurenorm" in report and "energy" in report
    # left open, the block is chosen in the test pass itself (logged), by the same rule
    caplog.clear()
    run_cli("test", *common, "--ckpt_path", str(tmp / "ckpt" / "last.ckpt"), "--model.scorers", "[featurenorm]",
            "--trainer.logger.init_args.version", "featurenorm_auto")  # fmt: skip
    assert any("FeatureNorm block:" in r.getMessage() for r in caplog.records)


@pytest.mark.usefixtures("info_logs")
def test_tune_any_scorer_on_an_ood_validation_set(trained, caplog, tmp_path):
    """`tune --scorer knn` on a validation OOD set: the grid's metrics are those of the scorer on the cached
    validation features, the best is chosen, and the overlay sets k for test."""
    from PIL import Image

    from lightning_ood.metrics import ood_metrics
    from lightning_ood.scoring import build_scorer
    from lightning_ood.statistics import FeatureStatistics

    tmp, common = trained
    folder = tmp_path / "val_ood"
    folder.mkdir()
    for i in range(12):
        Image.new("RGB", (32, 32), (20 * i, 255 - 20 * i, 128)).save(folder / f"{i}.png")
    overlay = tmp_path / "knn.yaml"
    cache = tmp_path / "cache"
    run_cli("tune", *common, "--ckpt_path", str(tmp / "ckpt" / "last.ckpt"), "--scorer", "knn", "--grid",
            '{"k": [1, 5, 20]}', "--validation", json.dumps({"name": "folder", "root": str(folder)}),
            "--val_size", "30", "--cache_dir", str(cache), "--output", str(overlay),
            "--trainer.logger.init_args.version", "tune_knn", "--model.scorers", "[msp, knn]")  # fmt: skip
    rows = list(csv.DictReader((tmp / "logs" / "lightning_ood" / "tune_knn" / "tune_grid.csv").open()))
    assert [int(r["k"]) for r in rows] == [1, 5, 20]
    entries = {p.name.split("-")[0]: torch.load(p, weights_only=True) for p in cache.glob("*.pt")}
    assert set(entries) == {"synthetic_val", "folder_val", "ood_statistics_bank_bank50000"}
    stats = FeatureStatistics.from_state_dict(entries["ood_statistics_bank_bank50000"])
    assert stats.num_samples == 64 - 30 and stats.bank is not None
    checkpoint = torch.load(tmp / "ckpt" / "last.ckpt", weights_only=True)
    from torch import nn

    head = nn.Linear(64, 4)
    head.load_state_dict({"weight": checkpoint["state_dict"]["backbone.head.weight"],
                          "bias": checkpoint["state_dict"]["backbone.head.bias"]})  # fmt: skip
    for row in rows:  # independently: the scorer on the cached features
        knn = build_scorer("knn", k=int(row["k"])).fit_statistics(stats, head)
        scores = [knn.score(entries[n]["features"], entries[n]["logits"]) for n in ("synthetic_val", "folder_val")]
        m = ood_metrics(*scores)
        assert float(row["fpr95"]) == pytest.approx(m["fpr95"]) and float(row["auroc"]) == pytest.approx(m["auroc"])
    best = min(rows, key=lambda r: (float(r["fpr95"]), -float(r["auroc"])))
    chosen = yaml.safe_load(overlay.read_text())["model"]["scorers"]
    assert chosen["knn"] == {"scorer": "knn", "k": int(best["k"])} and chosen["msp"] == {"scorer": "msp"}


@pytest.mark.usefixtures("info_logs")
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--scorer", "ash_s_map"], "tune works on cached penultimate features, and 'ash_s_map' reads"),
        (["--scorer", "knn", "--grid", '{"q": [1]}'], "Scorer 'knn' has no hyperparameter 'q'"),
        (["--scorer", "knn", "--grid", '{"k": []}'], "--grid: k needs a non-empty list of values"),
        (["--scorer", "mahalanobis"], "Scorer 'mahalanobis' declares no search space"),
    ],
)
def test_tune_refuses_what_it_cannot_tune(trained, capsys, extra, message):
    tmp, common = trained
    err = cli_error(capsys, "tune", *common, "--ckpt_path", str(tmp / "ckpt" / "last.ckpt"), *extra)
    assert message in err


DEMO = str(REPO / "configs" / "demo.yaml")
DEMO_TRAIN = 758  # scikit-learn's digits 0-5 less the demo's stratified 30% test split
FEW_OOD = ["--data.init_args.demo_ood", "[faces]", "--data.init_args.ood", '[{"name": "gaussian_noise", "size": 40}]']


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


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.usefixtures("info_logs")
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


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.usefixtures("info_logs")
def test_tune_refuses_an_explicit_val_size_that_leaves_no_training_image(demo, tmp_path, capsys):
    _, ckpt = demo
    err = cli_error(capsys, "tune", "-c", DEMO, "--ckpt_path", str(ckpt), "--val_size", str(DEMO_TRAIN),
                    "--cache_dir", str(tmp_path / "cache"),
                    "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"))  # fmt: skip
    assert f"Cannot hold out {DEMO_TRAIN} of the {DEMO_TRAIN} training images" in err
    assert f"leave it unset ({DEMO_TRAIN // 5} here)" in err
    assert not (tmp_path / "logs").exists() and not (tmp_path / "cache").exists()


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.usefixtures("info_logs")
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


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.usefixtures("info_logs")
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


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.usefixtures("info_logs")
def test_tune_drops_clip_percentiles_that_give_the_same_lambda(demo, tmp_path, caplog):
    """Many activations are exactly 0 after a ReLU: the 0th and 1st percentiles are both lambda = 0."""
    folder = command(demo, "tune", tmp_path / "logs", "same_lambda", "--val_size", "100", "--noise_size", "50",
                     "--grid", '{"percentile": [60], "clip_percentile": [0, 1, 90]}')  # fmt: skip
    assert "--grid: clip_percentile: dropped 1 (clip 0, already given by 0); grid of 2, not 3." in messages(caplog)
    grid = rows(folder / "tune_grid.csv")
    assert [float(r["clip_percentile"]) for r in grid] == [0.0, 90.0]
    assert len({(r["percentile"], r["clip"]) for r in grid}) == len(grid)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.usefixtures("info_logs")
def test_tune_grid_of_any_scorer_without_repeats(demo, tmp_path, caplog):
    folder = command(demo, "tune", tmp_path / "logs", "knn", "--val_size", "100", "--noise_size", "50",
                     "--scorer", "knn", "--grid", '{"k": [1, 5, 1.0, 5]}')  # fmt: skip
    assert "--grid: k: dropped repeated values 1, 5 (grid of 2, not 4)." in messages(caplog)
    assert [r["k"] for r in rows(folder / "tune_grid.csv")] == ["1", "5"]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.usefixtures("info_logs")
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


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.usefixtures("info_logs")
def test_sweep_absolute_lambdas_without_repeats(demo, tmp_path, caplog):
    folder = command(demo, "sweep", tmp_path / "logs", "lambdas", *FEW_OOD, "--values",
                     '{"clip": [1, 2.5, 1.0], "percentile": [50]}')  # fmt: skip
    assert "--values: clip: dropped repeated value 1 (2 values, not 3)." in messages(caplog)
    table = rows(folder / "sensitivity.csv")
    assert sorted({float(r["value"]) for r in table if r["sweep"] == "clip"}) == [1.0, 2.5]
    keys = [(r["sweep"], r["scorer"], r["value"], r["ood"]) for r in table]
    assert len(keys) == len(set(keys))


def test_tune_suggests_a_test_command_that_runs_as_printed(case, caplog):
    tmp, data, ckpt, scratch = case
    with caplog.at_level("INFO"):
        run_cli("tune", *args(tmp, data, "--model.weights", str(ckpt), "--cache_dir", str(scratch / "cache"),
                              "--grid", '{"percentile": [60], "clip_percentile": [90]}'))  # fmt: skip
    (line,) = [r.getMessage() for r in caplog.records if "Test with: " in r.getMessage()]
    command = shlex.split(line.split("Test with: ")[1])
    assert command[:2] == ["lightning-ood", "test"] and "<config>" not in line
    run_cli(*command[1:])
    (results,) = (tmp / "logs").rglob("ood_results.json")
    report = json.loads(results.read_text())
    assert report["provenance"]["weights"] == str(ckpt) and list(report["metrics"]) == ["msp", "fmls"]
    assert report["provenance"]["scorers"]["fmls"]["percentile"] == 60  # the selected setting
