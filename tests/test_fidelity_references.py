"""Every data-chosen quantity is fitted on held-out ID images that are never scored (``reference: id_val``), as its
authors fit it: temperature scaling's T (gpleiss/temperature_scaling ``demo.py``, OpenOOD's
``temp_scaling_postprocessor.py``), KL matching's templates (OpenOOD's ``kl_matching_postprocessor.py``) and
ReAct's threshold (OpenOOD's ``react_postprocessor.py``), each against a numpy computation written from their code;
then, through the CLI, that no image a reference set was measured on is among the scored ID test images, and that
the results say which images each reference came from (``id_test``, the ReAct authors' leakage, flagged)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp, softmax
from scipy.stats import entropy
from torch import nn
from torch.utils.data import Dataset

from lightning_ood.data import SyntheticDataModule
from lightning_ood.data.base import IndexedDataset
from lightning_ood.errors import ConfigError
from lightning_ood.scoring import build_scorer
from lightning_ood.statistics import FeatureSet, FeatureStatistics
from tests.test_cli import run_cli


@pytest.fixture(scope="module")
def q():
    """Training, held-out ID validation and test features of 4 classes under a head that is right most of the time
    and overconfident (logits scaled up, so the NLL-optimal T is above 1); the validation images' logits differ
    from the training images', so that templates or a T from the wrong set give other scores."""
    g = torch.Generator().manual_seed(7)
    L, C = 10, 4
    centres = torch.rand(C, L, generator=g) * 3

    def images(n, spread):
        labels = torch.arange(n) % C
        return (centres[labels] + torch.randn(n, L, generator=g) * spread).relu(), labels

    train, train_labels = images(300, 0.6)
    val, val_labels = images(120, 1.4)  # unseen images: further from the class centres than the training ones
    test = torch.cat([images(40, 1.4)[0], torch.rand(20, L, generator=g) * 5])
    head = nn.Linear(L, C)
    with torch.no_grad():
        head.weight.copy_((centres - 0.8 * centres.mean(0)) * 4)
        head.bias.copy_(torch.randn(C, generator=g) * 0.1)
        val_logits, test_logits = head(val), head(test)
    stats = FeatureStatistics.from_features(train, train_labels, C, head)
    stats.reference["id_val"] = FeatureSet(val, val_logits, val_labels)
    return SimpleNamespace(C=C, head=head, stats=stats, test=test, test_logits=test_logits,
                           W=head.weight.detach().double().numpy(), b=head.bias.detach().double().numpy(),
                           val=val.double().numpy(), val_y=val_labels.numpy(), train=train.double().numpy(),
                           T=test.double().numpy())  # fmt: skip


def ours(q, name, **params) -> np.ndarray:
    scorer = build_scorer(name, **params).fit_statistics(q.stats, q.head)
    return scorer.score(q.test, q.test_logits).double().numpy()


def test_temperature_scaling_fits_t_on_the_held_out_images(q):
    """gpleiss/temperature_scaling ``temperature_scaling.py`` ``set_temperature(valid_loader)`` and OpenOOD's
    ``temp_scaling_postprocessor.py`` (``setup``: the ``id_loader_dict['val']`` logits): T minimises the mean NLL
    of ``logits / T`` over the validation images; the score is the max softmax at T."""
    z = q.val @ q.W.T + q.b

    def nll(t):
        s = z / t
        return -(s[np.arange(len(s)), q.val_y] - logsumexp(s, axis=1)).mean()

    t = minimize_scalar(nll, bounds=(1e-3, 100.0), method="bounded", options={"xatol": 1e-10}).x
    scorer = build_scorer("temp_scaling").fit_statistics(q.stats, q.head)  # the default reference: id_val
    assert scorer.reference == "id_val" and scorer.temperature == pytest.approx(t, rel=1e-5) and t > 1
    expected = softmax((q.T @ q.W.T + q.b) / t, axis=1).max(1)
    np.testing.assert_allclose(np.exp(ours(q, "temp_scaling")), expected, rtol=1e-5)  # it scores log p_max
    with pytest.raises(ConfigError, match="reference must be one of id_val, got 'id_test'"):
        build_scorer("temp_scaling", reference="id_test")  # scored images never choose T


def test_kl_matching_templates_come_from_the_held_out_images(q):
    """OpenOOD's ``kl_matching_postprocessor.py``: per class predicted on the ID validation images the mean softmax
    (a one-hot template for a class never predicted), then ``-min_c KL(p || d_c)`` (scipy's entropy) per image."""
    p_val = softmax(q.val @ q.W.T + q.b, axis=1)
    predicted = p_val.argmax(1)
    templates = [p_val[predicted == c].mean(0) if (predicted == c).any() else np.eye(q.C)[c] for c in range(q.C)]
    p_test = softmax(q.T @ q.W.T + q.b, axis=1)
    expected = -np.array([min(entropy(p, t) for t in templates) for p in p_test])
    np.testing.assert_allclose(ours(q, "klm"), expected, rtol=1e-5, atol=1e-8)
    assert np.abs(ours(q, "klm", reference="train") - expected).max() > 1e-3  # the training images' templates differ


def test_react_threshold_from_the_held_out_images(q):
    """OpenOOD's ``react_postprocessor.py``: ``np.percentile`` of every activation of the ID validation images
    (``id_loader_dict['val']``), then energy of the head on the clipped features."""
    c = np.percentile(q.val.ravel(), 90)
    expected = logsumexp(np.minimum(q.T, c) @ q.W.T + q.b, axis=1)
    np.testing.assert_allclose(ours(q, "react", reference="id_val"), expected, rtol=1e-5)
    assert c != pytest.approx(np.percentile(q.train.ravel(), 90), abs=1e-3)  # not the training threshold


