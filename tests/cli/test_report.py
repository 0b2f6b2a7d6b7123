"""`lightning-ood report` through the real CLI: runs aggregated into mean +- std tables, on written results and on
the results of real `lightning-ood test` runs (random weights on generated data: a few seconds): runs of one
setting are averaged whatever their seed, weights or date; a damaged ``ood_results.json`` and runs of different
settings are one ``error:`` line naming the file and the setting, exit 2."""

from __future__ import annotations

import csv
import json
import shutil
import statistics
from pathlib import Path

import pytest

from lightning_ood.report import OODReport
from tests.helpers import cli_error, run_cli

DATA = ["--data", "SyntheticDataModule", "--data.num_classes", "4", "--data.train_size", "32", "--data.test_size",
        "16", "--data.ood_sizes", '{"noise": 16}', "--data.batch_size", "16"]  # fmt: skip


def scorers(percentile: int) -> str:
    return json.dumps({"fmls": {"percentile": percentile}, "msp": {}})


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Three test runs of untrained ResNet-20s: ``seed1`` and ``seed2`` are one setting (other seeds, so other
    weights), ``p60`` scores FMLS with another percentile."""
    tmp = tmp_path_factory.mktemp("report_cli")
    folders = {}
    for name, seed, percentile in (("seed1", 1, 30), ("seed2", 2, 30), ("p60", 1, 60)):
        run_cli("test", *DATA, "--model.backbone", "resnet20", "--model.weights", "random", "--seed_everything",
                str(seed), "--model.scorers", scorers(percentile), "--trainer.enable_progress_bar", "false",
                "--trainer.logger.init_args.save_dir", str(tmp / "logs"), "--checkpoint.dirpath", str(tmp / "ckpt"),
                "--trainer.logger.init_args.version", name)  # fmt: skip
        folders[name] = tmp / "logs" / "lightning_ood" / name
    return folders


def copy_run(run: Path, folder: Path, edit=None) -> Path:
    """A copy of ``run``'s ``ood_results.json`` in ``folder``, its JSON changed in place by ``edit``."""
    folder.mkdir(parents=True)
    results = json.loads((run / "ood_results.json").read_text())
    if edit is not None:
        edit(results)
    (folder / "ood_results.json").write_text(json.dumps(results, indent=1))
    return folder


def report_error(capsys, *runs: Path, output: Path) -> str:
    """The one-line message of a refused ``report``; nothing is written."""
    err = cli_error(capsys, "report", *map(str, runs), "--output", str(output))
    assert err.startswith("error: ") and "Traceback" not in err
    assert not output.exists()
    return err


def test_runs_of_one_setting_are_averaged_whatever_their_seed_weights_and_date(runs, tmp_path, capsys):
    first = json.loads((runs["seed1"] / "ood_results.json").read_text())["provenance"]
    second = json.loads((runs["seed2"] / "ood_results.json").read_text())["provenance"]
    assert (first["seed"], second["seed"]) == ("1", "2") and first["fingerprint"] != second["fingerprint"]

    def elsewhere(results):  # the same setting, run from other weights, on another machine, with another version
        results["provenance"].update(weights="other.pt", checkpoint="/elsewhere/last.ckpt", commit="abc123",
                                     package="lightning-ood 9.9", date="2030-01-01T00:00:00+00:00",
                                     fingerprint="0123456789abcdef")  # fmt: skip
        results["provenance"]["input_normalization"] = "mean (0.5, 0.5, 0.5), std (0.5, 0.5, 0.5), the weights'"

    third = copy_run(runs["seed1"], tmp_path / "elsewhere", elsewhere)
    run_cli("report", str(runs["seed1"]), str(runs["seed2"]), str(third), "--output", str(tmp_path / "agg"))
    md = (tmp_path / "agg" / "report.md").read_text()
    assert "synthetic / resnet20: mean ± standard deviation (n - 1) over 3 runs" in md
    assert "| fmls |" in md and "| msp |" in md
    assert "error" not in capsys.readouterr().err


def test_one_run_given_twice_is_refused_naming_the_folders(runs, tmp_path, capsys):
    stored_again = copy_run(runs["seed1"], tmp_path / "backup")  # the same weights' results in another folder
    err = report_error(capsys, runs["seed1"], runs["seed2"], stored_again, output=tmp_path / "agg")
    fingerprint = json.loads((runs["seed1"] / "ood_results.json").read_text())["provenance"]["fingerprint"]
    assert f"error: 1 of the 3 runs repeat the weights of another: {runs['seed1']} and {stored_again} (fingerprint " \
           f"{fingerprint}) are results of the same weights, one run stored twice" in err  # fmt: skip
    assert str(runs["seed2"]) not in err
    err = report_error(capsys, runs["seed1"], runs["seed2"], runs["seed1"] / "ood_results.json", output=tmp_path / "a")
    assert f"error: {runs['seed1'] / 'ood_results.json'} is given twice: each run counts once." in err


