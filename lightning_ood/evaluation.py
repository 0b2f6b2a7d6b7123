"""The metrics and the report of one test pass over ``[ID test set, *OOD sets]``, as a torchmetrics-style object:
``update`` per batch, ``compute`` once, synchronised across processes; no Lightning in it.

    evaluation = OODEvaluation(["cifar10", "svhn", "textures"], engine.labels, num_classes=10)
    for set_index, loader in enumerate(loaders):               # the ID test set first, then each OOD set
        for images, labels, index in loader:                    # index: the images' places in their set
            logits, scores = engine(images.to(device))
            evaluation.update(set_index, logits, labels, scores, index)
    report = evaluation.compute()                               # an OODReport: tables, JSON, every image's score
    report.write("results/")

Every score is kept, with the image's index in its set; ``compute`` gathers them from every process (torchmetrics'
synchronisation), puts each set back in dataset order, refuses an image scored twice or lost, and computes FPR95,
AUROC and the AUPRs of each (scorer, OOD set) from the ID and OOD scores (:func:`lightning_ood.metrics.ood_metrics`:
from the sorted scores, exact): the metrics of N processes are, bit for bit, those of one process on the same scores.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torchmetrics.aggregation import SumMetric
from torchmetrics.classification import MulticlassAccuracy

from lightning_ood.errors import DataError, LightningOODError
from lightning_ood.metrics import Concatenated, check_fpr_threshold, dataset_order, ood_metrics
from lightning_ood.report import OODReport


class OODEvaluation(nn.Module):
    """Accuracy on the ID set, and FPR / AUROC / AUPR of every scorer on every OOD set, from every image's score.

    Args:
        sets: the test sets' names, the ID set first.
        scorers: the scorers' labels (the keys of the ``scores`` given to :meth:`update`).
        num_classes: the ID classes (the accuracy's).
        tpr: the TPR of the FPR metric (0.95).
        fpr_positive: ``id`` (the paper's FPR) or ``ood`` (OpenOOD v1.5's); see
            :class:`~lightning_ood.metrics.FPRAtTPR`.
        fpr_threshold: ``first_at_tpr`` or ``closest`` (the paper's code); see
            :func:`~lightning_ood.metrics.fpr_at_tpr`.
        backbone: the network's name, for the report's tables (the paper's figures are matched by it).
        groups: OOD set -> group (``near``, ``far``), averaged per group in the report.
    """

    def __init__(
        self,
        sets: Sequence[str],
        scorers: Sequence[str],
        num_classes: int,
        tpr: float = 0.95,
        fpr_positive: str = "id",
        fpr_threshold: str = "first_at_tpr",
        backbone: str = "",
        groups: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__()
        if not sets:
            raise ValueError("an evaluation needs the ID test set, at least")
        if fpr_positive not in ("id", "ood"):
            raise ValueError(f"fpr_positive must be 'id' or 'ood', got {fpr_positive!r}")
        self.sets, self.scorer_labels = list(sets), list(scorers)
        self.tpr, self.fpr_positive, self.fpr_threshold = tpr, fpr_positive, check_fpr_threshold(fpr_threshold)
        self.backbone = backbone
        self.groups = {o: g for o, g in (groups or {}).items() if o in self.sets[1:]}
        self.accuracy = MulticlassAccuracy(num_classes, average="micro")
        # per set (keys by position: set names and scorer labels may hold dots): the images' indices, the images
        # with non-finite logits, and every scorer's scores
        self.indices = nn.ModuleList(Concatenated() for _ in self.sets)
        self.nonfinite = nn.ModuleList(SumMetric(nan_strategy="disable") for _ in self.sets)  # no host read per batch
        self.scores = nn.ModuleList(nn.ModuleList(Concatenated() for _ in self.sets) for _ in self.scorer_labels)
        self.seen = [0] * len(self.sets)  # images this process saw per set (the index of an update without one)

    def update(
        self,
        set_index: int,
        logits: Tensor,
        labels: Tensor,
        scores: Mapping[str, Tensor],
        indices: Tensor | None = None,
    ) -> None:
        """Add a batch of set ``set_index`` (0: the ID set): logits ``(N, C)``, labels ``(N,)`` (read for the ID set's
        accuracy), ``{scorer: (N,)}`` scores, and the images' ``indices`` in their set (``None``: in the order this
        process sees them, which is the set's order in one process)."""
        n = len(logits)
        if indices is None:
            indices = torch.arange(self.seen[set_index], self.seen[set_index] + n, device=logits.device)
        self.seen[set_index] += n
        if set_index == 0:
            self.accuracy.update(logits, labels)
        self.indices[set_index].update(indices)
        self.nonfinite[set_index].update((~torch.isfinite(logits).all(dim=1)).sum())
        for position, label in enumerate(self.scorer_labels):
            self.scores[position][set_index].update(scores[label])

    def compute(
        self,
        provenance: Mapping[str, object] | None = None,
        skipped: Mapping[str, str] | None = None,
        skipped_images: Mapping[str, int] | None = None,
    ) -> OODReport:
        """The report: accuracy, every metric of every (scorer, OOD set), the images per set and every image's score in
        dataset order (:attr:`OODReport.scores`), gathered from every process (call it on every process); with what
        produced them (``provenance``) and what was left out (``skipped`` sets, ``skipped_images`` per set).

        Raises:
            DataError: non-finite logits (broken weights or inputs), or an image scored twice or lost.
        """
        broken = {name: int(m.compute()) for name, m in zip(self.sets, self.nonfinite, strict=True)}
        if any(broken.values()):
            counts = ", ".join(f"{n} of '{name}'" for name, n in broken.items() if n)
            raise DataError(
                f"NaN or infinite penultimate features for {counts} images: the weights or the inputs are broken, "
                f"and every score and metric would be meaningless. No results were written."
            )
        orders = []
        for name, indices in zip(self.sets, self.indices, strict=True):
            try:
                orders.append(dataset_order(indices.compute(), f"test set {name!r}"))
            except ValueError as err:
                raise DataError(str(err)) from err
        scores = {
            label: {
                name: collected.compute().reshape(-1)[order].cpu()
                for name, collected, order in zip(self.sets, self.scores[position], orders, strict=True)
            }
            for position, label in enumerate(self.scorer_labels)
        }
        return OODReport(
            id_name=self.sets[0],
            backbone=self.backbone,
            accuracy=float(self.accuracy.compute()),
            metrics=self.metrics(scores) if len(self.sets) > 1 else {},
            num_images={name: len(order) for name, order in zip(self.sets, orders, strict=True)},
            skipped=dict(skipped or {}),
            skipped_images=dict(skipped_images or {}),
            provenance=dict(provenance or {}),
            tpr=self.tpr,
            fpr_positive=self.fpr_positive,
            groups=dict(self.groups),
            scores=scores,
        )

    def metrics(self, scores: Mapping[str, Mapping[str, Tensor]]) -> dict[str, dict[str, dict[str, float]]]:
        """``metrics[scorer][ood][metric]`` of every scorer's ID scores against each OOD set's."""
        out: dict[str, dict[str, dict[str, float]]] = {}
        for label, per_set in scores.items():
            id_scores = per_set[self.sets[0]]
            out[label] = {}
            for ood in self.sets[1:]:
                try:
                    out[label][ood] = ood_metrics(
                        id_scores, per_set[ood], self.tpr, self.fpr_positive, self.fpr_threshold
                    )
                except ValueError as err:
                    raise LightningOODError(f"Scorer {label!r} on OOD set {ood!r}: {err}") from err
        return out

    def reset(self) -> None:
        """Forget every batch (the next test pass starts afresh)."""
        for metric in self.modules():
            if hasattr(metric, "_defaults"):  # a torchmetrics Metric
                metric.reset()
        self.seen = [0] * len(self.sets)
