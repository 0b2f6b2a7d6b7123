"""Training throughput on real images: the project's ``fit`` against a plain PyTorch loop, side by side.

- (a) ``fit``: :class:`OODClassifier` + :class:`CIFARDataModule` (the default tensor pipeline: images decoded once,
  per-image crop and flip on whole batches on the training device) in Lightning's Trainer, as the CLI builds it;
- (b) a plain loop over the same decoded uint8 images in memory: a seeded permutation, the batch gathered, a random
  4-pixel-padded crop and a horizontal flip per image written here with torch ops, normalisation, forward, backward,
  SGD step; same model, initial weights, batch size and optimiser;
- (c) ``fit`` with the previous pipeline (``pipeline: pil``: JPEG decoding, PIL crop and flip per image in loader
  workers), for the speed-up.

Each run trains two epochs of ``--batches`` batches and times the second, so decoding once does not count; runs
alternate and repeat. Target: (a) / (b) >= 0.9 in images per second (>= 0.95 on a GPU). On a CUDA GPU both (a) and
(b) run the fast path of ``fit`` (bf16 autocast, channels-last, fused SGD; ``--compile`` adds torch.compile to both);
``--cuda-graphs`` runs (a) with ``model.cuda_graphs`` (forward and backward replayed from a CUDA graph) while (b) stays
eager. Prints the device, precision, compile mode and images per second.

    python benchmarks/bench_train.py --data ../shared/data/cifar10-jpeg --batches 100 --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, Trainer

from lightning_ood.cli import fast_precision
from lightning_ood.data import CIFARDataModule
from lightning_ood.module import OODClassifier


class EpochClock(Callback):
    """Wall time of the last training epoch."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.start = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        synchronize()
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        synchronize()
        self.seconds = time.perf_counter() - self.start


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})"


