"""The LightningModule: trains a backbone with the paper's SGD schedule and runs the one-pass OOD benchmark.

Training defaults follow the paper (Section V-A): SGD with learning rate 0.1, momentum 0.9, weight decay 1e-4, batch
size 128 (set on the DataModule), 100 epochs (set on the Trainer), learning rate divided by 10 at epochs 50, 75, 90.

The module only orchestrates, in Lightning's hooks: the training step (:mod:`lightning_ood.fast_path`), the statistics
and reference images the scorers are fitted on (:mod:`lightning_ood.fitting`), the evaluation engine that scores every
detector in one backbone pass per batch (:mod:`lightning_ood.engine`), and the metrics and the report over
``[ID test, *OOD sets]`` (:class:`lightning_ood.evaluation.OODEvaluation`). It names no method and holds no metric.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from lightning_ood import fitting
from lightning_ood.engine import Engine, ScorerSpec
from lightning_ood.errors import ConfigError
from lightning_ood.evaluation import OODEvaluation
from lightning_ood.fast_path import TrainingFastPath
from lightning_ood.features import weights_fingerprint
from lightning_ood.metrics import FPR_THRESHOLDS
from lightning_ood.models import Backbone, pretrained_backbone
from lightning_ood.models.formats import (
    NORMALIZATION_KEY,
    STATISTICS_KEY,
    check_fits,
    checkpoint_statistics,
)
from lightning_ood.normalization import Normalization
from lightning_ood.provenance import run_provenance
from lightning_ood.report import OODReport
from lightning_ood.scoring import Scorer
from lightning_ood.statistics import FeatureStatistics


class OODClassifier(LightningModule):
    """An image classifier whose test pass benchmarks post-hoc OOD detection.

    Args:
        backbone: registered backbone name (``resnet18``, ``resnet20``, ``densenet100``).
        num_classes: number of ID classes (linked from the DataModule by the CLI).
        lr: initial SGD learning rate.
        momentum: SGD momentum.
        weight_decay: L2 penalty on all parameters.
        milestones: epochs at which the learning rate is multiplied by ``gamma``.
        gamma: learning-rate decay factor.
        nesterov: use Nesterov momentum.
        scorers: OOD scorers of the test pass: a list of registered names (``[msp, energy, fmls]``) or a mapping
            ``label -> {scorer: <name>, <hyperparameter>: <value>, ...}``; ``None`` runs every method of the paper's
            tables with its defaults.
        tpr: the TPR of the FPR@TPR metric (0.95).
        fpr_positive: ``id`` (the paper's FPR95: ID positive, the share of OOD images kept at 95% of ID kept) or
            ``ood`` (OpenOOD v1.5's: the share of ID images rejected at 95% of OOD rejected), labelled as such.
        fpr_threshold: the FPR's threshold: ``first_at_tpr`` (the largest score keeping at least ``tpr`` of the
            positives) or ``closest`` (the paper's code: the score whose TPR is nearest to ``tpr``; the two differ
            under ties, see :mod:`lightning_ood.metrics`), recorded in the provenance and labelled in the tables.
        weights: pretrained weights. CIFAR backbones: the path of a published checkpoint in any format of
            :mod:`lightning_ood.models.formats` (the DICE / ODIN DenseNet3 files, OpenOOD v1.5's ResNet18_32x32,
            this project's checkpoints and state dicts), converted exactly. torchvision ImageNet backbones: a weights
            name such as ``IMAGENET1K_V1`` or a local ``.pth``; timm's ``vit_base_patch16_224``: a pretrained tag or a
            local ``model.safetensors``. Evaluate them with no Lightning checkpoint, or fine-tune from them with fit.
        weights_format: the format of ``weights`` when its keys fit several (CIFAR backbones); ``None`` recognises it.
        bank_images: training images whose features are kept for the scorers that search them (KNN, ViM, NNGuide,
            Relation, OpenMax): all up to this many, else an even stride (ImageNet configs: 12811, 1% as KNN).
        normalization: ``{mean: [r, g, b], std: [r, g, b]}`` of the input pixels in [0, 1]; ``None`` takes the one
            the weights were trained with (their format's, or the one stored in a checkpoint), else the dataset's.
        statistics_cache: folder where statistics computed on demand (a checkpoint without them, or pretrained
            torchvision weights with no checkpoint at all) are kept for the next test, keyed by the weights and the
            training images; ``None`` recomputes them every time.
        channels_last: train in the channels-last memory format (faster convolutions on GPUs with tensor cores);
            ``None``: on when training on CUDA, off elsewhere. Results are the same up to float rounding.
        compile: ``torch.compile`` the training forward pass: ``true`` (the default backend, inductor) or a backend
            name (``inductor``, ``aot_eager``, ``eager``, ``cudagraphs``); evaluation and the statistics pass run
            the network as it is, so every score is computed exactly as without compilation.
        cuda_graphs: capture the forward pass, the loss and the backward pass of a training step in a CUDA graph
            after three warm-up steps and replay it for every full batch (:mod:`lightning_ood.graphed`): one launch
            instead of hundreds per step, the same arithmetic. One GPU, no gradient accumulation, no fp16 loss
            scaling, no ``detect_anomaly``, not with ``compile`` (each refused with the reason: training goes on
            eagerly); on a CPU the same fixed-tensor step runs without a graph (no speed-up).
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        num_classes: int = 10,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        milestones: Sequence[int] = (50, 75, 90),
        gamma: float = 0.1,
        nesterov: bool = False,
        scorers: ScorerSpec | None = None,
        tpr: float = 0.95,
        fpr_positive: str = "id",
        fpr_threshold: str = "first_at_tpr",
        weights: str | None = None,
        weights_format: str | None = None,
        normalization: dict[str, Any] | None = None,
        bank_images: int = 50_000,
        statistics_cache: str | None = None,
        channels_last: bool | None = None,
        compile: bool | str = False,
        cuda_graphs: bool = False,
    ) -> None:
        super().__init__()
        if lr <= 0:
            raise ConfigError(f"lr must be positive, got {lr}")
        if sorted(milestones) != list(milestones):
            raise ConfigError(f"milestones must be increasing, got {list(milestones)}")
        if isinstance(tpr, bool) or not isinstance(tpr, int | float) or not 0.0 < tpr <= 1.0:
            raise ConfigError(f"tpr (of the FPR@TPR metric) must be in (0, 1], got {tpr!r}; the paper uses 0.95.")
        if fpr_positive not in ("id", "ood"):
            raise ConfigError(f"fpr_positive must be 'id' (the paper) or 'ood' (OpenOOD v1.5), got {fpr_positive!r}.")
        if fpr_threshold not in FPR_THRESHOLDS:
            raise ConfigError(
                f"fpr_threshold must be 'first_at_tpr' or 'closest' (the paper's code), got {fpr_threshold!r}."
            )
        self.save_hyperparameters()
        pretrained = pretrained_backbone(backbone, num_classes, weights, weights_format)
        self.backbone: Backbone = pretrained.backbone
        self.fast_path = TrainingFastPath(self.backbone, channels_last, compile, cuda_graphs)
        self.graphed = False  # the captured step of this batch wrote the gradients (see backward)
        # The normalisation the network expects; None until known (then the dataset's default is adopted).
        self.configured_normalization = (
            Normalization.from_dict(normalization, "model.normalization") if normalization else None
        )
        self.input_normalization: Normalization | None = self.configured_normalization or pretrained.normalization
        # the evaluation engine: the scorers, their fitted tensors and the statistics, moved with this module (the
        # backbone is ours, not the engine's: no parameter is registered twice)
        self.engine = Engine(self.backbone, scorers, own_backbone=False)
        # validate_args=False: the argument checks read values on the host (see training_step)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro", validate_args=False)
        self.val_acc = MulticlassAccuracy(num_classes, average="micro", validate_args=False)
        self.checkpoint_loaded = False
        self.evaluation: OODEvaluation | None = None  # the metrics of the test pass in progress
        self.ood_report: OODReport | None = None  # what the last test pass measured
        loaded = pretrained.loaded
        if loaded is not None:
            rank_zero_info(f"Loaded {loaded.describe()} into {backbone}.")
            if loaded.statistics is not None:  # this project's checkpoint: its statistics come along (checked later)
                self.ood_statistics = FeatureStatistics.from_state_dict(loaded.statistics)

    def forward(self, x: Tensor) -> Tensor:  # (N, 3, H, W) -> (N, C)
        return self.backbone(x)

    @property
    def scorer_specs(self) -> dict[str, tuple[str, dict[str, Any]]]:
        """``{label: (registered name, hyperparameters)}`` of the configured scorers."""
        return self.engine.specs

    @property
    def scorers(self) -> dict[str, Scorer]:
        """The fitted scorers of the current test, ``{label: scorer}``."""
        return self.engine.fitted()

    @property
    def ood_statistics(self) -> FeatureStatistics | None:
        """The training statistics the scorers are fitted on; held by the engine, on the network's device."""
        return self.engine.statistics

    @ood_statistics.setter
    def ood_statistics(self, value: FeatureStatistics | None) -> None:
        self.engine.statistics = value

    def fingerprint(self) -> str:
        """What the OOD statistics depend on: every backbone tensor and the input normalisation."""
        normalization = self.input_normalization
        extra = f"{normalization.mean}|{normalization.std}" if normalization is not None else ""
        return weights_fingerprint(self.backbone, extra)

    def fit_inputs(self, extra_needs: frozenset = frozenset(), cache_dir: str | None = None) -> fitting.FitInputs:
        """What the statistics and the scorers are fitted with: the network, its fingerprint, the statistics the
        configured scorers need (and ``extra_needs``), the bank size, the statistics cache, the normalisation."""
        hp, needs = self.hparams, self.engine.needs.statistics | extra_needs
        return fitting.FitInputs(self.backbone, self.fingerprint(), needs, hp.bank_images,
                                 cache_dir or hp.statistics_cache, self.input_normalization)  # fmt: skip

    # ---------------------------------------------------------------- training
    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.fast_path.start(self.trainer)
        datamodule = getattr(self.trainer, "datamodule", None)
        data_classes = getattr(datamodule, "num_classes", None)
        if data_classes is not None and data_classes != self.hparams.num_classes:
            raise ConfigError(
                f"The data has {data_classes} classes but the model was built for {self.hparams.num_classes}. "
                f"Use a checkpoint trained on this dataset, or let the CLI link model.num_classes to the data."
            )

    def on_train_start(self) -> None:
        self.fast_path.shape(self.trainer)

    def on_fit_end(self) -> None:
        self.fast_path.leave()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss, logits, self.graphed = self.fast_path.step(x, y)
        # Nothing here reads a value on the host: on a GPU such a read waits for every queued kernel, and the next
        # step's are not queued in time. The loss of each step goes to the logger, read at its interval
        # (trainer.log_every_n_steps); the progress bar shows the epoch's mean loss and accuracy, accumulated on the
        # device and read once at the end of the epoch (Lightning reads the bar's step values after every batch).
        self.train_acc.update(logits.detach(), y)
        self.log("train/loss", loss)
        self.log("train/epoch_loss", loss, prog_bar=True, on_step=False, on_epoch=True)
        self.log("train/acc", self.train_acc, prog_bar=True, on_step=False, on_epoch=True)
        return loss

    # Lightning runs training_step, then zero_grad, then backward: after a captured step (cuda_graphs) the gradients
    # are already written, so neither may touch them.
    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer) -> None:
        if not self.graphed:
            super().optimizer_zero_grad(epoch, batch_idx, optimizer)

    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        if not self.graphed:
            super().backward(loss, *args, **kwargs)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Accuracy on the held-out training images (``data.val_split``), logged per epoch as ``val/acc``; in the
        network's own precision, as the test (not under a mixed-precision Trainer's autocast)."""
        x, y = batch
        with torch.autocast(x.device.type, enabled=False):
            logits = self.backbone(x.to(next(self.backbone.parameters()).dtype))
        self.val_acc.update(logits, y)
        self.log("val/acc", self.val_acc, prog_bar=True, on_step=False, on_epoch=True)

    def configure_optimizers(self):
        hp = self.hparams
        # On CUDA the fused kernel updates every parameter in one launch (the default, foreach, launches several per
        # step); the same update up to float rounding.
        fused = next(self.parameters()).device.type == "cuda" or None
        optimizer = torch.optim.SGD(
            self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay, nesterov=hp.nesterov,
            fused=fused,
        )  # fmt: skip
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(hp.milestones), gamma=hp.gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    # ---------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.ood_statistics is not None:
            checkpoint[STATISTICS_KEY] = self.ood_statistics.cpu_state_dict()
        if self.input_normalization is not None:
            checkpoint[NORMALIZATION_KEY] = self.input_normalization.as_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse, with one clear message, a checkpoint whose architecture or class count differs from ours; take
        its input normalisation (unless configured) and its statistics."""
        hp = self.hparams
        ours = {k: v for k, v in self.state_dict().items() if k.startswith("backbone.")}
        check_fits(checkpoint, hp.backbone, hp.num_classes, ours)
        self.checkpoint_loaded = True
        if checkpoint.get(NORMALIZATION_KEY) and self.configured_normalization is None:
            self.input_normalization = Normalization.from_dict(checkpoint[NORMALIZATION_KEY])
        self.ood_statistics = checkpoint_statistics(checkpoint, hp.num_classes, self.backbone.feature_dim)

    # ---------------------------------------------------------------- OOD test pass
    def on_test_start(self) -> None:
        trainer, data, hp = self.trainer, self.trainer.datamodule, self.hparams
        fitting.broadcast_buffers(self.backbone, trainer)  # every rank scores with the same network
        if len(data.test_set_names) < 2:
            rank_zero_info("No OOD sets configured (data.init_args.ood): testing ID accuracy only.")
        inputs = self.fit_inputs()
        self.ood_statistics = fitting.ensure_statistics(self.ood_statistics, inputs, data, trainer,
                                                        self.checkpoint_loaded)  # fmt: skip
        fitting.ensure_references(self.ood_statistics, inputs, self.engine.needs.references, data, trainer)
        self.engine.std = tuple(self.input_normalization.std) if self.input_normalization is not None else None
        self.engine.fit(self.ood_statistics, fitting.fit_context(inputs, data, trainer))
        self.evaluation = OODEvaluation(
            data.test_set_names, self.engine.labels, hp.num_classes, hp.tpr, hp.fpr_positive, hp.fpr_threshold,
            hp.backbone, getattr(data, "ood_groups", {}),
        ).to(self.device)  # fmt: skip

    def test_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y, index = batch  # index: the images' places in their test set (the scores are kept in that order)
        logits, scores = self.engine(x)
        self.evaluation.update(dataloader_idx, logits, y, scores, index)

    def on_test_epoch_end(self) -> None:
        data = self.trainer.datamodule
        report = self.evaluation.compute(  # synchronised: every rank takes part
            self.provenance(), getattr(data, "skipped_ood", {}), getattr(data, "skipped_images", {})
        )
        self.log("test/acc", 100 * report.accuracy, rank_zero_only=True)
        for scorer in report.scorers:  # the averages in %, as every table (per OOD set: the HParams metrics)
            for metric in ("fpr95", "auroc"):
                value = report.percent(scorer, "Average", metric)
                self.log(f"ood/{scorer}/{report.output_key(metric)}", value, rank_zero_only=True)
        self.ood_report = report

    def provenance(self) -> dict[str, object]:
        """What produced this run's numbers, for the result files: weights, normalisation, statistics, scorers and
        their hyperparameters, test sets (then the seed, the package's version, the commit, the date)."""
        trainer = self._trainer
        ckpt_path = getattr(trainer, "ckpt_path", None) if trainer is not None else None
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        normalization, stats = self.input_normalization, self.ood_statistics
        return run_provenance(
            weights=self.hparams.weights or "",
            checkpoint=str(ckpt_path) if ckpt_path else "",
            fingerprint=self.fingerprint()[:16],
            input_normalization=normalization.describe() if normalization else "",
            statistics_images=stats.images if stats else "",
            statistics_count=stats.num_samples if stats else 0,
            references=fitting.describe_references(self.engine.prototypes, stats),
            scorers={label: {"scorer": name, **params} for label, (name, params) in self.scorer_specs.items()},
            fpr_threshold=self.hparams.fpr_threshold,
            test_sets=datamodule.describe_sets() if hasattr(datamodule, "describe_sets") else {},
        )
