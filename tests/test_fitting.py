"""lightning_ood/fitting.py: the reference image sets the scorers fit on. Through the CLI, no image a reference set
was measured on is among the scored ID test images (``reference: id_val``: held out), and the results say which
images each reference came from (``id_test``, the ReAct authors' leakage, flagged); reference images measured
once are reused only for the same images and weights."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from torch.utils.data import Dataset

from lightning_ood.data import SyntheticDataModule
from lightning_ood.data.base import IndexedDataset
from tests.helpers import run_cli


def test_reference_images_are_reused_only_for_the_same_images_and_weights(caplog):
    """A second ``trainer.test`` in the same process reuses the measured ID test images (same scores); other ID test
    images (count or content) or other weights measure them again."""
    from lightning.pytorch import Trainer

    from lightning_ood.data import SyntheticDataModule
    from lightning_ood.module import OODClassifier

    caplog.set_level(logging.INFO)
    torch.manual_seed(0)
    module = OODClassifier(backbone="resnet20", num_classes=3, scorers={"react": {"reference": "id_test"}})

    def test(test_size, seed=0):
        dm = SyntheticDataModule(num_classes=3, train_size=30, test_size=test_size, ood_sizes={"noise": 10}, seed=seed)
        trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                          inference_mode=False)  # fmt: skip
        caplog.clear()
        trainer.test(module, datamodule=dm, verbose=False)
        measured = re.search(r"Reference 'id_test': (\d+) ID images measured", caplog.text)
        reused = re.search(r"Reference 'id_test': the (\d+) ID images measured before", caplog.text)
        return measured, reused, module.ood_report.metrics["react"]["noise"]

    first, _, metrics = test(25)
    assert first and first[1] == "25"
    again, reused, metrics_again = test(25)
    assert again is None and reused[1] == "25" and metrics_again == metrics
    other_images, _, _ = test(20)
    assert other_images and other_images[1] == "20"
    other_content, _, _ = test(20, seed=1)  # as many images, other pixels
    assert other_content and other_content[1] == "20"
    module.ood_statistics.weights = ""  # statistics of unknown weights (an older checkpoint) are kept...
    with torch.no_grad():
        next(module.backbone.parameters()).mul_(1.5)
    other_weights, _, _ = test(20)  # ...but the reference images are measured again under the new weights
    assert other_weights and other_weights[1] == "20"


def image_key(image: torch.Tensor) -> str:
    return hashlib.sha1(image.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


class Recorded(Dataset):
    """A dataset that notes the content of every image it yields, under ``log[tag]``."""

    def __init__(self, dataset: Dataset, log: list, tag: str) -> None:
        self.dataset, self.log, self.tag = dataset, log, tag

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        item = self.dataset[index]
        self.log.append((self.tag, image_key(item[0])))
        return item


class RecordingDataModule(SyntheticDataModule):
    """Synthetic data whose evaluation loaders note every image they yield: ``scored/<set>`` for the test loaders,
    ``measured/<n>`` for every other one (statistics, reference sets; ``n`` counts the loaders)."""

    log: ClassVar[list[tuple[str, str]]] = []  # read by the test after the CLI run

    def eval_loader(self, dataset: Dataset, persistent: bool = False, tag: str | None = None):
        self.loaders = getattr(self, "loaders", 0) + 1
        tag = tag or f"measured/{self.loaders}"
        return super().eval_loader(Recorded(dataset, RecordingDataModule.log, tag), persistent)

    def test_dataloader(self):
        return [
            self.eval_loader(IndexedDataset(dataset), tag=f"scored/{name}") for name, dataset in self.test_sets.items()
        ]


def keys(tag_prefix: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for tag, key in RecordingDataModule.log:
        if tag.startswith(tag_prefix):
            out.setdefault(tag, set()).add(key)
    return out


def cli_run(tmp_path: Path, scorers: dict, val_split: int, version: str) -> dict:
    data = ["--data", "tests.test_fitting.RecordingDataModule", "--data.num_classes", "3",
            "--data.train_size", "40", "--data.test_size", "25", "--data.val_split", str(val_split),
            "--data.ood_sizes", '{"noise": 10}', "--model.backbone", "resnet20", "--trainer.enable_progress_bar",
            "false", "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"), "--checkpoint.dirpath",
            str(tmp_path / f"ckpt{val_split}")]  # fmt: skip
    if not (tmp_path / f"ckpt{val_split}" / "last.ckpt").exists():
        run_cli("fit", *data, "--trainer.max_epochs", "1", "--model.scorers", "[msp]")
    RecordingDataModule.log.clear()
    run_cli("test", *data, "--ckpt_path", str(tmp_path / f"ckpt{val_split}" / "last.ckpt"), "--model.scorers",
            json.dumps(scorers), "--trainer.logger.init_args.version", version)  # fmt: skip
    folder = tmp_path / "logs" / "lightning_ood" / version
    results = json.loads((folder / "ood_results.json").read_text())
    return {"json": results, "md": (folder / "ood_results.md").read_text()}


HELD_OUT = {
    "temp_scaling": {},
    "klm": {},
    "react": {"reference": "id_val"},
    "dice_react": {"reference": "id_val"},
    "msp_react": {"reference": "id_val"},
}


@pytest.mark.parametrize("val_split", [0, 8])
def test_no_scored_id_image_is_among_the_images_a_reference_was_fitted_on(tmp_path, val_split):
    """With and without ``data.val_split``: the ID test images the test scores and every image measured to fit
    something (statistics, reference sets) are disjoint; with a split, the reference images are also disjoint from
    the statistics images (held out of both); the results name the reference images and their scorers."""
    result = cli_run(tmp_path, HELD_OUT, val_split, f"split{val_split}")
    scored_id = keys("scored/synthetic")["scored/synthetic"]
    measured = keys("measured/")
    assert len(scored_id) == 25 and measured
    for tag, images in measured.items():
        assert not images & scored_id, f"{tag}: {len(images & scored_id)} scored ID test images were fitted on"
    references = result["json"]["provenance"]["references"]
    assert list(references) == ["id_val"]
    assert references["id_val"].startswith("temp_scaling, klm, react, dice_react, msp_react: fitted on ")
    assert "none of them scored" in references["id_val"] and "leakage" not in references["id_val"]
    assert f"- references: {{'id_val': '{references['id_val']}'}}" in result["md"]  # the table's footnote
    if val_split:
        assert references["id_val"].endswith(
            "on 8 synthetic training images held out by data.val_split (seed 0; not trained on, not in the OOD "
            "statistics), none of them scored"
        )
        sizes = sorted(len(images) for images in measured.values())
        held_out = next(images for images in measured.values() if len(images) == 8)
        statistics = next(images for images in measured.values() if len(images) == 40 - 8)
        assert 8 in sizes and not held_out & statistics
    else:
        assert references["id_val"].endswith(
            "on 40 of the 40 synthetic training images (seed 0, test transform; no data.val_split, so the network "
            "was trained on them), none of them scored"
        )


def test_id_test_is_the_react_authors_leakage_and_the_results_flag_it(tmp_path):
    """``reference: id_test`` (ReAct's authors: ``compute_threshold.py`` and ``eval.py`` both read the ID ``val``
    loader) measures images that are then scored; the provenance and the table's footnote say so."""
    result = cli_run(tmp_path, {"react": {"reference": "id_test"}, "temp_scaling": {}}, 0, "leak")
    scored_id = keys("scored/synthetic")["scored/synthetic"]
    assert any(images & scored_id for images in keys("measured/").values())
    references = result["json"]["provenance"]["references"]
    assert references["id_test"] == (
        "react: fitted on 25 of the 25 synthetic test images (seed 0), which are also scored: test-set leakage "
        "(the ReAct authors' compute_threshold.py)"
    )
    assert references["id_val"].startswith("temp_scaling: fitted on 40 of the 40 synthetic training images")
    assert "test-set leakage" in result["md"]
