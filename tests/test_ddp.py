"""Real 2-process DDP runs on CPU (gloo) with dataset sizes that divide neither by the world size nor by the batch
size: statistics, every scorer's metrics and the written results equal the single-process ones."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from lightning_ood.callbacks.statistics import compute_feature_statistics
from lightning_ood.checkpoints import read_checkpoint
from lightning_ood.data import CIFARDataModule, SyntheticDataModule
from lightning_ood.module import OODClassifier
from lightning_ood.scoring import GROUPS
from tests.conftest import REPO

SCORERS = "all"  # every registered method: the paper's, OpenOOD's and pytorch-ood's, FeatureNorm with NormRatio
DATA = {"num_classes": 4, "train_size": 101, "test_size": 53, "ood_sizes": {"shifted": 37, "noise": 41}}
DATA_ARGS = ["--data", "SyntheticDataModule", "--data.num_classes", "4", "--data.train_size", "101",
             "--data.test_size", "53", "--data.ood_sizes", json.dumps(DATA["ood_sizes"]), "--data.batch_size", "8",
             "--data.eval_batch_size", "8"]  # fmt: skip


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def cli(*args: str, devices: int, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": free_port(), "PL_DISABLE_FORK": "1"}
    strategy = ["--trainer.strategy", "ddp"] if devices > 1 else []
    cmd = [sys.executable, "-m", "lightning_ood", *args, "--trainer.accelerator", "cpu", "--trainer.devices",
           str(devices), *strategy, "--trainer.enable_progress_bar", "false"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    logs = ["--trainer.logger.init_args.save_dir", str(tmp / "logs")]
    # One DDP fit: training, the statistics callback under DDP, the checkpoint written once.
    cli("fit", *DATA_ARGS, *logs, "--model.backbone", "resnet20", "--trainer.max_epochs", "1", "--model.scorers",
        SCORERS, "--checkpoint.dirpath", str(tmp / "ckpt"), "--trainer.logger.init_args.version", "fit",
        devices=2)  # fmt: skip
    ckpt = tmp / "ckpt" / "last.ckpt"
    bare = tmp / "bare.ckpt"  # without statistics: test computes them (under DDP for the 2-process run)
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint.pop("ood_statistics")
    torch.save(checkpoint, bare)
    for devices in (1, 2):
        cli("test", *DATA_ARGS, *logs, "--model.backbone", "resnet20", "--model.scorers", SCORERS, "--ckpt_path",
            str(bare), "--trainer.logger.init_args.version", f"test{devices}", devices=devices)  # fmt: skip
    return tmp


def test_statistics_callback_under_ddp_equals_one_process(runs):
    checkpoint = read_checkpoint(runs / "ckpt" / "last.ckpt")
    model = OODClassifier(backbone="resnet20", num_classes=4, scorers=SCORERS)
    model.on_load_checkpoint(checkpoint)
    model.load_state_dict(checkpoint["state_dict"])
    ddp_stats = model.ood_statistics
    dm = SyntheticDataModule(**DATA, batch_size=8, eval_batch_size=8)
    dm.setup("fit")
    single = compute_feature_statistics(model, dm.statistics_dataloader(), progress=False,
                                        needs=model.statistics_needs())  # fmt: skip
    assert ddp_stats.num_samples == single.num_samples == 101  # every image exactly once
    assert torch.equal(ddp_stats.counts, single.counts)
    torch.testing.assert_close(ddp_stats.class_means, single.class_means, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ddp_stats.covariance, single.covariance, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ddp_stats.std, single.std, rtol=1e-9, atol=1e-12)
    assert torch.equal(ddp_stats.activation_quantiles, single.activation_quantiles)  # the same values, gathered
    # the extras of the configured scorers: the same bank in the same order, the same Gram bounds and stage statistics
    assert model.statistics_needs() == {
        "bank", "gram", "logits", "stages", "unit_gaussians", "unit_outer", "unit_quantiles", "predicted_means",
    }  # fmt: skip
    for name in ("unit_class_means", "unit_second_moment", "unit_outer", "predicted_class_means", "mean_logit_scores"):
        torch.testing.assert_close(getattr(ddp_stats, name), getattr(single, name), rtol=1e-10, atol=1e-12)
    assert torch.equal(ddp_stats.predicted_class_counts, single.predicted_class_counts)
    torch.testing.assert_close(ddp_stats.unit_quantiles, single.unit_quantiles)  # gathered values, the same grid
    assert torch.equal(ddp_stats.bank, single.bank) and torch.equal(ddp_stats.bank_labels, single.bank_labels)
    assert len(single.bank) == 101
    torch.testing.assert_close(ddp_stats.predicted_softmax, single.predicted_softmax, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ddp_stats.correct_means, single.correct_means, rtol=1e-10, atol=1e-12)
    for name, bounds in single.gram.items():
        assert torch.equal(ddp_stats.gram[name]["mins"], bounds["mins"])
        assert torch.equal(ddp_stats.gram[name]["maxs"], bounds["maxs"])
        torch.testing.assert_close(ddp_stats.gram[name]["normalizer"], bounds["normalizer"], rtol=1e-10, atol=0)
    for name, stage in single.stages.items():
        torch.testing.assert_close(ddp_stats.stages[name]["covariance"], stage["covariance"], rtol=1e-9, atol=1e-12)


def test_every_metric_equals_the_single_process_run(runs):
    one = json.loads((runs / "logs" / "lightning_ood" / "test1" / "ood_results.json").read_text())
    two = json.loads((runs / "logs" / "lightning_ood" / "test2" / "ood_results.json").read_text())
    assert one["num_images"] == two["num_images"] == {"synthetic": 53, "shifted": 37, "noise": 41}
    assert list(one["metrics"]) == GROUPS["all"]
    assert one["metrics"] == two["metrics"]  # exact equality, every scorer, OOD set and metric
    assert one["accuracy"] == two["accuracy"]


def test_outputs_written_once(runs):
    folder = runs / "logs" / "lightning_ood" / "test2"
    assert sorted(p.name for p in folder.glob("ood_results.*")) == ["ood_results.csv", "ood_results.json",
                                                                    "ood_results.md", "ood_results.tex"]  # fmt: skip
    assert len(list(folder.glob("events.out.tfevents.*"))) == 1
    assert not list((runs / "logs").rglob("*.tmp"))


def test_tensor_pipeline_under_ddp_gives_each_rank_a_disjoint_share(cifar_folder, tmp_path):
    """Two DDP processes training on the decoded-once CIFAR tensors: every epoch, the ranks' images are disjoint and
    together every training image but the held-out ones (Lightning's distributed wrapper around our sampler)."""
    record = tmp_path / "record"
    record.mkdir()
    cli("fit", "--data", "tests.helpers.RecordingCIFARDataModule", "--data.record", str(record),
        "--data.root", str(cifar_folder), "--data.batch_size", "8", "--data.val_split", "10",
        "--model.backbone", "resnet20", "--model.scorers", "[msp, fmls]", "--trainer.max_epochs", "2",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"), "--checkpoint.dirpath", str(tmp_path / "ckpt"),
        devices=2)  # fmt: skip
    kept = CIFARDataModule(root=str(cifar_folder), val_split=10).kept_indices()
    seen = {rank: [tuple(map(int, line.split())) for line in (record / f"rank{rank}.txt").read_text().splitlines()]
            for rank in (0, 1)}  # fmt: skip
    for epoch in (0, 1):
        shares = [{index for e, index in seen[rank] if e == epoch} for rank in (0, 1)]
        assert len(shares[0]) == len(shares[1]) == 25 and not shares[0] & shares[1]
        assert shares[0] | shares[1] == set(kept)  # 60 images, the 10 held-out ones never trained on
    assert read_checkpoint(tmp_path / "ckpt" / "last.ckpt")["global_step"] == 2 * 4  # ceil(25 / 8) steps per epoch
