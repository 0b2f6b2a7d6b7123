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
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import Tensor
from torch.utils.data import DataLoader
from torchmetrics.utilities.distributed import gather_all_tensors

from lightning_ood.errors import DataError
from lightning_ood.featurenorm import block_outputs
from lightning_ood.features import weights_fingerprint
from lightning_ood.statistics import (
    FeatureStatistics,
    ReferenceSet,
    StatisticsAccumulator,
    bank_stride,
    quantile_stride,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_ACTIVATIONS = 64_000_000  # activation values kept for exact percentiles (256 MB of float32)
DEFAULT_BANK_IMAGES = 50_000  # training features kept for KNN & co. (all of CIFAR; ImageNet configs take 1%)


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


@torch.inference_mode(False)  # statistics must stay usable in autograd (ODIN) even when called in inference mode
@torch.no_grad()
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
    """One pass of ``module.backbone`` over ``loader`` (items ``(image, label, index)``); ``described_as`` says which
    images they are (stored with the statistics); ``needs`` the extras to accumulate beyond the core statistics
    (``bank``: at most about ``bank_images`` features; ``stages``; ``gram``; see :mod:`lightning_ood.statistics`)."""
    backbone = module.backbone
    broadcast_buffers(backbone, trainer)
    was_training = backbone.training
    backbone.eval()
    num_samples = len(loader.dataset)
    stride = quantile_stride(num_samples, backbone.feature_dim, max_activations)
    stages = list(backbone.stages()) if "stages" in needs else []
    gram = list(backbone.blocks()) if "gram" in needs else []
    acc = StatisticsAccumulator(
        backbone.num_classes, backbone.feature_dim, stride,
        bank_stride=bank_stride(num_samples, bank_images) if "bank" in needs else 0, stages=stages, gram=gram,
    )  # fmt: skip
    show = progress and (trainer is None or trainer.is_global_zero)
    start = time.perf_counter()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not show, transient=True) as bar, block_outputs(backbone, [*stages, *gram]) as out:
        task = bar.add_task("Fitting OOD statistics on the training set", total=len(loader))
        for images, labels, indices in loader:
            features = backbone.features(images.to(module.device))
            if not torch.isfinite(features).all():
                raise DataError(
                    f"NaN or infinite penultimate features on training images {indices[:5].tolist()}...: "
                    "the weights or the inputs are broken; statistics cannot be fitted."
                )
            pooled = {name: out[name].flatten(2).mean(dim=2) if out[name].ndim == 4 else out[name].mean(dim=1)
                      for name in stages}  # fmt: skip
            acc.update(features, labels, indices, backbone.head(features), pooled, out)
            bar.advance(task)
    stats = acc.compute(*_reducers(trainer, module.device))
    stats.weights = module.fingerprint() if hasattr(module, "fingerprint") else weights_fingerprint(backbone)
    stats.images = described_as
    backbone.train(was_training)
    note = "" if stride == 1 else f", activation percentiles from 1 image in {stride}"
    if not log:
        return stats
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


NORMRATIO_IMAGES = 2000  # ID training images used to choose the FeatureNorm block (a seeded subset)


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
        cache.store(name, key, stats.state_dict())
    return stats


def statistics_needs(module) -> tuple[frozenset[str], int]:
    """The extras the module's scorers need and its bank size (defaults for a plain LightningModule)."""
    needs = module.statistics_needs() if hasattr(module, "statistics_needs") else frozenset()
    bank_images = getattr(getattr(module, "hparams", {}), "bank_images", None) or DEFAULT_BANK_IMAGES
    return frozenset(needs), int(bank_images)


@torch.inference_mode(False)
@torch.no_grad()
def reference_features(module: LightningModule, dataset, loader_for, trainer: Trainer | None) -> ReferenceSet:
    """Features, logits and labels of ``dataset`` (items ``(image, label, index)``) under the module's backbone, in
    dataset order whatever the number of DDP ranks (each rank scores its share; the shares are gathered)."""
    backbone = module.backbone
    broadcast_buffers(backbone, trainer)
    was_training = backbone.training
    backbone.eval()
    indices, features, labels = [], [], []
    for images, targets, index in loader_for(dataset):
        features.append(backbone.features(images.to(module.device)).float().cpu())
        labels.append(torch.as_tensor(targets).cpu())
        indices.append(index.cpu())
    backbone.train(was_training)
    index, h, y = torch.cat(indices), torch.cat(features), torch.cat(labels)
    _, gather_across, *_ = _reducers(trainer, module.device)
    if gather_across is not None:
        index, h, y = gather_across(index), gather_across(h), gather_across(y)
    order = index.argsort()
    h, y = h[order], y[order]
    with torch.no_grad():
        logits = backbone.head(h.to(module.device)).float().cpu()
    return ReferenceSet(h, logits, y)
