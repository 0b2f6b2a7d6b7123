"""The GPU fast path of training: channels-last memory format, ``torch.compile`` of the forward pass, and the training
step captured in a CUDA graph (:mod:`lightning_ood.graphed`), chosen once a Trainer is known and left when training
ends (what runs after it, the statistics pass and a test, runs the plain network). The ``bf16-mixed`` precision default
on CUDA is set by the CLI (:func:`lightning_ood.cli.fast_precision`)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_ood.errors import ConfigError
from lightning_ood.graphed import GraphedStep

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


def graph_refusal(trainer, compile: bool | str) -> str | None:
    """Why the training step cannot be captured in a CUDA graph with this Trainer, or ``None``."""
    if compile:
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


class TrainingFastPath:
    """How a training step runs: the memory format of its inputs, the forward function (the backbone, or its
    ``torch.compile``-d call), and the captured step (``cuda_graphs``), which writes the gradients itself.

    Args:
        backbone: the network trained.
        channels_last: the channels-last memory format; ``None``: on when training on CUDA.
        compile: ``torch.compile`` the forward pass (``True``: inductor, or a backend name).
        cuda_graphs: capture forward, loss and backward in a CUDA graph (refused, with the reason, where it cannot).
    """

    def __init__(self, backbone: nn.Module, channels_last: bool | None, compile: bool | str, cuda_graphs: bool) -> None:
        check_compile(compile)
        self.backbone = backbone
        self.channels_last, self.compile, self.cuda_graphs = channels_last, compile, cuda_graphs
        self.memory_format = torch.contiguous_format
        self.forward: Callable[[Tensor], Tensor] = backbone  # a function, never a submodule: checkpoints keep keys
        self.graphed: GraphedStep | None = None

    def start(self, trainer) -> None:
        """Choose the path for ``trainer`` (in ``setup("fit")``, before DDP wraps the model, so that its gradient
        buckets see the final strides) and say what it is."""
        cuda = trainer.strategy.root_device.type == "cuda"
        channels_last = cuda if self.channels_last is None else self.channels_last
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.backbone.to(memory_format=self.memory_format)
        self.forward = self.backbone
        if self.compile:
            backend = "inductor" if self.compile is True else self.compile
            self.forward = torch.compile(self.backbone.__call__, backend=backend)
            rank_zero_info(f"Training forward pass compiled with torch.compile (backend {backend}).")
        self.graphed = None
        if self.cuda_graphs:
            refusal = graph_refusal(trainer, self.compile)
            if refusal:
                rank_zero_info(f"cuda_graphs: {refusal}; the training step runs eagerly.")
            else:
                self.graphed = GraphedStep(self.backbone)
        precision = trainer.precision
        if channels_last or self.compile or self.graphed is not None or precision != "32-true":
            mode = "compiled forward" if self.compile else "eager forward and backward"
            if self.graphed is not None:
                mode = "forward and backward in a CUDA graph" if cuda else "fixed-tensor step (no CUDA, no graph)"
            rank_zero_info(
                f"Training fast path: precision {precision}, "
                f"{'channels-last' if channels_last else 'default'} memory format, {mode} "
                f"(evaluation: float32, eager, default format)."
            )

    def shape(self, trainer) -> None:
        """Once the training loader is known (``on_train_start``): a resumed optimiser state must fit the fused
        kernel, and the captured step is shaped on a full batch."""
        for optimizer in trainer.optimizers:
            match_state_strides(optimizer)
        if self.graphed is not None:
            self.graphed.rows = getattr(trainer.train_dataloader, "batch_size", None)

    def step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, bool]:
        """``(loss, logits, graphed)`` of a batch; ``graphed``: the captured step ran and wrote the gradients, so
        Lightning's ``zero_grad`` and ``backward`` must leave them alone."""
        x = x.contiguous(memory_format=self.memory_format)
        outputs = self.graphed(x, y) if self.graphed is not None else None
        if outputs is not None:
            loss, logits = outputs
            return loss, logits, True
        logits = self.forward(x)
        return F.cross_entropy(logits, y), logits, False

    def leave(self) -> None:
        """The plain network again: what runs after training runs it uncompiled, in the default memory format (the
        captured step's fixed tensors and graph memory go)."""
        self.forward = self.backbone
        self.graphed = None
        self.memory_format = torch.contiguous_format
        self.backbone.to(memory_format=self.memory_format)
