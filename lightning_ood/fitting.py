"""What the evaluation engine is fitted on in a Lightning run, identically on every DDP rank: the training statistics
(taken from the checkpoint when they match the weights, images and scorers, else from the statistics cache, else
computed now by the engine's statistics pass), the reference ID image sets some scorers fit on, and the context of the
scorers' ``prepare`` hooks. Everything takes what it fits explicitly (:class:`FitInputs`: the network, its
fingerprint, the statistics the scorers need), never the LightningModule; nothing here knows a scoring method.

Every pass runs over the training images with the TEST transform, the model in eval mode, each image exactly once
under DDP (sums and counts all-reduced, activations gathered, rank 0's BatchNorm buffers broadcast first), so every
rank ends with the single-process result.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics.utilities.distributed import gather_all_tensors

from lightning_ood.data.base import IndexedDataset, seeded_subset
from lightning_ood.engine import DEFAULT_BANK_IMAGES, DEFAULT_MAX_ACTIVATIONS, FitContext, accumulate_statistics
from lightning_ood.errors import ConfigError, DataError
from lightning_ood.features import FeatureCache, dataset_fingerprint, measure, transform_fingerprint
from lightning_ood.normalization import Normalization
from lightning_ood.precision import network_device
from lightning_ood.scoring.base import Scorer
from lightning_ood.statistics import FeatureSet, FeatureStatistics, Statistic, percentile, quantile_stride

REFERENCE_IMAGES = 2000  # seeded ID images of a reference set: id_val without data.val_split, id_test

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitInputs:
    """What the statistics and the scorers are fitted with.

    Attributes:
        backbone: the network.
        fingerprint: what the statistics depend on (every backbone tensor and the input normalisation): statistics
            of another fingerprint are computed again.
        needs: the extra statistics the scorers need (:class:`~lightning_ood.statistics.Statistic` classes).
        bank_images: training images whose features the ``bank`` keeps.
        cache_dir: folder of the statistics cache (``None``: statistics computed on demand are not kept).
        normalization: the input normalisation of the images (for the scorers' ``prepare``).
    """

    backbone: nn.Module
    fingerprint: str
    needs: frozenset[type[Statistic]] = field(default_factory=frozenset)
    bank_images: int = DEFAULT_BANK_IMAGES
    cache_dir: str | None = None
    normalization: Normalization | None = None


def broadcast_buffers(module: nn.Module, trainer: Trainer | None) -> None:
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
    inputs: FitInputs,
    loader: DataLoader,
    trainer: Trainer | None = None,
    max_activations: int = DEFAULT_MAX_ACTIVATIONS,
    progress: bool = True,
    described_as: str = "",
    log: bool = True,
) -> FeatureStatistics:
    """The engine's statistics pass (:func:`lightning_ood.engine.accumulate_statistics`) of ``inputs.backbone`` over
    ``loader`` (items ``(image, label, index)``) with the extras ``inputs.needs``, exact under DDP (every rank takes
    rank 0's buffers; sums are all-reduced, activations gathered); ``described_as`` says which images they are (stored
    with the statistics, with the network's fingerprint)."""
    backbone = inputs.backbone
    broadcast_buffers(backbone, trainer)
    start = time.perf_counter()
    show = progress and (trainer is None or trainer.is_global_zero)
    reducers = _reducers(trainer, network_device(backbone))
    stats = accumulate_statistics(backbone, loader, inputs.needs, inputs.bank_images, max_activations, reducers,
                                  progress=show)  # fmt: skip
    stats.weights, stats.images = inputs.fingerprint, described_as
    stride = quantile_stride(len(loader.dataset), backbone.feature_dim, max_activations)
    note = "" if stride == 1 else f", activation percentiles from 1 image in {stride}"
    if log:
        rank_zero_info(
            f"Fitted OOD statistics on {stats.num_samples} training images in {time.perf_counter() - start:.1f}s "
            f"({stats.num_classes} classes, {stats.feature_dim}-d features{note})."
        )
    return stats


def statistics_on_demand(inputs: FitInputs, datamodule, trainer: Trainer | None, reason: str) -> FeatureStatistics:
    """Statistics for weights that lack them (``reason`` says why): from the cache when ``inputs.cache_dir`` holds
    them for these weights and training images, else computed over the training set (and stored there, by rank 0).
    Every rank takes the same branch."""
    try:
        loader = datamodule.statistics_dataloader()
    except DataError as err:
        raise DataError(
            f"The OOD statistics {reason} and computing them needs the training images, which are not available: {err}"
        ) from err
    cache = FeatureCache(inputs.cache_dir) if inputs.cache_dir else None
    names = sorted(need.name for need in inputs.needs)
    name = "_".join(["ood_statistics", *names]) + (f"_bank{inputs.bank_images}" if "bank" in names else "")
    key = cache.dataset_key(inputs.backbone, datamodule.statistics_images, inputs.fingerprint) if cache else ""
    stored = cache.load(name, key) if cache else None
    hit = stored is not None
    if trainer is not None and trainer.world_size > 1:
        hit = trainer.strategy.broadcast(hit, src=0)
        stored = trainer.strategy.broadcast(stored, src=0) if hit else None
    if hit:
        rank_zero_info(f"OOD statistics {reason}: taken from the cache in {inputs.cache_dir}.")
        return FeatureStatistics.from_state_dict(stored)
    rank_zero_info(f"OOD statistics {reason}: computing them on the training set now.")
    stats = compute_feature_statistics(
        inputs, loader, trainer, progress=trainer is None or trainer.progress_bar_callback is not None,
        described_as=datamodule.describe_statistics_images(),
    )  # fmt: skip
    if cache is not None and (trainer is None or trainer.is_global_zero):
        cache.store(name, key, stats.cpu_state_dict())
    return stats


def ensure_statistics(
    stats: FeatureStatistics | None,
    inputs: FitInputs,
    datamodule,
    trainer: Trainer | None = None,
    from_checkpoint: bool = False,
) -> FeatureStatistics:
    """``stats`` when they are those of ``inputs``' weights, the data's training images and the extras
    ``inputs.needs``; else statistics computed over the training images (or taken from the cache), with one log line
    saying why. ``from_checkpoint``: ``stats`` came from a checkpoint (for the message)."""
    wanted_images = datamodule.describe_statistics_images()
    other_weights = stats is not None and stats.weights not in ("", inputs.fingerprint)
    other_images = stats is not None and stats.images not in ("", wanted_images)
    lacking = stats.provides(inputs.needs) if stats is not None else set()
    if stats is not None and not (other_weights or other_images or lacking):
        return stats
    reason = (
        "were fitted on other weights or inputs" if other_weights
        else f"were fitted on other images ({stats.images}; this run: {wanted_images})" if other_images
        else f"do not include what the configured scorers need ({', '.join(sorted(n.name for n in lacking))})"
        if lacking
        else "are not in this checkpoint" if from_checkpoint
        else "are not stored with these weights"
    )  # fmt: skip
    return statistics_on_demand(inputs, datamodule, trainer, reason)


def fit_context(inputs: FitInputs, datamodule, trainer: Trainer | None) -> FitContext:
    """What the scorers' ``prepare`` hooks may use in a Lightning run: seeded subsets of the ID training images (test
    transform), the reference image sets, the normalisation, the sum across DDP ranks (every rank gets rank 0's
    buffers first)."""
    broadcast_buffers(inputs.backbone, trainer)

    def training_images(count: int | None, seed: int):  # count None: every training image
        return datamodule.eval_loader(IndexedDataset(seeded_subset(datamodule.statistics_images, count, seed)))

    def references(reference: str):  # the images of a reference set, each rank its disjoint share
        return datamodule.eval_loader(IndexedDataset(reference_images(reference, datamodule)[0]))

    sum_across, *_ = _reducers(trainer, network_device(inputs.backbone))
    return FitContext(inputs.backbone, training_images, inputs.normalization, sum_across, log=rank_zero_info,
                      reference_images=references)  # fmt: skip


# ------------------------------------------------------------------------------------------------ reference images
def ensure_references(
    stats: FeatureStatistics, inputs: FitInputs, references: Iterable[str], datamodule, trainer: Trainer | None = None
) -> None:
    """The reference image sets the scorers fit on (``stats.reference``): the ones measured before in this process on
    the same images (content or files, and transform) and weights are reused, the others measured now. Every DDP rank
    takes the same branch (same images, broadcast weights)."""
    for reference in sorted(references):
        images, source = reference_images(reference, datamodule)
        described = f"{dataset_fingerprint(images)} | {transform_fingerprint(images)}"
        found = stats.reference.get(reference)
        if found is not None and (found.images, found.weights) == (described, inputs.fingerprint):
            rank_zero_info(f"Reference {reference!r}: the {len(found.labels)} ID images measured before.")
            continue
        if reference == "id_test":
            rank_zero_warn(f"Reference 'id_test' fits on {source}; the results say so.")
        found = reference_features(inputs.backbone, IndexedDataset(images), datamodule.eval_loader, trainer)
        rank_zero_info(
            f"Reference {reference!r}: {len(found.labels)} ID images measured (90th activation percentile "
            f"{float(percentile(found.features.double(), 90.0)):.4f})."
        )
        found.images, found.weights, found.source = described, inputs.fingerprint, source
        stats.reference[reference] = found


def reference_features(backbone: nn.Module, dataset, loader_for, trainer: Trainer | None) -> FeatureSet:
    """Features, logits and labels of ``dataset`` (items ``(image, label, index)``) under ``backbone``, in dataset
    order whatever the number of DDP ranks (each rank measures its share; the shares are gathered)."""
    broadcast_buffers(backbone, trainer)
    index = []

    def indexed(loader):
        for images, targets, indices in loader:
            index.append(indices.cpu())
            yield images, targets, indices

    found = measure(backbone, indexed(loader_for(dataset)), "Measuring reference images", progress=False)
    index = torch.cat(index)
    _, gather_across, *_ = _reducers(trainer, network_device(backbone))
    h, z, y = found.features, found.logits, found.labels
    if gather_across is not None:
        index, h, z, y = gather_across(index), gather_across(h), gather_across(z), gather_across(y)
    order = index.argsort()
    return FeatureSet(h[order], z[order], y[order])


def reference_images(reference: str, datamodule) -> tuple[Dataset, str]:
    """The images of a reference set and a sentence saying which they are: ``id_val`` = held-out ID images, never
    scored (:meth:`~lightning_ood.data.base.OODDataModule.id_validation_images`: the ``data.val_split`` images, or
    ``REFERENCE_IMAGES`` seeded training images); ``id_test`` = ``REFERENCE_IMAGES`` seeded ID test images, which the
    test also scores (test-set leakage, kept for ReAct as its authors ran it: deeplearning-wisc/react
    ``compute_threshold.py`` takes the threshold from the ID loader that ``eval.py`` scores)."""
    if reference == "id_val":
        return datamodule.id_validation_images(REFERENCE_IMAGES)
    if reference == "id_test":
        test = datamodule.test_sets[datamodule.id_name]
        images = seeded_subset(test, REFERENCE_IMAGES)
        return images, (
            f"{len(images)} of the {len(test)} {datamodule.id_name} test images (seed 0), which are also scored: "
            f"test-set leakage (the ReAct authors' compute_threshold.py)"
        )
    raise ConfigError(f"Unknown reference image set {reference!r}: choose id_val (held-out ID images) or id_test.")


def describe_references(scorers: Mapping[str, Scorer], stats: FeatureStatistics | None) -> dict[str, str]:
    """For the result files: each reference set the ``scorers`` (``{label: scorer}``) fit on, which of them, and which
    images it holds (the training images of ``reference: train`` are the provenance's ``statistics_images``)."""
    if stats is None:
        return {}
    users: dict[str, list[str]] = {}
    for label, scorer in scorers.items():
        for reference in sorted(scorer.needs.references):
            users.setdefault(reference, []).append(label)
    return {
        reference: f"{', '.join(labels)}: fitted on {stats.reference[reference].source}"
        for reference, labels in sorted(users.items())
        if reference in stats.reference
    }
