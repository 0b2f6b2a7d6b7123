"""The forward and backward pass of a training step captured once in a CUDA graph and replayed for every batch.

A CIFAR network at batch 128 keeps a large GPU waiting on the host: each step queues hundreds of small kernels, one
Python call at a time. Captured in a CUDA graph, the forward pass, the loss and the backward pass are queued by one
call. What changes nothing in the result:

- the batch is copied into fixed input tensors, the pass writes the loss, the logits and every parameter's gradient
  into fixed output tensors (the parameters' ``.grad`` during the step), so the optimiser step that follows (the
  fused SGD kernel, one launch) and the metrics read them as after an eager step;
- the first ``warmup`` batches run the same pass uncaptured on the capture stream (lazy initialisation and cuDNN's
  algorithm search happen outside the capture); they are real training steps;
- a batch of another shape (the last, smaller one of an epoch) returns ``None`` and the caller runs it eagerly.

The replayer is the seam: :class:`CudaGraphReplayer` captures and replays on a GPU; :class:`EagerReplayer` runs the
same function on every call, with the same fixed tensors, so a CPU test checks that the static-tensor step trains
exactly as the eager one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Outputs = tuple[Tensor, Tensor]  # (loss, logits)


class EagerReplayer:
    """Runs the step function at every replay, uncaptured: the same tensors as a graph, without the graph."""

    def stream(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def capture(self, step: Callable[[], Outputs]) -> None:
        self.step = step

    def replay(self) -> Outputs:
        return self.step()


class CudaGraphReplayer:
    """Captures the step function in a CUDA graph on its own stream (where the warm-up also runs) and replays it."""

    def __init__(self) -> None:
        self.side = torch.cuda.Stream()
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: Outputs | None = None

    @contextlib.contextmanager
    def stream(self):
        """Run on the capture stream, ordered after what the current stream queued and before what it queues next."""
        current = torch.cuda.current_stream()
        self.side.wait_stream(current)
        with torch.cuda.stream(self.side):
            yield
        current.wait_stream(self.side)

    def capture(self, step: Callable[[], Outputs]) -> None:
        torch.cuda.current_stream().synchronize()  # once: the capture must not see work in flight
        graph = torch.cuda.CUDAGraph()
        # thread_local: the loader's pin-memory thread may call the CUDA API during the capture (global mode would
        # make those calls, or the capture, fail); the capture follows the stream, so backward's threads are in it
        with torch.cuda.graph(graph, stream=self.side, capture_error_mode="thread_local"):
            self.outputs = step()  # recorded, not run: replay() runs it
        self.graph = graph

    def replay(self) -> Outputs:
        self.graph.replay()
        return self.outputs


def replayer_for(device: torch.device) -> EagerReplayer | CudaGraphReplayer:
    return CudaGraphReplayer() if device.type == "cuda" else EagerReplayer()


class GraphedStep:
    """Forward, cross-entropy loss and backward of ``network`` on fixed tensors, captured after ``warmup`` steps.

    Call it with a batch: it returns ``(loss, logits)`` with the gradients in every parameter's ``.grad`` (write-once
    tensors: the next call overwrites them), or ``None`` for a batch whose shape or dtype differs from the captured
    one (run that step eagerly). ``rows``: the loader's batch size, when known: the fixed tensors are not shaped on a
    smaller batch (a run resumed on an epoch's last batch would otherwise capture that size)."""

    def __init__(self, network: nn.Module, warmup: int = 3, replayer: EagerReplayer | CudaGraphReplayer | None = None):
        self.network = network
        self.warmup = warmup
        self.rows: int | None = None
        self.replayer = replayer
        self.params = [p for p in network.parameters() if p.requires_grad]
        self.steps = 0
        self.captured = False
        self.x: Tensor | None = None
        self.y: Tensor | None = None
        self.grads: list[Tensor] = []
        self.autocast: tuple[str, torch.dtype] | None = None

    def fits(self, x: Tensor, y: Tensor) -> bool:
        if self.x is None:
            return self.rows is None or len(x) == self.rows
        same = lambda a, b: a.shape == b.shape and a.dtype == b.dtype and a.stride() == b.stride()  # noqa: E731
        return same(self.x, x) and same(self.y, y)

    def __call__(self, x: Tensor, y: Tensor) -> Outputs | None:
        if not self.fits(x, y):
            return None
        if self.x is None:
            self.start(x, y)
        self.x.copy_(x)
        self.y.copy_(y)
        for p, g in zip(self.params, self.grads, strict=True):  # Lightning's zero_grad sets them to None
            p.grad = g
        self.steps += 1
        if self.steps <= self.warmup:
            with self.replayer.stream():
                return self.step()
        if not self.captured:
            self.replayer.capture(self.step)
            self.captured = True
        return self.replayer.replay()

    def start(self, x: Tensor, y: Tensor) -> None:
        """Fixed tensors shaped as the first batch; the autocast in force then is the one captured."""
        if self.replayer is None:
            self.replayer = replayer_for(x.device)
        self.x = torch.empty_like(x)  # same strides: a channels-last batch stays channels-last
        self.y = torch.empty_like(y)
        self.grads = [torch.zeros_like(p) for p in self.params]
        device = x.device.type
        if torch.is_autocast_enabled(device):
            self.autocast = (device, torch.get_autocast_dtype(device))

    def step(self) -> Outputs:
        """The pass the graph holds; writes the gradients into the fixed ``.grad`` tensors."""
        autocast = (
            torch.autocast(self.autocast[0], dtype=self.autocast[1], cache_enabled=False)
            if self.autocast is not None
            else contextlib.nullcontext()
        )
        with torch.enable_grad(), autocast:
            logits = self.network(self.x)
            loss = F.cross_entropy(logits, self.y)
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        for g, new in zip(self.grads, grads, strict=True):
            if new is None:
                g.zero_()
            else:
                g.copy_(new)
        return loss.detach(), logits.detach()
