"""`lightning-ood test` through the CLI on generated data: the configured scorers (not the checkpoint's), labelled
scorer mappings, statistics fitted on demand, near/far averages and OpenOOD's FPR."""

from __future__ import annotations

import csv
import json
import logging
import math

import pytest
import torch

from tests.helpers import run_cli, scorer_mapping


def test_statistics_on_demand_groups_and_openood_fpr_through_the_cli(tmp_path):
    """Through the CLI: the statistics a checkpoint lacks (the bank) are fitted on demand, near/far averages and
    OpenOOD's FPR are reported. (Every registered method in one pass through the CLI: tests/ddp/test_cli.py.)"""
    from tests.helpers import run_cli

    data = ["--data", "SyntheticDataModule", "--data.num_classes", "4", "--data.train_size", "80", "--data.test_size",
            "30", "--data.ood_sizes", "{}", "--data.ood",
            '[{"name": "gaussian_noise", "size": 20, "group": "far"}, {"name": "uniform_noise", "size": 15, '
            '"group": "near"}]', "--model.backbone", "resnet20", "--trainer.enable_progress_bar", "false",
            "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"),
            "--checkpoint.dirpath", str(tmp_path / "c")]  # fmt: skip
    run_cli("fit", *data, "--trainer.max_epochs", "1", "--model.scorers", "[msp]")
    fitted = torch.load(tmp_path / "c" / "last.ckpt", weights_only=True)["ood_statistics"]
    assert "bank" not in fitted and "gram" not in fitted  # msp needs neither: the checkpoint stays small
    from lightning_ood.scoring.registry import GROUPS

    scorers = json.dumps(scorer_mapping(["msp", "knn", "gram", "mahalanobis"]))  # the bank and Gram bounds on demand
    run_cli("test", *data, "--ckpt_path", str(tmp_path / "c" / "last.ckpt"), "--model.scorers", scorers,
            "--model.fpr_positive", "ood", "--trainer.logger.init_args.version", "all")  # fmt: skip
    report = json.loads((tmp_path / "logs" / "lightning_ood" / "all" / "ood_results.json").read_text())
    assert list(report["metrics"]) == ["msp", "knn", "gram", "mahalanobis"] and len(GROUPS["all"]) >= 40
    values = [v for per in report["metrics"].values() for m in per.values() for v in m.values()]
    assert all(math.isfinite(v) for v in values)
    assert report["groups"] == {"gaussian_noise": "far", "uniform_noise": "near"} and report["fpr_positive"] == "ood"
    assert set(report["group_average"]) == {"far", "near"} and "fpr95_ood" in report["average"]["knn"]
    assert "Average (far)" in (tmp_path / "logs" / "lightning_ood" / "all" / "ood_results.md").read_text()


@pytest.fixture
def info_logs(caplog):
    caplog.set_level(logging.INFO)


@pytest.mark.usefixtures("info_logs")
def test_test_uses_the_configured_scorers_not_the_checkpoints(trained):
    tmp, common = trained
    run_cli("test", *common, "--ckpt_path", str(tmp / "ckpt" / "last.ckpt"), "--model.scorers", "[energy, react]",
            "--trainer.logger.init_args.version", "energy")  # fmt: skip
    rows = list(csv.DictReader((tmp / "logs" / "lightning_ood" / "energy" / "ood_results.csv").open()))
    assert sorted({r["scorer"] for r in rows}) == ["energy", "react"]
    assert {r["ood"] for r in rows} == {"shifted", "noise", "Average"}


@pytest.mark.usefixtures("info_logs")
def test_scorer_mapping_with_labels(trained):
    tmp, common = trained
    run_cli("test", *common, "--ckpt_path", str(tmp / "ckpt" / "last.ckpt"), "--trainer.logger.init_args.version",
            "labels", "--model.scorers", '{"p30": {"scorer": "fmls", "percentile": 30}, "msp": {}}')  # fmt: skip
    rows = list(csv.DictReader((tmp / "logs" / "lightning_ood" / "labels" / "ood_results.csv").open()))
    assert sorted({r["scorer"] for r in rows}) == ["msp", "p30"]
