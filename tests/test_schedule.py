"""The paper's learning-rate schedule and the saved hyperparameters."""

from __future__ import annotations

import pytest

from lightning_ood.module import OODClassifier


def lr_by_epoch(module: OODClassifier, epochs: int) -> list[float]:
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "epoch"
    lrs = []
    for _ in range(epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_paper_schedule():
    module = OODClassifier(backbone="resnet20")
    optimizer = module.configure_optimizers()["optimizer"]
    group = optimizer.param_groups[0]
    assert (group["momentum"], group["weight_decay"], group["nesterov"]) == (0.9, 1e-4, False)
    lrs = lr_by_epoch(module, 100)
    for epoch, expected in [
        (0, 0.1),
        (49, 0.1),
        (50, 0.01),
        (74, 0.01),
        (75, 0.001),
        (89, 0.001),
        (90, 1e-4),
        (99, 1e-4),
    ]:
        assert lrs[epoch] == pytest.approx(expected, rel=1e-9), f"epoch {epoch}"


def test_hyperparameters_are_saved():
    module = OODClassifier(backbone="resnet20", num_classes=100, lr=0.05)
    assert module.hparams.backbone == "resnet20"
    assert module.hparams.num_classes == 100
    assert module.hparams.lr == 0.05
    assert list(module.hparams.milestones) == [50, 75, 90]
