"""A 1-epoch ResNet-20 on generated data that the `test` and `tune` tests share."""

from __future__ import annotations

import pytest

from tests.helpers import run_cli

DATA = ["--data", "SyntheticDataModule", "--data.num_classes", "4", "--data.train_size", "64", "--data.test_size",
        "40", "--data.ood_sizes", '{"shifted": 30, "noise": 26}', "--data.batch_size", "16"]  # fmt: skip


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli_ood")
    common = [*DATA, "--model.backbone", "resnet20", "--trainer.enable_progress_bar", "false",
              "--trainer.logger.init_args.save_dir", str(tmp / "logs"),
              "--checkpoint.dirpath", str(tmp / "ckpt")]  # fmt: skip
    run_cli("fit", *common, "--trainer.max_epochs", "1", "--model.scorers", "[msp, fmls]")
    return tmp, common
