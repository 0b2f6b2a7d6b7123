"""lightning_ood.evaluation across processes: every rank gets the single-process report, bit for bit."""

from __future__ import annotations

import os

import pytest
import torch

from lightning_ood.evaluation import OODEvaluation
from tests.ddp.conftest import free_port
from tests.helpers import SETS, batches


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