def synchronize() -> None:
    """Wait for queued GPU work, so that the clock reads what was done."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def fit_epoch(module: OODClassifier, datamodule: CIFARDataModule, batches: int, precision: str | None) -> float:
    clock = EpochClock()
    trainer = Trainer(max_epochs=2, limit_train_batches=batches, accelerator="auto", devices=1, logger=False,
                      precision=precision,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, callbacks=[clock])  # fmt: skip
    trainer.fit(module, datamodule=datamodule)
    return clock.seconds


def plain_epochs(module: OODClassifier, images: torch.Tensor, labels: torch.Tensor, batches: int, batch_size: int,
                 normalization, device: torch.device, compile: bool) -> float:  # fmt: skip
    """Two epochs of a hand-written loop doing what ``fit`` does; seconds of the second."""
    fast = device.type == "cuda"
    memory_format = torch.channels_last if fast else torch.contiguous_format
    model = module.backbone.to(device, memory_format=memory_format).train()
    forward = torch.compile(model) if compile else model
    optimizer = module.configure_optimizers()["optimizer"]
    mean = torch.tensor(normalization.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(normalization.std, device=device).view(1, 3, 1, 1)
    generator = torch.Generator().manual_seed(0)
    seconds = 0.0
    for _ in range(2):
        synchronize()
        start = time.perf_counter()
        order = torch.randperm(len(images), generator=generator)[: batches * batch_size]
        for batch in order.split(batch_size):
            x, y = images[batch], labels[batch]
            if fast:  # as the loader of fit does: a pinned batch, copied asynchronously
                x, y = x.pin_memory(), y.pin_memory()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            n = len(x)
            dx, dy = torch.randint(0, 9, (n,), device=device), torch.randint(0, 9, (n,), device=device)
            flip = torch.rand(n, device=device) < 0.5
            padded = F.pad(x, (4, 4, 4, 4))
            rows = dy[:, None] + torch.arange(32, device=device)
            cols = torch.arange(32, device=device).expand(n, 32)
            cols = dx[:, None] + torch.where(flip[:, None], 31 - cols, cols)
            batch_index = torch.arange(n, device=device)[:, None, None, None]
            channel_index = torch.arange(3, device=device)[None, :, None, None]
            x = padded[batch_index, channel_index, rows[:, None, :, None], cols[:, None, None, :]]
            x = ((x.float() / 255 - mean) / std).contiguous(memory_format=memory_format)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=fast):
                loss = F.cross_entropy(forward(x), y)
            loss.backward()
            optimizer.step()
        synchronize()
        seconds = time.perf_counter() - start
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/cifar10-jpeg")
    parser.add_argument("--backbone", default="resnet20")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=100, help="batches per epoch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-pil", action="store_true", help="skip (c), the slowest")
    parser.add_argument("--compile", action="store_true", help="torch.compile the training forward in (a) and (b)")
    parser.add_argument("--cuda-graphs", action="store_true", help="(a) with model.cuda_graphs; (b) stays eager")
    parser.add_argument("--cache", default=".bench/decoded", help="decoded-image cache of the tensor pipeline")
    parser.add_argument("--out", default=".bench/train.json")
    args = parser.parse_args()
    if not (Path(args.data) / "train").is_dir():
        raise SystemExit(f"error: {args.data}/train not found: --data takes an image-folder copy of CIFAR-10")

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reference = OODClassifier(backbone=args.backbone, num_classes=10, scorers=["msp"], compile=args.compile,
                              cuda_graphs=args.cuda_graphs)  # fmt: skip
    precision = fast_precision("fit", None, "auto")  # what the CLI sets: bf16-mixed on CUDA, else None
    tensors = CIFARDataModule(root=args.data, batch_size=args.batch_size, decoded_cache=args.cache)
    tensors.setup("fit")
    images, labels = tensors.decoded(True)
    pil = CIFARDataModule(root=args.data, batch_size=args.batch_size, pipeline="pil")
    per_epoch = args.batches * args.batch_size
    rows = []
    for repeat in range(args.repeats):
        row = {"plain_img_s": per_epoch / plain_epochs(copy.deepcopy(reference), images, labels, args.batches,
                                                        args.batch_size, tensors.default_normalization, device,
                                                        args.compile)}  # fmt: skip
        row["fit_img_s"] = per_epoch / fit_epoch(copy.deepcopy(reference), tensors, args.batches, precision)
        if not args.skip_pil:
            row["fit_pil_img_s"] = per_epoch / fit_epoch(copy.deepcopy(reference), pil, args.batches, precision)
            row["speedup_over_pil"] = row["fit_img_s"] / row["fit_pil_img_s"]
        row["ratio"] = row["fit_img_s"] / row["plain_img_s"]
        rows.append(row)
        print(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()), flush=True)
    summary = {
        "data": args.data, "backbone": args.backbone, "batch_size": args.batch_size, "batches": args.batches,
        "device": str(device), "device_name": device_name(device), "precision": precision or "32-true",
        "compile": args.compile, "cuda_graphs": args.cuda_graphs, "threads": torch.get_num_threads(), "repeats": rows,
        "median_ratio": statistics.median(r["ratio"] for r in rows),
        "median_fit_img_s": statistics.median(r["fit_img_s"] for r in rows),
        "median_plain_img_s": statistics.median(r["plain_img_s"] for r in rows),
    }  # fmt: skip
    if not args.skip_pil:
        summary["median_speedup_over_pil"] = statistics.median(r["speedup_over_pil"] for r in rows)
    speedup = "" if args.skip_pil else f"; tensor / PIL pipeline: {summary['median_speedup_over_pil']:.2f}x"
    target = 0.95 if device.type == "cuda" else 0.9
    print(
        f"\n{args.backbone}, batch {args.batch_size}, {summary['device_name']}, {torch.get_num_threads()} threads, "
        f"precision {summary['precision']}, compile {'on' if args.compile else 'off'}, "
        f"CUDA graphs {'on' if args.cuda_graphs else 'off'} (fit only), second epoch, median of {args.repeats}:\n"
        f"  fit {summary['median_fit_img_s']:.0f} images/s, plain loop {summary['median_plain_img_s']:.0f} images/s, "
        f"fit / plain {summary['median_ratio']:.3f} (target >= {target}){speedup}"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
