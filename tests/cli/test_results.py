"""Results a researcher can use: TensorBoard read back with its own reader (HParams with the OOD metrics, scalars in
%, the learning rate and validation accuracy during fit, the histogram figures) and provenance in every result
file."""

from __future__ import annotations

import json
import warnings

import matplotlib.pyplot as plt
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from lightning_ood.callbacks.reporting import histogram_figure
from lightning_ood.report import OODReport
from tests.cli.conftest import DATA
from tests.helpers import run_cli


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("results")
    common = [*DATA, "--model.backbone", "resnet20", "--trainer.enable_progress_bar", "false",
              "--trainer.logger.init_args.save_dir", str(tmp / "logs"), "--checkpoint.dirpath", str(tmp / "ckpt"),
              "--data.val_split", "16"]  # fmt: skip
    run_cli("fit", *common, "--trainer.max_epochs", "2", "--trainer.logger.init_args.version", "fit")
    run_cli("test", *common, "--ckpt_path", str(tmp / "ckpt" / "last.ckpt"), "--model.scorers",
            '{"msp": {}, "fmls": {}, "knn": {"k": 5}}', "--trainer.logger.init_args.version", "test")  # fmt: skip
    return tmp / "logs" / "lightning_ood"


def events(folder) -> EventAccumulator:
    accumulator = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator


def test_fit_logs_the_learning_rate_and_the_validation_accuracy(runs):
    accumulator = events(runs / "fit")
    assert "lr-SGD" in accumulator.Tags()["scalars"] and "val/acc" in accumulator.Tags()["scalars"]
    assert len(accumulator.Scalars("lr-SGD")) == 2 and len(accumulator.Scalars("val/acc")) == 2  # one per epoch


def test_test_writes_hparams_with_every_metric_scalars_in_percent_and_figures(runs):
    accumulator = events(runs / "test")
    tags = accumulator.Tags()
    assert "hp_metric" not in tags["scalars"]  # no placeholder that TensorBoard would keep instead of the metrics
    for scorer in ("msp", "fmls", "knn"):
        for column in ("shifted", "noise", "Average"):
            for metric in ("fpr95", "auroc", "aupr_in", "aupr_out"):
                assert f"hparam/{scorer}/{column}/{metric}" in tags["scalars"]
        assert f"scores/{scorer}" in tags["images"]
        assert (runs / "test" / "histograms" / f"{scorer}.png").stat().st_size > 1000
    auroc = accumulator.Scalars("hparam/fmls/Average/auroc")[0].value
    report = json.loads((runs / "test" / "ood_results.json").read_text())
    assert auroc == pytest.approx(round(100 * report["average"]["fmls"]["auroc"], 2), abs=1e-4)  # in %
    assert accumulator.Scalars("test/acc")[0].value == pytest.approx(100 * report["accuracy"], abs=1e-4)
    content = accumulator.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    metric_tags = {m.name.tag for m in experiment.metric_infos}
    assert "hparam/fmls/Average/fpr95" in metric_tags and "hparam/knn/shifted/auroc" in metric_tags
    session = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = session.session_start_info.hparams
    assert hparams["scorer/fmls"].string_value == "fmls" and hparams["id_dataset"].string_value == "synthetic"


def test_every_result_file_carries_provenance(runs):
    report = json.loads((runs / "test" / "ood_results.json").read_text())
    provenance = report["provenance"]
    assert set(provenance) >= {"weights", "checkpoint", "fingerprint", "scorers", "test_sets", "seed", "package",
                               "commit", "date", "input_normalization", "statistics_images"}  # fmt: skip
    assert provenance["seed"] == "42" and provenance["package"].startswith("lightning-ood ")
    assert provenance["test_sets"]["noise"]["images"] == 26 and provenance["checkpoint"].endswith("last.ckpt")
    assert provenance["statistics_images"] == "synthetic training images, 16 held out (seed 0)"
    md = (runs / "test" / "ood_results.md").read_text()
    assert "Provenance:" in md and "- commit:" in md and "- date:" in md
    assert (runs / "test" / "ood_results.tex").read_text().startswith("% synthetic / resnet20")


@pytest.mark.parametrize(
    "scores",
    [
        {"id": torch.randn(100), "svhn": torch.full((5,), float("nan"))},  # an OOD set without a finite score
        {"id": torch.full((5,), float("inf")), "svhn": torch.randn(5)},  # the ID set without one
        {"id": torch.full((100,), 3.0e7), "svhn": torch.full((5,), 3.0e7)},  # float32 bin edges would collide
        {"id": -1e12 + 1e-6 * torch.randn(100, dtype=torch.float64), "svhn": torch.full((5,), -1e12)},
    ],
    ids=["no-finite-ood", "no-finite-id", "constant-3e7", "near-constant-1e12"],
)
def test_histograms_draw_degenerate_scores_without_numpy_warnings(scores):
    """Every score set draws on distinct bin edges: no ``RuntimeWarning: invalid value encountered in divide``
    (numpy's density of an empty set or of zero-width bins), which every test run used to print."""
    metrics = {"fmls": {"svhn": {"fpr95": 0.5, "auroc": 0.5}}}
    report = OODReport("cifar10", "resnet18", 0.9, metrics, {"cifar10": 100, "svhn": 5})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        figure = histogram_figure("fmls", {"cifar10": scores["id"], "svhn": scores["svhn"]}, report)
    plt.close(figure)
