"""The offline demo data (lightning_ood/data/demo.py): generated offline, and it says what it is."""

from __future__ import annotations

import pytest
import torch

from lightning_ood.data import DemoDataModule


def test_demo_datamodule():
    dm = DemoDataModule()
    dm.setup("fit")
    dm.setup("test")
    assert dm.num_classes == 6 and dm.id_name == "digits_0_5"
    assert dm.test_set_names == ["digits_0_5", "digits_6_9", "faces", "textures", "photos"]
    sizes = {name: len(ds) for name, ds in dm.test_sets.items()}
    assert sizes["faces"] == 100 and sizes["textures"] == 300 and sizes["photos"] == 400
    assert sizes["digits_6_9"] == 714  # digits 6-9 of scikit-learn's 1,797 (181 + 179 + 174 + 180)
    assert len(dm.train_set) + sizes["digits_0_5"] == 1797 - 714
    train_labels = set(dm.train_labels.tolist())
    assert train_labels == set(range(6))
    for dataset in dm.test_sets.values():
        x, _ = dataset[0]
        assert x.shape == (3, 32, 32)
    x, _ = dm.statistics_set[0]
    assert abs(float(torch.stack([dm.statistics_set[i][0] for i in range(200)]).mean())) < 0.2  # normalised


def test_the_demo_says_what_it_is(caplog):
    pytest.importorskip("sklearn")
    from lightning_ood.data import DemoDataModule

    caplog.set_level("INFO")
    DemoDataModule().prepare_data()
    assert "a toy, offline stand-in" in caplog.text and "say nothing about the paper's CIFAR or ImageNet" in caplog.text
