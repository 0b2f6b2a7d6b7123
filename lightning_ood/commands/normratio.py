"""``lightning-ood normratio``: choose the FeatureNorm block by NormRatio on jigsaw-shuffled ID training images (Yu et
al., CVPR 2023) and write it as a config overlay. As the authors: every training image by default, and the network
sees the images' pixels in [0, 1], un-normalised (:mod:`lightning_ood.featurenorm`)."""

from __future__ import annotations

import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.utilities import rank_zero_info
from rich.table import Table

from lightning_ood.commands.common import (
    check_output_file,
    follow_up_command,
    load_model,
    run_folder,
    tensorboard,
    weights_arguments,
)
from lightning_ood.data.base import OODDataModule
from lightning_ood.data.reproducible import check_seed
from lightning_ood.errors import ConfigError
from lightning_ood.fitting import normratio_selection
from lightning_ood.io import atomic_write_text
from lightning_ood.module import OODClassifier
from lightning_ood.report import results_console
from lightning_ood.scoring.featurenorm import NORMRATIO_IMAGES


def normratio(
    self: Trainer,
    model: OODClassifier,
    datamodule: OODDataModule,
    ckpt_path: str | None = None,
    images: int | None = NORMRATIO_IMAGES,
    seed: int = 0,
    output: str | None = None,
) -> dict:
    """Choose the FeatureNorm block by NormRatio (Yu et al., CVPR 2023) on jigsaw-shuffled ID training images.

    Args:
        model: the model (from the config).
        datamodule: the data (from the config); its training images (test transform, then un-normalised) are used.
        ckpt_path: the checkpoint.
        images: ID training images: a seeded subset of this many; none (the default): all of them, as the authors.
        seed: seed of the subset and of the jigsaw permutations.
        output: also write the overlay (the configured scorers plus ``featurenorm`` on the chosen block) here.

    Returns:
        ``{"block": chosen block, "ratios": {block: NormRatio}, "overlay": path}``.
    """
    check_output_file(output)
    if images is not None and images < 1:
        raise ConfigError(f"normratio --images must be >= 1 (or left out: every training image), got {images}.")
    check_seed("normratio --seed", seed)
    load_model(self, model, datamodule, ckpt_path)
    result = normratio_selection(model, datamodule, None, images, seed)
    table = Table(title=f"NormRatio on {result.images} ID training images (ID / jigsaw FeatureNorm)")
    table.add_column("block")
    table.add_column("NormRatio", justify="right")
    for name, ratio in result.ratios.items():
        style = "bold green" if name == result.selected else ""
        table.add_row(f"[{style}]{name}[/]" if style else name, f"{ratio:.4f}")
    results_console().print(table)
    folder = run_folder(self)
    atomic_write_text(folder / "normratio.csv", result.to_csv())
    figure = result.figure()
    figure.savefig(folder / "normratio.png")
    board = tensorboard(self)
    if board is not None:
        board.experiment.add_figure("normratio", figure, close=True)
        board.experiment.flush()
    scorers = {label: {"scorer": name, **params} for label, (name, params) in model.scorer_specs.items()}
    scorers["featurenorm"] = {"scorer": "featurenorm", "block": result.selected}
    text = (
        f"# Selected by `lightning-ood normratio` on {result.images} ID training images: FeatureNorm block "
        f"{result.selected} (NormRatio {result.ratios[result.selected]:.4f}).\n"
        + yaml.safe_dump({"model": {"scorers": scorers}}, sort_keys=False)
    )
    paths = [atomic_write_text(folder / "featurenorm.yaml", text)]
    if output:
        paths.append(atomic_write_text(output, text))
    command = follow_up_command(self, folder, paths[-1], weights_arguments(model, ckpt_path))
    rank_zero_info(
        f"FeatureNorm block: {result.selected}. Written: {folder / 'normratio.csv'}, {folder / 'normratio.png'}, "
        f"overlay {', '.join(map(str, paths))}. Test with: {command}"
    )
    return {"block": result.selected, "ratios": result.ratios, "overlay": str(paths[-1])}
