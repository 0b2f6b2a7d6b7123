"""What every scorer owes the metrics (lightning_ood/scoring/base.py): float32 scores that tell apart what float64
tells apart (the exact log-softmax helpers), for every registered scorer."""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_ood.scoring import SCORERS
from tests.scoring.conftest import engine_scores

pytestmark = pytest.mark.numerics  # run again at another thread count by make test


@pytest.mark.parametrize("name", list(SCORERS))
def test_no_scorer_ties_in_float32_what_float64_tells_apart(name, resnet):
    """Confident predictions (the head scaled so that most logit gaps exceed 20) scored in float32, and with the same
    network cast to float64: the float32 scores take as many distinct values as the float64 ones (one fewer allowed:
    two scores that happen to fall within float32's resolution). A softmax probability rounded to 1.0 (a float32
    MSP of most of these images), a ``1 - regret`` rounded to 1 (pNML), a probability clipped at 1 - 1e-7 would tie
    them, and ties change AUROC and FPR."""
    confident = copy.deepcopy(resnet.net)
    with torch.no_grad():
        confident.head.weight.mul_(150)
        confident.head.bias.mul_(150)
    generator = torch.Generator().manual_seed(1)
    images, x = torch.randn(48, 3, 12, 12, generator=generator), torch.randn(32, 3, 12, 12, generator=generator)
    single = engine_scores(name, confident, images, resnet.labels, x).double()
    double = engine_scores(name, copy.deepcopy(confident).double(), images.double(), resnet.labels, x.double())
    distinct_single, distinct_double = single.unique().numel(), double.unique().numel()
    assert distinct_single >= distinct_double - 1, (
        f"{distinct_single} distinct float32 scores, {distinct_double} in float64"
    )
