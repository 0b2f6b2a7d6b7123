"""The decoded-once CIFAR tensors under 2-process DDP: each rank gets a disjoint share every epoch."""

from __future__ import annotations

from lightning_ood.checkpoints import read_checkpoint
from lightning_ood.data import CIFARDataModule
from tests.ddp.conftest import cli


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
