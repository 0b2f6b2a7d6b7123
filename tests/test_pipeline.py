"""End to end on generated data: fit, statistics, checkpoint, one-pass OOD test, metrics, tables, TensorBoard."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from sklearn.metrics import roc_auc_score, roc_curve
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_ood.callbacks import FitOODStatistics, OODResultsTable, ScoreHistograms
from lightning_ood.data import SyntheticDataModule
from lightning_ood.module import OODClassifier
from lightning_ood.scoring import build_scorer
from lightning_ood.scoring.base import Batch
from lightning_ood.statistics import FeatureStatistics

SCORERS = ["msp", "energy", "react", "fmls", "mahalanobis", "odin", "line_ls"]


def datamodule() -> SyntheticDataModule:
    return SyntheticDataModule(num_classes=4, train_size=96, test_size=48, ood_sizes={"shifted": 40, "noise": 36},
                               batch_size=16, eval_batch_size=20)  # fmt: skip


def trainer(tmp_path, **kwargs) -> Trainer:
    return Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=TensorBoardLogger(str(tmp_path / "logs"), name="run"),
        callbacks=[
            ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True),
            FitOODStatistics(),
            OODResultsTable(),
            ScoreHistograms(bins=20),
        ],
        enable_progress_bar=False,
        enable_model_summary=False,
        inference_mode=False,
        **kwargs,
    )


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("pipeline")
    torch.manual_seed(0)
    model = OODClassifier(backbone="resnet20", num_classes=4, lr=0.05, scorers=SCORERS)
    dm = datamodule()
    trainer(tmp_path).fit(model, datamodule=dm)
    return tmp_path, model, dm


def independent_features(model: OODClassifier, dm: SyntheticDataModule):
    """Features and logits of every test image, computed directly with the backbone."""
    model.eval()
    out = {}
    with torch.no_grad():
        for name, dataset in dm.test_sets.items():
            x = torch.stack([dataset[i][0] for i in range(len(dataset))])
            h = model.backbone.features(x)
            out[name] = (x, h, model.backbone.head(h))
    return out


def test_statistics_fitted_after_training_and_saved(fitted):
    tmp_path, model, dm = fitted
    stats = model.ood_statistics
    assert stats is not None and stats.num_samples == 96
    # prototypes = class means of the training features under the test transform, model in eval mode
    model.eval()
    x, y = dm.train_set.tensors
    with torch.no_grad():
        h = model.backbone.features(x).double()
    expected = torch.stack([h[y == c].mean(0) for c in range(4)])
    torch.testing.assert_close(stats.class_means, expected, rtol=1e-6, atol=1e-9)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    restored = FeatureStatistics.from_state_dict(saved["ood_statistics"])
    for key, value in stats.state_dict().items():
        other = getattr(restored, key)
        assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, key


def test_one_pass_metrics_match_an_independent_computation(fitted, tmp_path):
    tmp_path_fit, _, dm = fitted
    ckpt = tmp_path_fit / "ckpt" / "last.ckpt"
    fresh = OODClassifier(backbone="resnet20", num_classes=4, scorers=SCORERS)
    trainer(tmp_path).test(fresh, datamodule=datamodule(), ckpt_path=str(ckpt), verbose=False)
    report = fresh.ood_report
    assert report.scorers == SCORERS and report.ood_names == ["shifted", "noise"]
    assert report.num_images == {"synthetic": 48, "shifted": 40, "noise": 36}

    data = independent_features(fresh, dm)
    _, _, logits_id = data["synthetic"]
    y_id = dm.test_sets["synthetic"].tensors[1]
    assert report.accuracy == pytest.approx((logits_id.argmax(1) == y_id).float().mean().item())
    for name in SCORERS:
        scorer = build_scorer(name).fit_statistics(fresh.ood_statistics, fresh.backbone.head)

        def score(x, h, logits, scorer=scorer):
            batch = Batch(h, logits, inputs=x, features_of=fresh.backbone.features, std=dm.std)
            return scorer(batch).double().numpy()

        id_scores = score(*data["synthetic"])
        for ood in ("shifted", "noise"):
            ood_scores = score(*data[ood])
            s = np.concatenate([id_scores, ood_scores])
            t = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
            fpr, tpr, _ = roc_curve(t, s, drop_intermediate=False)
            got = report.metrics[name][ood]
            assert got["fpr95"] == pytest.approx(fpr[np.argmax(tpr >= 0.95)], abs=1e-12), (name, ood)
            assert got["auroc"] == pytest.approx(roc_auc_score(t, s), abs=1e-6), (name, ood)


def test_results_tables_and_tensorboard(fitted, tmp_path):
    tmp_path_fit, _, _ = fitted
    model = OODClassifier(backbone="resnet20", num_classes=4, scorers=SCORERS)
    run = trainer(tmp_path)
    run.test(model, datamodule=datamodule(), ckpt_path=str(tmp_path_fit / "ckpt" / "last.ckpt"), verbose=False)
    folder = tmp_path / "logs" / "run" / "version_0"
    markdown = (folder / "ood_results.md").read_text()
    assert "| fmls |" in markdown and "### FPR95↓" in markdown and "| Method | shifted | noise | Average |" in markdown
    csv = (folder / "ood_results.csv").read_text().splitlines()
    assert csv[0].startswith("id_dataset,backbone,scorer,paper_method,ood,images,fpr95,auroc,aupr_in,aupr_out")
    assert len(csv) == 1 + len(SCORERS) * 3  # two OOD sets + the average per scorer
    events = EventAccumulator(str(folder), size_guidance={"images": 0})
    events.Reload()
    assert {f"scores/{s}" for s in SCORERS} <= set(events.Tags()["images"])  # one figure per scorer
    assert not events.Tags()["histograms"]  # no panel per (scorer, set): the figures compare them
    assert {f"{s}.png" for s in SCORERS} <= {p.name for p in (folder / "histograms").iterdir()}


def test_statistics_computed_on_demand_for_a_checkpoint_without_them(fitted, tmp_path, caplog):
    tmp_path_fit, model, _ = fitted
    bare = tmp_path / "bare.ckpt"
    checkpoint = torch.load(tmp_path_fit / "ckpt" / "last.ckpt", weights_only=True)
    del checkpoint["ood_statistics"]
    torch.save(checkpoint, bare)
    fresh = OODClassifier(backbone="resnet20", num_classes=4, scorers=["fmls"])
    with caplog.at_level(logging.INFO):
        trainer(tmp_path).test(fresh, datamodule=datamodule(), ckpt_path=str(bare), verbose=False)
    messages = [r.getMessage() for r in caplog.records]
    assert any("OOD statistics are not in this checkpoint: computing them" in m for m in messages)
    torch.testing.assert_close(fresh.ood_statistics.class_means, model.ood_statistics.class_means)


def test_inference_mode_trainer_still_runs_odin(fitted, tmp_path):
    tmp_path_fit, _, _ = fitted
    model = OODClassifier(backbone="resnet20", num_classes=4, scorers=["odin", "odin_fmls"])
    run = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, inference_mode=True)
    run.test(model, datamodule=datamodule(), ckpt_path=str(tmp_path_fit / "ckpt" / "last.ckpt"), verbose=False)
    assert 0.0 <= model.ood_report.metrics["odin"]["noise"]["auroc"] <= 1.0


def test_on_demand_statistics_under_inference_mode_serve_odin(fitted, tmp_path):
    tmp_path_fit, _, _ = fitted
    bare = tmp_path / "bare.ckpt"
    checkpoint = torch.load(tmp_path_fit / "ckpt" / "last.ckpt", weights_only=True)
    del checkpoint["ood_statistics"]
    torch.save(checkpoint, bare)
    model = OODClassifier(backbone="resnet20", num_classes=4, scorers=["odin_fmls", "odin_react"])
    run = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, inference_mode=True)
    run.test(model, datamodule=datamodule(), ckpt_path=str(bare), verbose=False)
    assert not model.ood_statistics.class_means.is_inference()
    assert set(model.ood_report.metrics) == {"odin_fmls", "odin_react"}


def test_statistics_in_the_checkpoint_are_used_as_they_are(fitted, tmp_path, caplog):
    tmp_path_fit, model, _ = fitted
    fresh = OODClassifier(backbone="resnet20", num_classes=4, scorers=["fmls"])
    with caplog.at_level(logging.INFO):
        trainer(tmp_path).test(fresh, datamodule=datamodule(), ckpt_path=str(tmp_path_fit / "ckpt" / "last.ckpt"),
                               verbose=False)  # fmt: skip
    assert not any("computing them" in r.getMessage() for r in caplog.records)
    assert fresh.ood_statistics.weights == model.ood_statistics.weights != ""
