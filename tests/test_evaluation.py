"""lightning_ood.evaluation: the metrics and the report of a test pass, from a plain loop (across processes:
tests/ddp/test_evaluation.py)."""

from __future__ import annotations

import pytest
import torch

from lightning_ood.errors import DataError
from lightning_ood.evaluation import OODEvaluation
from lightning_ood.metrics import ood_metrics
from tests.helpers import SETS, batches


def test_the_report_is_that_of_the_scores_in_dataset_order():
    evaluation = OODEvaluation(SETS, ["a", "b"], num_classes=4, backbone="resnet20", groups={"far": "far"})
    batches_ = batches()
    for s, logits, labels, scores, indices in reversed(batches_):  # any order: the indices put them back
        evaluation.update(s, logits, labels, scores, indices)
    report = evaluation.compute(provenance={"weights": "w"})
    whole = {k: {name: torch.cat([b[3][k] for b in batches_ if b[0] == i]) for i, name in enumerate(SETS)}
             for k in ("a", "b")}  # fmt: skip
    for label in ("a", "b"):
        for name in SETS:
            assert torch.equal(report.scores[label][name], whole[label][name])
            assert report.scores[label][name].dtype == whole[label][name].dtype  # float64 stays float64
        for ood in ("far", "near"):
            assert report.metrics[label][ood] == ood_metrics(whole[label]["id"], whole[label][ood])
    id_batches = [b for b in batches_ if b[0] == 0]
    correct = sum(int((b[1].argmax(1) == b[2]).sum()) for b in id_batches)
    assert report.accuracy == pytest.approx(correct / 13)
    assert report.num_images == {"id": 13, "far": 9, "near": 11} and report.groups == {"far": "far"}
    assert report.provenance == {"weights": "w"} and report.backbone == "resnet20"


def test_without_indices_the_order_is_the_order_seen():
    evaluation = OODEvaluation(SETS[:2], ["a"], num_classes=4)
    for s, logits, labels, scores, _ in batches():
        if s < 2:
            evaluation.update(s, logits, labels, {"a": scores["a"]})
    report = evaluation.compute()
    expected = torch.cat([b[3]["a"] for b in batches() if b[0] == 1])
    assert torch.equal(report.scores["a"]["far"], expected)


def test_an_image_scored_twice_or_broken_logits_are_refused():
    evaluation = OODEvaluation(SETS[:2], ["a"], num_classes=4)
    _, logits, labels, scores, indices = batches()[0]
    evaluation.update(0, logits, labels, {"a": scores["a"]}, indices)
    evaluation.update(0, logits, labels, {"a": scores["a"]}, indices)  # the same images again (a padded sampler)
    evaluation.update(1, logits, labels, {"a": scores["a"]}, indices)
    with pytest.raises(DataError, match="not each image once"):
        evaluation.compute()
    broken = OODEvaluation(SETS[:2], ["a"], num_classes=4)
    logits = logits.clone()
    logits[1, 2] = float("nan")
    broken.update(0, logits, labels, {"a": scores["a"]}, indices)
    broken.update(1, logits, labels, {"a": scores["a"]}, indices)
    with pytest.raises(DataError, match="NaN or infinite penultimate features for 1 of 'id', 1 of 'far' images"):
        broken.compute()
