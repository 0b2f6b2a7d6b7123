"""Fit the OOD statistics (prototypes, covariance, activation percentiles, ...) on the training set after ``fit``.

The pass runs over the training images with the TEST transform, the model in eval mode, each image exactly once under
DDP (sums and counts are all-reduced, activations gathered), so every rank ends with the single-process result. A
checkpoint carrying the statistics is written afterwards, because ModelCheckpoint saves before ``on_train_end``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader
from torchmetrics.utilities.distributed import gather_all_tensors

from lightning_ood.engine import (
    DEFAULT_BANK_IMAGES,
    DEFAULT_MAX_ACTIVATIONS,
    FitContext,
    accumulate_statistics,
    measure,
)
from lightning_ood.errors import DataError
from lightning_ood.features import weights_fingerprint
from lightning_ood.statistics import FeatureSet, FeatureStatistics, quantile_stride

log = logging.getLogger(__name__)


def broadcast_buffers(module: torch.nn.Module, trainer: Trainer | None) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics). DDP keeps parameters identical but each rank
    updates its running statistics on its own batches, so after training the ranks' networks differ slightly; the
    checkpoint holds rank 0's. Scoring or fitting on all ranks with rank 0's buffers makes the result the single-process
    one for the saved weights."""
    if trainer is None or trainer.world_size == 1:
        return
    for buffer in module.buffers():
        torch.distributed.broadcast(buffer.data, src=0)


def _reducers(trainer: Trainer | None, device: torch.device):
    """Sum, gather, min and max functions across ranks (identity in a single process)."""
    if trainer is None or trainer.world_size == 1:
        return None, None, None, None

    def sum_across(t: Tensor) -> Tensor:
        return trainer.strategy.reduce(t.to(device), reduce_op="sum").cpu()

    def gather_across(t: Tensor) -> Tensor:
        return torch.cat([g.cpu() for g in gather_all_tensors(t.to(device))])

    def extreme(op):
        def reduce(t: Tensor) -> Tensor:
            t = t.to(device).clone()
            torch.distributed.all_reduce(t, op=op)
            return t.cpu()

        return reduce

    return sum_across, gather_across, extreme(torch.distributed.ReduceOp.MIN), extreme(torch.distributed.ReduceOp.MAX)


def compute_feature_statistics(
    module: LightningModule,
    loader: DataLoader,
    trainer: Trainer | None = None,
    max_activations: int = DEFAULT_MAX_ACTIVATIONS,
    progress: bool = True,
    described_as: str = "",
    log: bool = True,
    needs: frozenset[str] | set[str] = frozenset(),
    bank_images: int = DEFAULT_BANK_IMAGES,
) -> FeatureStatistics:
    """The engine's statistics pass (:func:`lightning_ood.engine.accumulate_statistics`) of ``module.backbone`` over
    ``loader`` (items ``(image, label, index)``), exact under DDP (every rank takes rank 0's buffers; sums are
    all-reduced, activations gathered); ``described_as`` says which images they are (stored with the statistics);
    ``needs`` the extras to accumulate beyond the core statistics."""
    backbone = module.backbone
    broadcast_buffers(backbone, trainer)
    start = time.perf_counter()
    show = progress and (trainer is None or trainer.is_global_zero)
    stats = accumulate_statistics(
        backbone, loader, needs, bank_images, max_activations, _reducers(trainer, module.device), progress=show
    )
    stats.weights = module.fingerprint() if hasattr(module, "fingerprint") else weights_fingerprint(backbone)
    stats.images = described_as
    stride = quantile_stride(len(loader.dataset), backbone.feature_dim, max_activations)
    note = "" if stride == 1 else f", activation percentiles from 1 image in {stride}"
    if log:
        rank_zero_info(
            f"Fitted OOD statistics on {stats.num_samples} training images in {time.perf_counter() - start:.1f}s "
            f"({stats.num_classes} classes, {stats.feature_dim}-d features{note})."
        )
    return stats


class FitOODStatistics(Callback):
    """After training, fit the OOD statistics on the training set and save them in ``last.ckpt``.

    Args:
        max_activations: activation values kept in memory for the exact ReAct percentiles; above it, one image in
            ``ceil(N * L / max_activations)`` is used (by dataset index, so the result does not depend on DDP).
        save_checkpoint: write ``<checkpoint dir>/last.ckpt`` again once the statistics exist.
    """

    def __init__(self, max_activations: int = DEFAULT_MAX_ACTIVATIONS, save_checkpoint: bool = True) -> None:
        self.max_activations = max_activations
        self.save_checkpoint = save_checkpoint

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pl_module.ood_statistics = None  # the weights are about to change

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pl_module.plain_network()  # statistics of the network as the test runs it
        datamodule = trainer.datamodule
        loader = datamodule.statistics_dataloader()
        needs, bank_images = statistics_needs(pl_module)
        pl_module.ood_statistics = compute_feature_statistics(
            pl_module, loader, trainer, self.max_activations, progress=trainer.progress_bar_callback is not None,
            described_as=datamodule.describe_statistics_images(), needs=needs, bank_images=bank_images,
        )  # fmt: skip
        if self.save_checkpoint and not trainer.fast_dev_run:
            checkpoint = trainer.checkpoint_callback
            if isinstance(checkpoint, ModelCheckpoint) and checkpoint.dirpath is not None:
                path = Path(checkpoint.dirpath) / f"{checkpoint.CHECKPOINT_NAME_LAST}{checkpoint.FILE_EXTENSION}"
                trainer.save_checkpoint(path)
                checkpoint.last_model_path = str(path)
                rank_zero_info(f"Saved {path} with the OOD statistics.")


