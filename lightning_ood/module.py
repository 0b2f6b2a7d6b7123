"""The LightningModule: trains a backbone with the paper's SGD schedule and runs the one-pass OOD benchmark.

Training defaults follow the paper (Section V-A): SGD with learning rate 0.1, momentum 0.9, weight decay 1e-4, batch
size 128 (set on the DataModule), 100 epochs (set on the Trainer), learning rate divided by 10 at epochs 50, 75, 90.

Testing takes the loaders ``[ID test, *OOD sets]``: the backbone runs once per batch, every feature-space scorer
scores those features, ODIN-type scorers run their own perturbation pass; one metric collection per (scorer, OOD set)
is updated in ``test_step`` and computed, synchronised across processes, at the end. The module orchestrates; method
logic lives in :mod:`lightning_ood.scoring`, metrics in :mod:`lightning_ood.metrics`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics.aggregation import SumMetric
from torchmetrics.classification import MulticlassAccuracy

from lightning_ood import fitting
from lightning_ood.engine import Engine, ScorerSpec
from lightning_ood.errors import CheckpointError, ConfigError, DataError, LightningOODError
from lightning_ood.features import weights_fingerprint
from lightning_ood.graphed import GraphedStep
from lightning_ood.metrics import FPR_THRESHOLDS, Concatenated, OODMetrics, dataset_order
from lightning_ood.models import Backbone, pretrained_backbone
from lightning_ood.models.formats import mismatches
from lightning_ood.normalization import Normalization
from lightning_ood.provenance import git_commit, package_version
from lightning_ood.report import OODReport
from lightning_ood.scoring import Scorer
from lightning_ood.statistics import FeatureStatistics

STATISTICS_KEY = "ood_statistics"
NORMALIZATION_KEY = "input_normalization"


COMPILE_BACKENDS = ("inductor", "aot_eager", "eager", "cudagraphs")


def check_compile(compile: bool | str) -> None:
    if isinstance(compile, bool):
        return
    if compile not in COMPILE_BACKENDS:
        raise ConfigError(
            f"compile must be true, false or a torch.compile backend ({', '.join(COMPILE_BACKENDS)}), got {compile!r}."
        )


def match_state_strides(optimizer: torch.optim.Optimizer) -> None:
    """Give every optimiser state tensor shaped as its parameter the parameter's strides. A checkpoint written in
    another memory format (a CPU run resumed on CUDA, ``channels_last`` switched) restores its momentum buffers with
    their old strides, and CUDA's fused SGD kernel refuses parameters, gradients and buffers of different strides."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, Tensor) and value.shape == p.shape and value.stride() != p.stride():
                    optimizer.state[p][key] = torch.empty_like(p).copy_(value)


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
        check_compile(compile)
        self.save_hyperparameters()
        pretrained = pretrained_backbone(backbone, num_classes, weights, weights_format)
        self.backbone: Backbone = pretrained.backbone
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
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro", validate_args=False)
        self.checkpoint_loaded = False
        loaded = pretrained.loaded
        if loaded is not None:
            rank_zero_info(f"Loaded {loaded.describe()} into {backbone}.")
            if loaded.statistics is not None:  # this project's checkpoint: its statistics come along (checked later)
                self.ood_statistics = FeatureStatistics.from_state_dict(loaded.statistics)
        self.ood_metrics = nn.ModuleDict()
        self.score_collectors = nn.ModuleDict()
        self.index_collectors = nn.ModuleDict()
        self.test_scores: dict[str, dict[str, Tensor]] = {}  # per scorer and test set, in dataset order (on the CPU)
        self.nonfinite = nn.ModuleDict()
        self.test_set_names: list[str] = []
        self.ood_report: OODReport | None = None
        self.memory_format = torch.contiguous_format  # channels-last during fit on CUDA (see on_fit_start)
        self.compiled_forward = None  # a function, never a submodule: checkpoints keep their keys
        self.graphed_step: GraphedStep | None = None  # the captured training pass (cuda_graphs), during fit only
        self.graph_ran = False  # the graphed step of this batch has written the gradients (see backward)

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

    # ---------------------------------------------------------------- training
    def fast_path(self) -> None:
        """The GPU fast path of training, set in ``setup("fit")`` (before DDP wraps the model, so its gradient buckets
        see the final strides): channels-last memory format and ``torch.compile`` when configured. The ``bf16-mixed``
        precision default on CUDA is set by the CLI (:func:`lightning_ood.cli.fast_precision`)."""
        channels_last = self.hparams.channels_last
        if channels_last is None:
            channels_last = self.trainer.strategy.root_device.type == "cuda"
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.backbone.to(memory_format=self.memory_format)
        compile = self.hparams.compile
        if compile:
            backend = "inductor" if compile is True else compile
            self.compiled_forward = torch.compile(self.backbone.__call__, backend=backend)
            rank_zero_info(f"Training forward pass compiled with torch.compile (backend {backend}).")
        self.graphed_step = None
        if self.hparams.cuda_graphs:
            refusal = self.graph_refusal()
            if refusal:
                rank_zero_info(f"cuda_graphs: {refusal}; the training step runs eagerly.")
            else:
                self.graphed_step = GraphedStep(self.backbone)
        precision = self.trainer.precision
        if channels_last or compile or self.graphed_step is not None or precision != "32-true":
            mode = "compiled forward" if compile else "eager forward and backward"
            if self.graphed_step is not None:
                cuda = self.trainer.strategy.root_device.type == "cuda"
                mode = "forward and backward in a CUDA graph" if cuda else "fixed-tensor step (no CUDA, no graph)"
            rank_zero_info(
                f"Training fast path: precision {precision}, "
                f"{'channels-last' if channels_last else 'default'} memory format, {mode} "
                f"(evaluation: float32, eager, default format)."
            )

    def graph_refusal(self) -> str | None:
        """Why the training step cannot be captured in a CUDA graph with this Trainer, or ``None``."""
        trainer = self.trainer
        if self.hparams.compile:
            return "not with compile (torch.compile has its own CUDA-graph mode)"
        if trainer.world_size > 1:
            return "one process only (each DDP gradient reduction would have to be captured too)"
        if getattr(trainer, "_detect_anomaly", False):
            return "not with detect_anomaly (its NaN checks read the GPU from the host, which a capture forbids)"
        if trainer.accumulate_grad_batches != 1:
            return "not with accumulate_grad_batches (the graph overwrites the gradients, it does not add to them)"
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            return f"not with {trainer.precision} (its loss scaling happens outside the graph); use bf16-mixed"
        return None

    def plain_network(self) -> None:
        """Leave the training fast path: what runs after training (the statistics pass, the checkpoint written with
        the statistics, a test) runs the uncompiled network in the default memory format."""
        self.compiled_forward = None
        self.graphed_step = None  # its fixed tensors and graph memory go
        self.memory_format = torch.contiguous_format
        self.backbone.to(memory_format=self.memory_format)

    def on_train_start(self) -> None:
        for optimizer in self.trainer.optimizers:  # a resumed optimiser state must fit the fused kernel
            match_state_strides(optimizer)
        if self.graphed_step is not None:
            self.graphed_step.rows = getattr(self.trainer.train_dataloader, "batch_size", None)

    def on_fit_end(self) -> None:
        self.plain_network()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        x = x.contiguous(memory_format=self.memory_format)
        outputs = self.graphed_step(x, y) if self.graphed_step is not None else None
        self.graph_ran = outputs is not None
        if outputs is not None:  # the gradients are written: backward() has nothing left to do
            loss, logits = outputs
        else:
            logits = (self.compiled_forward or self.backbone)(x)
            loss = F.cross_entropy(logits, y)
        # Nothing here reads a value on the host: on a GPU such a read waits for every queued kernel, and the next
        # step's are not queued in time. The loss of each step goes to the logger, read at its interval
        # (trainer.log_every_n_steps); the progress bar shows the epoch's mean loss and accuracy, accumulated on the
        # device and read once at the end of the epoch (Lightning reads the bar's step values after every batch).
        self.train_acc.update(logits.detach(), y)
        self.log("train/loss", loss)
        self.log("train/epoch_loss", loss, prog_bar=True, on_step=False, on_epoch=True)
        self.log("train/acc", self.train_acc, prog_bar=True, on_step=False, on_epoch=True)
        return loss

    # Lightning runs training_step, then zero_grad, then backward: after a graphed step (cuda_graphs) the gradients
    # are already written, so neither may touch them.
    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer) -> None:
        if not self.graph_ran:
            super().optimizer_zero_grad(epoch, batch_idx, optimizer)

    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        if not self.graph_ran:
            super().backward(loss, *args, **kwargs)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Accuracy on the held-out training images (``data.val_split``), logged per epoch as ``val/acc``; in the
        network's own precision, as the test (not under a mixed-precision Trainer's autocast)."""
        x, y = batch
        with torch.autocast(x.device.type, enabled=False):
            logits = self.backbone(x.to(self.backbone_dtype()))
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
    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.fast_path()
        datamodule = getattr(self.trainer, "datamodule", None)
        data_classes = getattr(datamodule, "num_classes", None)
        if data_classes is not None and data_classes != self.hparams.num_classes:
            raise ConfigError(
                f"The data has {data_classes} classes but the model was built for {self.hparams.num_classes}. "
                f"Use a checkpoint trained on this dataset, or let the CLI link model.num_classes to the data."
            )

    def fingerprint(self) -> str:
        """What the OOD statistics depend on: every backbone tensor and the input normalisation."""
        normalization = self.input_normalization
        extra = f"{normalization.mean}|{normalization.std}" if normalization is not None else ""
        return weights_fingerprint(self.backbone, extra)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.ood_statistics is not None:
            checkpoint[STATISTICS_KEY] = self.ood_statistics.cpu_state_dict()
        if self.input_normalization is not None:
            checkpoint[NORMALIZATION_KEY] = self.input_normalization.as_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse, with one clear message, a checkpoint whose architecture or class count differs from ours."""
        saved = checkpoint.get("hyper_parameters", {})
        if "backbone" in saved and saved["backbone"] != self.hparams.backbone:
            raise CheckpointError(
                f"The checkpoint holds a {saved['backbone']!r} backbone but model.backbone is "
                f"{self.hparams.backbone!r}; set --model.backbone {saved['backbone']}."
            )
        if "num_classes" in saved and saved["num_classes"] != self.hparams.num_classes:
            raise CheckpointError(
                f"The checkpoint was trained for {saved['num_classes']} classes but the data has "
                f"{self.hparams.num_classes} classes; evaluate it on the dataset it was trained on."
            )
        state = checkpoint.get("state_dict", {})
        ours = {k: v for k, v in self.state_dict().items() if k.startswith("backbone.")}
        theirs = {k: v for k, v in state.items() if k.startswith("backbone.")}
        problems = mismatches(theirs, [], ours)
        if problems:
            raise CheckpointError(
                f"The checkpoint's weights do not fit the configured {self.hparams.backbone!r} backbone with "
                f"{self.hparams.num_classes} classes: {'; '.join(problems)}. Set model.backbone to the checkpoint's "
                f"architecture, or load published weights with --model.weights."
            )
        self.checkpoint_loaded = True
        if checkpoint.get(NORMALIZATION_KEY) and self.configured_normalization is None:
            self.input_normalization = Normalization.from_dict(checkpoint[NORMALIZATION_KEY])
        self.ood_statistics = None
        if STATISTICS_KEY in checkpoint:
            stats = FeatureStatistics.from_state_dict(checkpoint[STATISTICS_KEY])
            expected = (self.hparams.num_classes, self.backbone.feature_dim)
            if (stats.num_classes, stats.feature_dim) != expected:
                raise CheckpointError(
                    f"The checkpoint's OOD statistics are for {stats.num_classes} classes x {stats.feature_dim} "
                    f"features, the model has {expected[0]} x {expected[1]}; the checkpoint is inconsistent."
                )
            self.ood_statistics = stats

    # ---------------------------------------------------------------- OOD test pass
    def on_test_start(self) -> None:
        fitting.broadcast_buffers(self.backbone, self.trainer)  # every rank scores with the same network
        datamodule = self.trainer.datamodule
        self.test_set_names = list(datamodule.test_set_names)
        if len(self.test_set_names) < 2:
            rank_zero_info("No OOD sets configured (data.init_args.ood): testing ID accuracy only.")
        self.ensure_statistics(datamodule, self.trainer)
        fitting.ensure_references(self, set(self.engine.needs.references), datamodule, self.trainer)
        self.engine.std = tuple(self.input_normalization.std) if self.input_normalization is not None else None
        self.engine.fit(self.ood_statistics, fitting.fit_context(self, datamodule, self.trainer))
        oods = self.test_set_names[1:]
        hp = self.hparams
        labels = self.engine.labels
        self.ood_metrics = nn.ModuleDict(
            {self._key(s, o): OODMetrics(hp.tpr, hp.fpr_positive, hp.fpr_threshold) for s in labels for o in oods}
        ).to(self.device)
        self.score_collectors = nn.ModuleDict(
            {self._key(s, d): Concatenated() for s in labels for d in self.test_set_names}
        ).to(self.device)
        self.index_collectors = nn.ModuleDict({d: Concatenated() for d in self.test_set_names}).to(self.device)
        counts = {d: SumMetric(nan_strategy="disable") for d in self.test_set_names}  # no NaN check: no host read
        self.nonfinite = nn.ModuleDict(counts).to(self.device)
        self.test_acc.reset()

    def statistics_needs(self) -> frozenset[str]:
        """The statistics beyond the core ones that the configured scorers need (``Needs.statistics``)."""
        return self.engine.needs.statistics

    def ensure_statistics(
        self, datamodule, trainer=None, cache_dir: str | None = None, extra_needs: frozenset[str] = frozenset()
    ) -> FeatureStatistics:
        """The OOD statistics of these weights and inputs (:func:`lightning_ood.fitting.ensure_statistics`)."""
        return fitting.ensure_statistics(self, datamodule, trainer, cache_dir, extra_needs)

    def provenance(self) -> dict[str, object]:
        """What produced this run's numbers, for the result files: weights, normalisation, statistics, scorers and
        their hyperparameters, test sets, seed, package version, git commit, date."""
        ckpt_path = getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None
        normalization = self.input_normalization
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        return {
            "weights": self.hparams.weights or "",
            "checkpoint": str(ckpt_path) if ckpt_path else "",
            "fingerprint": self.fingerprint()[:16],
            "input_normalization": normalization.describe() if normalization else "",
            "statistics_images": self.ood_statistics.images if self.ood_statistics else "",
            "statistics_count": self.ood_statistics.num_samples if self.ood_statistics else 0,
            "references": fitting.describe_references(self),
            "scorers": {label: {"scorer": name, **params} for label, (name, params) in self.scorer_specs.items()},
            "fpr_threshold": self.hparams.fpr_threshold,
            "test_sets": datamodule.describe_sets() if hasattr(datamodule, "describe_sets") else {},
            "seed": os.environ.get("PL_GLOBAL_SEED", ""),
            "package": f"lightning-ood {package_version()}",
            "commit": git_commit(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }

    @staticmethod
    def _key(scorer: str, dataset: str) -> str:
        return f"{scorer}|{dataset}".replace(".", "_")  # ModuleDict keys cannot contain dots

    def score_batch(self, x: Tensor, dataset: str | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Logits and every scorer's scores for a batch of (normalised) images, through the engine (one backbone
        pass). Images whose logits are not finite (NaN/inf features) are counted per ``dataset`` and reported at the
        end."""
        logits, scores = self.engine(x)
        if dataset is not None:
            self.nonfinite[dataset].update((~torch.isfinite(logits).all(dim=1)).sum())
        return logits, scores

    def backbone_dtype(self) -> torch.dtype:
        """The dtype of the network's weights: float32 unless the Trainer's precision is ``*-true`` below 32 bits."""
        return next(self.backbone.parameters()).dtype

    def test_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y, index = batch  # index: the images' places in their test set (the scores are kept in that order)
        dataset = self.test_set_names[dataloader_idx]
        logits, scores = self.score_batch(x, dataset)
        is_id = dataloader_idx == 0
        if is_id:
            self.test_acc.update(logits, y)
        self.index_collectors[dataset].update(index)
        for label, s in scores.items():
            self.score_collectors[self._key(label, dataset)].update(s)
            if is_id:
                for ood in self.test_set_names[1:]:
                    self.ood_metrics[self._key(label, ood)].update(s, torch.ones_like(s, dtype=torch.long))
            else:
                self.ood_metrics[self._key(label, dataset)].update(s, torch.zeros_like(s, dtype=torch.long))

    def on_test_epoch_end(self) -> None:
        broken = {d: int(m.compute()) for d, m in self.nonfinite.items()}  # synchronised: every rank raises or none
        if any(broken.values()):
            counts = ", ".join(f"{n} of '{d}'" for d, n in broken.items() if n)
            raise DataError(
                f"NaN or infinite penultimate features for {counts} images: the weights or the inputs are broken, "
                f"and every score and metric would be meaningless. No results were written."
            )
        accuracy = float(self.test_acc.compute())
        self.log("test/acc", 100 * accuracy, rank_zero_only=True)
        oods = self.test_set_names[1:]
        metrics: dict[str, dict[str, dict[str, float]]] = {}
        for scorer in self.scorers:
            metrics[scorer] = {}
            for ood in oods:
                try:
                    values = self.ood_metrics[self._key(scorer, ood)].compute()
                except ValueError as err:
                    raise LightningOODError(f"Scorer {scorer!r} on OOD set {ood!r}: {err}") from err
                metrics[scorer][ood] = {k: float(v) for k, v in values.items()}
        self.test_scores = self.gathered_scores()  # every rank takes part in the gather
        counts = {d: int(self.index_collectors[d].compute().numel()) for d in self.test_set_names}
        self.ood_report = OODReport(
            id_name=self.test_set_names[0],
            backbone=self.hparams.backbone,
            accuracy=accuracy,
            metrics=metrics if oods else {},
            num_images=counts,
            skipped=dict(getattr(self.trainer.datamodule, "skipped_ood", {})),
            skipped_images=dict(getattr(self.trainer.datamodule, "skipped_images", {})),
            provenance=self.provenance(),
            tpr=self.hparams.tpr,
            fpr_positive=self.hparams.fpr_positive,
            groups={o: g for o, g in getattr(self.trainer.datamodule, "ood_groups", {}).items() if o in oods},
        )
        if oods:  # the averages in %, as every table (per OOD set: the HParams metrics, ScoreHistograms)
            report = self.ood_report
            for scorer in self.scorers:
                for metric in ("fpr95", "auroc"):
                    value = report.percent(scorer, "Average", metric)
                    self.log(f"ood/{scorer}/{report.output_key(metric)}", value, rank_zero_only=True)

    def gathered_scores(self) -> dict[str, dict[str, Tensor]]:
        """``scores[scorer][dataset]`` from all ranks, in dataset order, on the CPU (call on every rank: it
        synchronises); an image scored twice or lost is refused (:func:`lightning_ood.metrics.dataset_order`)."""
        orders = {}
        for dataset in self.test_set_names:
            try:
                orders[dataset] = dataset_order(self.index_collectors[dataset].compute(), f"test set {dataset!r}")
            except ValueError as err:
                raise DataError(str(err)) from err
        return {
            scorer: {
                d: self.score_collectors[self._key(scorer, d)].compute().reshape(-1)[orders[d]].cpu()
                for d in self.test_set_names
            }
            for scorer in self.scorers
        }