def test_runs_whose_scorer_hyperparameters_differ_are_refused(runs, tmp_path, capsys):
    err = report_error(capsys, runs["seed1"], runs["seed2"], runs["p60"], output=tmp_path / "agg")
    assert "Runs of different settings" in err and "scorers.fmls.percentile = 60 (vs 30)" in err
    assert str(runs["p60"] / "ood_results.json") in err and str(runs["seed1"] / "ood_results.json") in err
    assert str(runs["seed2"] / "ood_results.json") not in err  # it is of the first run's setting
    assert "differ only in weights, checkpoint and seed" in err


def set_tpr(results):
    results["tpr"] = 0.9


def add_clip(results):
    results["provenance"]["scorers"]["fmls"]["clip_percentile"] = 90


def other_statistics(results):
    results["provenance"]["statistics_images"] = "synthetic training images, 8 held out (seed 0)"


def other_groups(results):
    results["groups"] = {"noise": "far"}


@pytest.mark.parametrize(
    ("edit", "differs"),
    [
        (set_tpr, "tpr = 0.9 (vs 0.95)"),
        (add_clip, "scorers.fmls.clip_percentile = 90 (vs null)"),  # FMLS's default: no fixed clip percentile
        (other_statistics, 'statistics_images = "synthetic training images, 8 held out (seed 0)" (vs '),
    ],
    ids=["tpr", "new hyperparameter", "statistics images"],
)
def test_every_differing_setting_is_named(runs, tmp_path, capsys, edit, differs):
    other = copy_run(runs["seed2"], tmp_path / "other", edit)
    err = report_error(capsys, runs["seed1"], other, output=tmp_path / "agg")
    assert differs in err and str(other / "ood_results.json") in err


def test_a_hyperparameter_left_at_its_default_is_the_default_given(runs, tmp_path):
    def unset(results):
        del results["provenance"]["scorers"]["fmls"]["percentile"]

    def given(results):
        results["provenance"]["scorers"]["fmls"]["percentile"] = 60.0  # FMLS's default

    left, set_ = copy_run(runs["seed1"], tmp_path / "unset", unset), copy_run(runs["seed2"], tmp_path / "set", given)
    run_cli("report", str(left), str(set_), "--output", str(tmp_path / "agg"))
    assert "over 2 runs" in (tmp_path / "agg" / "report.md").read_text()


def test_the_near_far_grouping_counts_only_where_both_runs_have_one(runs, tmp_path, capsys):
    near = copy_run(runs["seed1"], tmp_path / "near", lambda r: r.update(groups={"noise": "near"}))
    far = copy_run(runs["seed2"], tmp_path / "far", other_groups)
    err = report_error(capsys, near, far, output=tmp_path / "agg")
    assert 'groups.noise = "far" (vs "near")' in err
    run_cli("report", str(near), str(runs["seed2"]), "--output", str(tmp_path / "mixed"))  # one run has no groups


def truncated(text: str) -> str:
    return text[: len(text) // 2]


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        (truncated, "is not valid JSON ("),
        (lambda text: "", "is empty"),
        (lambda text: "\n  \n", "is empty"),
        (lambda text: "[1, 2, 3]", "holds a list, not a mapping"),
        (lambda text: '"results"', "holds a string, not a mapping"),
        (
            lambda text: '{"id_dataset": "synthetic", "backbone": "resnet20"}',
            "lacks accuracy, num_images, metrics, average",
        ),
        (lambda text: text.replace('"accuracy": ', '"accuracy": "high", "was": '), "accuracy is a string, not a"),
        (lambda text: text.replace('"metrics": {', '"metrics": {"knn": 3, '), "metrics.knn is a number, not a map"),
        (lambda text: text.replace('"auroc": ', '"auroc": null, "was": '), "metrics.fmls.noise.auroc is null, not"),
    ],
    ids=["truncated", "empty", "blank", "list", "string", "missing keys", "accuracy", "scorer", "metric"],
)
def test_a_damaged_results_file_is_one_error_naming_it(runs, tmp_path, capsys, damage, says):
    damaged = tmp_path / "damaged"
    shutil.copytree(runs["seed2"], damaged)
    results = damaged / "ood_results.json"
    results.write_text(damage(results.read_text()))
    err = report_error(capsys, runs["seed1"], damaged, output=tmp_path / "agg")
    assert str(results) in err and says in err
    assert "rerun `lightning-ood test` for that run, or leave it out" in err