from lightning_ood.scoring.featurenorm import NORMRATIO_IMAGES  # noqa: E402


def normratio_selection(
    module: LightningModule, datamodule, trainer: Trainer | None = None, images: int = NORMRATIO_IMAGES, seed: int = 0
):
    """NormRatio of every block of ``module.backbone`` on a seeded subset of the ID training images (test transform),
    identical on every DDP rank; logs the ratios and the chosen block."""
    from lightning_ood.data.base import IndexedDataset, seeded_subset
    from lightning_ood.featurenorm import norm_ratios

    broadcast_buffers(module.backbone, trainer)
    subset = seeded_subset(datamodule.statistics_images, images, seed)
    loader = datamodule.eval_loader(IndexedDataset(subset))
    sum_across, *_ = _reducers(trainer, module.device)
    result = norm_ratios(module.backbone, loader, seed=seed, device=module.device, sum_across=sum_across,
                         normalization=module.input_normalization)  # fmt: skip
    table = ", ".join(f"{name} {ratio:.3f}" for name, ratio in result.ratios.items())
    rank_zero_info(f"NormRatio on {result.images} ID training images: {table}. FeatureNorm block: {result.selected}.")
    return result


def statistics_on_demand(
    module: LightningModule,
    datamodule,
    trainer: Trainer | None,
    reason: str,
    cache_dir: str | None = None,
    needs: frozenset[str] | None = None,
) -> FeatureStatistics:
    """Statistics for a checkpoint that lacks them (``reason`` says why): from the cache when ``cache_dir`` holds
    them for these weights and training images, else computed over the training set (and stored there, by rank 0).
    Every rank takes the same branch."""
    from lightning_ood.features import FeatureCache

    try:
        loader = datamodule.statistics_dataloader()
    except DataError as err:
        raise DataError(
            f"The OOD statistics {reason} and computing them needs the training images, which are not available: {err}"
        ) from err
    module_needs, bank_images = statistics_needs(module)
    needs = module_needs if needs is None else frozenset(needs)
    cache = FeatureCache(cache_dir) if cache_dir else None
    name = "_".join(["ood_statistics", *sorted(needs)]) + (f"_bank{bank_images}" if "bank" in needs else "")
    key = cache.dataset_key(module.backbone, datamodule.statistics_images) if cache else ""
    stored = cache.load(name, key) if cache else None
    hit = stored is not None
    if trainer is not None and trainer.world_size > 1:
        hit = trainer.strategy.broadcast(hit, src=0)
        stored = trainer.strategy.broadcast(stored, src=0) if hit else None
    if hit:
        rank_zero_info(f"OOD statistics {reason}: taken from the cache in {cache_dir}.")
        return FeatureStatistics.from_state_dict(stored)
    rank_zero_info(f"OOD statistics {reason}: computing them on the training set now.")
    stats = compute_feature_statistics(
        module, loader, trainer, progress=trainer is None or trainer.progress_bar_callback is not None,
        described_as=datamodule.describe_statistics_images(), needs=needs, bank_images=bank_images,
    )  # fmt: skip
    if cache is not None and (trainer is None or trainer.is_global_zero):
        cache.store(name, key, stats.cpu_state_dict())
    return stats


def statistics_needs(module) -> tuple[frozenset[str], int]:
    """The extras the module's scorers need and its bank size (defaults for a plain LightningModule)."""
    needs = module.statistics_needs() if hasattr(module, "statistics_needs") else frozenset()
    bank_images = getattr(getattr(module, "hparams", {}), "bank_images", None) or DEFAULT_BANK_IMAGES
    return frozenset(needs), int(bank_images)


def reference_features(module: LightningModule, dataset, loader_for, trainer: Trainer | None) -> FeatureSet:
    """Features, logits and labels of ``dataset`` (items ``(image, label, index)``) under the module's backbone, in
    dataset order whatever the number of DDP ranks (each rank measures its share; the shares are gathered)."""
    backbone = module.backbone
    broadcast_buffers(backbone, trainer)
    index = []

    def indexed(loader):
        for images, targets, indices in loader:
            index.append(indices.cpu())
            yield images, targets, indices

    found = measure(backbone, indexed(loader_for(dataset)), "Measuring reference images", progress=False)
    index = torch.cat(index)
    _, gather_across, *_ = _reducers(trainer, module.device)
    h, z, y = found.features, found.logits, found.labels
    if gather_across is not None:
        index, h, z, y = gather_across(index), gather_across(h), gather_across(z), gather_across(y)
    order = index.argsort()
    return FeatureSet(h[order], z[order], y[order])


def fit_context(module: LightningModule, datamodule, trainer: Trainer | None) -> FitContext:
    """What the scorers' ``prepare`` hooks may use in a Lightning run: seeded subsets of the ID training images (test
    transform), the normalisation, the sum across DDP ranks (every rank gets rank 0's buffers first)."""
    from lightning_ood.data.base import IndexedDataset, seeded_subset

    broadcast_buffers(module.backbone, trainer)

    def training_images(count: int, seed: int):
        return datamodule.eval_loader(IndexedDataset(seeded_subset(datamodule.statistics_images, count, seed)))

    sum_across, *_ = _reducers(trainer, module.device)
    return FitContext(module.backbone, training_images, module.input_normalization, sum_across, log=rank_zero_info)
