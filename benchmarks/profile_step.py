"""Where the time of one training step goes: ``fit`` of :class:`OODClassifier` on CIFAR images, profiled by
``torch.profiler`` for a few steps after a warm-up, once per mode (``eager``: the fast path of ``fit`` as configured
by default; ``cuda_graphs``: ``model.cuda_graphs``).

Per step it reports the wall time, the host's operator calls (each one a kernel launch or more on a GPU), and on a GPU
the kernels' device time (how busy the GPU is), the launches (``cudaLaunchKernel`` and friends, ``cudaGraphLaunch``)
and the calls that make the host wait for the device (stream, device and event synchronisations, synchronous copies).

    python benchmarks/profile_step.py --data ../shared/data/cifar10-jpeg --modes eager cuda_graphs
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import torch
from bench_train import device_name, synchronize  # a sibling script: run as benchmarks/profile_step.py
from lightning.pytorch import Callback, Trainer
from torch.profiler import ProfilerActivity, profile

from lightning_ood.cli import fast_benchmark, fast_precision
from lightning_ood.data import CIFARDataModule
from lightning_ood.module import OODClassifier

LAUNCHES = (
    "cudaLaunchKernel",
    "cuLaunchKernel",
    "cudaLaunchKernelExC",
    "cuLaunchKernelEx",
    "cudaLaunchCooperativeKernel",
)
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy", "cudaStreamWaitEvent")


class ProfileSteps(Callback):
    """Profiles training batches ``warmup .. warmup + steps - 1`` and stops the fit after them."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps = warmup, steps
        self.profiler: profile | None = None
        self.wall = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if batch_idx == self.warmup:
            synchronize()
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.profiler = profile(activities=activities)
            self.profiler.__enter__()
            self.wall = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if batch_idx == self.warmup + self.steps - 1 and self.profiler is not None:
            synchronize()
            self.wall = time.perf_counter() - self.wall
            self.profiler.__exit__(None, None, None)
            trainer.should_stop = True


def summarise(profiler: profile, steps: int, wall: float) -> dict:
    """Per-step figures of the profiled events."""
    events = profiler.events()
    calls, kernels, kernel_us, sync_us = Counter(), 0, 0.0, 0.0
    for event in events:
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels += 1
            kernel_us += event.device_time_total if hasattr(event, "device_time_total") else event.cuda_time_total
            continue
        calls[event.name] += 1
        if event.name in SYNCS:
            sync_us += event.cpu_time_total
    operators = sum(n for name, n in calls.items() if name.startswith("aten::"))
    return {
        "wall_ms": 1e3 * wall / steps,
        "aten_ops": operators / steps,
        "kernels": kernels / steps,
        "kernel_ms": kernel_us / 1e3 / steps,
        "gpu_busy": (kernel_us / 1e6) / wall if wall else 0.0,
        "launches": sum(calls[name] for name in LAUNCHES) / steps,
        "graph_launches": calls["cudaGraphLaunch"] / steps,
        "syncs": {name: calls[name] / steps for name in SYNCS if calls[name]},
        "sync_ms": sync_us / 1e3 / steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/cifar10-jpeg")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=20, help="unprofiled steps first (the graph's capture)")
    parser.add_argument("--steps", type=int, default=20, help="profiled steps")
    parser.add_argument("--modes", nargs="+", default=["eager", "cuda_graphs"], choices=["eager", "cuda_graphs"])
    parser.add_argument("--cache", default=".bench/decoded", help="decoded-image cache of the tensor pipeline")
    parser.add_argument("--out", default=".bench/profile_step.json")
    parser.add_argument("--trace", help="folder for Chrome traces (one per mode)")
    args = parser.parse_args()
    if not (Path(args.data) / "train").is_dir():
        raise SystemExit(f"error: {args.data}/train not found: --data takes an image-folder copy of CIFAR-10")

    cuda = torch.cuda.is_available()
    device = device_name(torch.device("cuda" if cuda else "cpu")) + f", {torch.get_num_threads()} threads"
    precision = fast_precision("fit", None, "auto")
    benchmark = fast_benchmark("fit", None, None, "auto")
    datamodule = CIFARDataModule(root=args.data, batch_size=args.batch_size, decoded_cache=args.cache)
    results = {}
    for mode in args.modes:
        torch.manual_seed(0)
        module = OODClassifier(backbone=args.backbone, num_classes=10, scorers=["msp"],
                               cuda_graphs=mode == "cuda_graphs")  # fmt: skip
        probe = ProfileSteps(args.warmup, args.steps)
        trainer = Trainer(max_epochs=1, accelerator="auto", devices=1, logger=False, precision=precision,
                          benchmark=benchmark, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, num_sanity_val_steps=0, callbacks=[probe])  # fmt: skip
        trainer.fit(module, datamodule=datamodule)
        if probe.profiler is None:
            raise SystemExit(f"error: fewer than {args.warmup + args.steps} batches to profile")
        results[mode] = summarise(probe.profiler, args.steps, probe.wall)
        if args.trace:
            Path(args.trace).mkdir(parents=True, exist_ok=True)
            probe.profiler.export_chrome_trace(str(Path(args.trace) / f"{mode}.json"))
        r = results[mode]
        gpu = (
            f", {r['launches']:.0f} kernel launches + {r['graph_launches']:.0f} graph launches, {r['kernels']:.0f} "
            f"kernels for {r['kernel_ms']:.2f} ms (GPU busy {100 * r['gpu_busy']:.0f}%), synchronisations "
            f"{r['syncs'] or 'none'} ({r['sync_ms']:.2f} ms)"
        )
        print(
            f"{mode:12s} {r['wall_ms']:7.2f} ms/step ({args.batch_size * 1e3 / r['wall_ms']:.0f} images/s), "
            f"{r['aten_ops']:.0f} host operator calls{gpu if cuda else ''}",
            flush=True,
        )
    summary = {"device": device, "backbone": args.backbone, "batch_size": args.batch_size,
               "precision": precision or "32-true", "cudnn_benchmark": bool(benchmark), "warmup": args.warmup,
               "steps": args.steps, "modes": results}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(
        f"{device}, {args.backbone}, batch {args.batch_size}, precision {summary['precision']}: written to {args.out}"
    )


if __name__ == "__main__":
    main()