def test_a_results_file_that_is_not_text_is_one_error(runs, tmp_path, capsys):
    damaged = tmp_path / "binary"
    damaged.mkdir()
    (damaged / "ood_results.json").write_bytes(b"\x00\xff\xfe" * 100)
    err = report_error(capsys, damaged, runs["seed1"], output=tmp_path / "agg")
    assert f"{damaged / 'ood_results.json'} is not a UTF-8 text file" in err


def test_a_run_without_ood_sets_is_one_error(runs, tmp_path, capsys):
    bare = copy_run(runs["seed2"], tmp_path / "bare", lambda r: r.update(metrics={}, average={}))
    err = report_error(capsys, runs["seed1"], bare, output=tmp_path / "agg")
    assert f"{bare / 'ood_results.json'} holds no OOD metrics" in err


def write_run(folder, fpr: float, auroc: float, accuracy: float, scorers=("msp", "fmls"), groups=None):
    metrics = {s: {o: {"fpr95": fpr + i / 100, "auroc": auroc, "aupr_in": 0.5, "aupr_out": 0.4}
                   for i, o in enumerate(("svhn", "textures"))} for s in scorers}  # fmt: skip
    report = OODReport("cifar10", "resnet18", accuracy, metrics, {"cifar10": 100, "svhn": 50, "textures": 40},
                       groups=groups or {})  # fmt: skip
    report.write(folder)
    return folder


def test_report_aggregates_runs_into_mean_and_standard_deviation(tmp_path, capsys):
    seeds = [(0.20, 0.90, 0.80), (0.30, 0.94, 0.82), (0.25, 0.98, 0.81)]
    runs = [write_run(tmp_path / f"seed{i}", fpr, auroc, acc) for i, (fpr, auroc, acc) in enumerate(seeds)]
    run_cli("report", *map(str, runs), "--output", str(tmp_path / "agg"))
    rows = {(r["scorer"], r["ood"], r["metric"]): r for r in csv.DictReader((tmp_path / "agg" / "report.csv").open())}
    row = rows[("fmls", "svhn", "fpr95")]
    assert float(row["mean"]) == pytest.approx(statistics.fmean([20, 30, 25]))
    assert float(row["std"]) == pytest.approx(statistics.stdev([20, 30, 25]), abs=1e-4)  # sample std (n - 1)
    assert row["runs"] == "3" and row["values"] == "20.0000 30.0000 25.0000"
    average = rows[("msp", "Average", "auroc")]
    assert float(average["mean"]) == pytest.approx(94.0) and float(average["std"]) == pytest.approx(4.0)
    md = (tmp_path / "agg" / "report.md").read_text()
    assert "mean ± standard deviation (n - 1) over 3 runs" in md and "ID accuracy 81.00 ± 1.00%" in md
    assert "| fmls | 25.00 ± 5.00 | 26.00 ± 5.00 | 25.50 ± 5.00 |" in md
    assert r"25.00$\pm$5.00" in (tmp_path / "agg" / "report.tex").read_text()


def test_report_keeps_the_near_and_far_averages_every_run_has(tmp_path):
    groups = {"svhn": "near", "textures": "far"}
    grouped = [write_run(tmp_path / f"g{i}", 0.2 + i / 10, 0.9, 0.8, groups=groups) for i in range(2)]
    run_cli("report", *map(str, grouped), "--output", str(tmp_path / "both"))
    rows = {(r["scorer"], r["ood"], r["metric"]): r for r in csv.DictReader((tmp_path / "both" / "report.csv").open())}
    assert float(rows[("fmls", "Average (near)", "fpr95")]["mean"]) == pytest.approx(25.0)  # svhn: 20 and 30
    assert float(rows[("fmls", "Average (far)", "fpr95")]["mean"]) == pytest.approx(26.0)  # textures: 21 and 31
    plain = write_run(tmp_path / "plain", 0.2, 0.9, 0.8)  # the same sets, run without groups
    run_cli("report", str(grouped[0]), str(plain), "--output", str(tmp_path / "mixed"))
    oods = {r["ood"] for r in csv.DictReader((tmp_path / "mixed" / "report.csv").open())}
    assert oods == {"svhn", "textures", "Average"}


def test_report_refuses_what_it_cannot_aggregate(tmp_path, capsys):
    one = write_run(tmp_path / "a", 0.2, 0.9, 0.8)
    err = cli_error(capsys, "report", str(one))
    assert "give at least two run folders" in err
    other = write_run(tmp_path / "b", 0.2, 0.9, 0.8, scorers=("msp",))
    err = cli_error(capsys, "report", str(one), str(other))
    assert "differ in their scorers or OOD sets" in err
    err = cli_error(capsys, "report", str(one), str(tmp_path / "nowhere"))
    assert "holds no ood_results.json" in err