# ------------------------------------------------------------------------------------------------ through the CLI
def image_key(image: torch.Tensor) -> str:
    return hashlib.sha1(image.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


class Recorded(Dataset):
    """A dataset that notes the content of every image it yields, under ``log[tag]``."""

    def __init__(self, dataset: Dataset, log: list, tag: str) -> None:
        self.dataset, self.log, self.tag = dataset, log, tag

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        item = self.dataset[index]
        self.log.append((self.tag, image_key(item[0])))
        return item


class RecordingDataModule(SyntheticDataModule):
    """Synthetic data whose evaluation loaders note every image they yield: ``scored/<set>`` for the test loaders,
    ``measured/<n>`` for every other one (statistics, reference sets; ``n`` counts the loaders)."""

    log: ClassVar[list[tuple[str, str]]] = []  # read by the test after the CLI run

    def eval_loader(self, dataset: Dataset, persistent: bool = False, tag: str | None = None):
        self.loaders = getattr(self, "loaders", 0) + 1
        tag = tag or f"measured/{self.loaders}"
        return super().eval_loader(Recorded(dataset, RecordingDataModule.log, tag), persistent)

    def test_dataloader(self):
        return [
            self.eval_loader(IndexedDataset(dataset), tag=f"scored/{name}") for name, dataset in self.test_sets.items()
        ]


def keys(tag_prefix: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for tag, key in RecordingDataModule.log:
        if tag.startswith(tag_prefix):
            out.setdefault(tag, set()).add(key)
    return out


def cli_run(tmp_path: Path, scorers: dict, val_split: int, version: str) -> dict:
    data = ["--data", "tests.test_fidelity_references.RecordingDataModule", "--data.num_classes", "3",
            "--data.train_size", "40", "--data.test_size", "25", "--data.val_split", str(val_split),
            "--data.ood_sizes", '{"noise": 10}', "--model.backbone", "resnet20", "--trainer.enable_progress_bar",
            "false", "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"), "--checkpoint.dirpath",
            str(tmp_path / f"ckpt{val_split}")]  # fmt: skip
    if not (tmp_path / f"ckpt{val_split}" / "last.ckpt").exists():
        run_cli("fit", *data, "--trainer.max_epochs", "1", "--model.scorers", "[msp]")
    RecordingDataModule.log.clear()
    run_cli("test", *data, "--ckpt_path", str(tmp_path / f"ckpt{val_split}" / "last.ckpt"), "--model.scorers",
            json.dumps(scorers), "--trainer.logger.init_args.version", version)  # fmt: skip
    folder = tmp_path / "logs" / "lightning_ood" / version
    results = json.loads((folder / "ood_results.json").read_text())
    return {"json": results, "md": (folder / "ood_results.md").read_text()}


HELD_OUT = {
    "temp_scaling": {},
    "klm": {},
    "react": {"reference": "id_val"},
    "dice_react": {"reference": "id_val"},
    "msp_react": {"reference": "id_val"},
}


@pytest.mark.parametrize("val_split", [0, 8])
def test_no_scored_id_image_is_among_the_images_a_reference_was_fitted_on(tmp_path, val_split):
    """With and without ``data.val_split``: the ID test images the test scores and every image measured to fit
    something (statistics, reference sets) are disjoint; with a split, the reference images are also disjoint from
    the statistics images (held out of both); the results name the reference images and their scorers."""
    result = cli_run(tmp_path, HELD_OUT, val_split, f"split{val_split}")
    scored_id = keys("scored/synthetic")["scored/synthetic"]
    measured = keys("measured/")
    assert len(scored_id) == 25 and measured
    for tag, images in measured.items():
        assert not images & scored_id, f"{tag}: {len(images & scored_id)} scored ID test images were fitted on"
    references = result["json"]["provenance"]["references"]
    assert list(references) == ["id_val"]
    assert references["id_val"].startswith("temp_scaling, klm, react, dice_react, msp_react: fitted on ")
    assert "none of them scored" in references["id_val"] and "leakage" not in references["id_val"]
    assert f"- references: {{'id_val': '{references['id_val']}'}}" in result["md"]  # the table's footnote
    if val_split:
        assert references["id_val"].endswith(
            "on 8 synthetic training images held out by data.val_split (seed 0; not trained on, not in the OOD "
            "statistics), none of them scored"
        )
        sizes = sorted(len(images) for images in measured.values())
        held_out = next(images for images in measured.values() if len(images) == 8)
        statistics = next(images for images in measured.values() if len(images) == 40 - 8)
        assert 8 in sizes and not held_out & statistics
    else:
        assert references["id_val"].endswith(
            "on 40 of the 40 synthetic training images (seed 0, test transform; no data.val_split, so the network "
            "was trained on them), none of them scored"
        )


def test_id_test_is_the_react_authors_leakage_and_the_results_flag_it(tmp_path):
    """``reference: id_test`` (ReAct's authors: ``compute_threshold.py`` and ``eval.py`` both read the ID ``val``
    loader) measures images that are then scored; the provenance and the table's footnote say so."""
    result = cli_run(tmp_path, {"react": {"reference": "id_test"}, "temp_scaling": {}}, 0, "leak")
    scored_id = keys("scored/synthetic")["scored/synthetic"]
    assert any(images & scored_id for images in keys("measured/").values())
    references = result["json"]["provenance"]["references"]
    assert references["id_test"] == (
        "react: fitted on 25 of the 25 synthetic test images (seed 0), which are also scored: test-set leakage "
        "(the ReAct authors' compute_threshold.py)"
    )
    assert references["id_val"].startswith("temp_scaling: fitted on 40 of the 40 synthetic training images")
    assert "test-set leakage" in result["md"]
