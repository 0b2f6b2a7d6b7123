"""lightning_ood.evaluation: the metrics and the report of a test pass, from a plain loop and across processes."""

import os

import pytest
import torch

from lightning_ood.errors import DataError
from lightning_ood.evaluation import OODEvaluation
from lightning_ood.metrics import ood_metrics
from tests.test_ddp import free_port

SETS = ["id", "far", "near"]


def batches(seed: int = 0):
    """``(set index, logits, labels, scores, indices)`` of 3 sets of 13, 9 and 11 images in uneven batches."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for s, (n, shift) in enumerate(zip((13, 9, 11), (0.0, -2.0, -0.5), strict=True)):
        logits = torch.randn(n, 4, generator=generator) * 3
        labels = torch.randint(0, 4, (n,), generator=generator)
        scores = {"a": torch.randn(n, generator=generator) + shift, "b": logits.logsumexp(1).double()}
        for start in range(0, n, 4):
            part = slice(start, start + 4)
            out.append((s, logits[part], labels[part], {k: v[part] for k, v in scores.items()}, torch.arange(n)[part]))
    return out


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


def evaluate_a_share(rank: int, port: str, results: dict) -> None:
    """One gloo process: every other batch of the test pass (a DDP sampler's share), then the report."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    evaluation = OODEvaluation(SETS, ["a", "b"], num_classes=4)
    for position, (s, logits, labels, scores, indices) in enumerate(batches()):
        if position % 2 == rank:
            evaluation.update(s, logits, labels, scores, indices)
    report = evaluation.compute()
    results[rank] = (report.metrics, report.accuracy, report.num_images, report.scores)
    torch.distributed.destroy_process_group()


@pytest.mark.numerics
def test_two_processes_report_what_one_does():
    """Synchronised as torchmetrics synchronises: every rank gets the single-process report, bit for bit."""
    single = OODEvaluation(SETS, ["a", "b"], num_classes=4)
    for batch in batches():
        single.update(*batch)
    report = single.compute()
    results = torch.multiprocessing.Manager().dict()
    torch.multiprocessing.spawn(evaluate_a_share, args=(free_port(), results), nprocs=2)
    for rank in (0, 1):
        metrics, accuracy, counts, scores = results[rank]
        assert metrics == report.metrics and accuracy == report.accuracy and counts == report.num_images
        assert all(torch.equal(scores[k][n], report.scores[k][n]) for k in scores for n in SETS)
