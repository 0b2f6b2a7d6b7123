"""The OOD metrics synchronised over gloo processes: those of one process on the union of the scores, the paper's
closest-TPR FPR included."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_ood.metrics import OODMetrics
from tests.ddp.conftest import free_port
from tests.helpers import case
from tests.references import paper_fpr


def _ddp_worker(rank: int, port: str, scores: torch.Tensor, is_id: torch.Tensor, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        metrics = OODMetrics(threshold="closest")
        share = slice(rank, None, 2)  # unequal shares: 401 and 400
        metrics.update(scores[share], is_id[share])
        out[rank] = metrics.compute()["fpr95"].item()
    finally:
        dist.destroy_process_group()


@pytest.mark.numerics
def test_closest_is_synchronised_across_processes():
    is_id, scores = case(3, 451, 350, 1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    out = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(port, torch.from_numpy(scores), torch.from_numpy(is_id), out), nprocs=2)
    assert out[0] == out[1] == paper_fpr(is_id, scores)


def update_a_share_and_compute(rank: int, port: str, shares: list, results: dict) -> None:
    """One gloo process: update OODMetrics with this rank's share of the scores, then compute (synchronised)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=len(shares))
    metrics = OODMetrics()
    for scores, is_id in shares[rank]:  # uneven batches, uneven shares
        metrics.update(scores, is_id)
    results[rank] = {k: v.item() for k, v in metrics.compute().items()}
    torch.distributed.destroy_process_group()


@pytest.mark.numerics
def test_the_metrics_synchronised_over_processes_are_those_of_one_process_on_the_union():
    """The metric objects themselves, in two gloo processes holding 1,234 and 767 scores (ties included, in uneven
    batches): every rank computes, bit for bit, the single-process metrics of all 2,001 scores."""
    generator = torch.Generator().manual_seed(0)
    scores = (torch.randn(2001, generator=generator) * 30).round()  # ties
    is_id = torch.rand(2001, generator=generator) < 0.4
    cuts = [(0, 500), (500, 1234), (1234, 1240), (1240, 2001)]
    batches = [(scores[a:b], is_id[a:b]) for a, b in cuts]
    shares = [batches[:2], batches[2:]]
    whole = OODMetrics()
    whole.update(scores.flip(0), is_id.flip(0))  # another order, one batch
    expected = {k: v.item() for k, v in whole.compute().items()}
    results = torch.multiprocessing.Manager().dict()
    torch.multiprocessing.spawn(update_a_share_and_compute, args=(free_port(), shares, results), nprocs=2)
    assert results[0] == results[1] == expected
