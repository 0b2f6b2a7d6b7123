"""Training-step throughput of the project's LightningModule against a plain PyTorch loop.

Same backbone, same initial weights, same in-memory data, batch size and optimiser (SGD with the paper's settings);
the first ``--warmup`` steps of each run are excluded. Runs alternate (plain, Lightning, plain, ...) to spread any
drift of the machine over both, and the ratio Lightning/plain of images per second is reported per repeat and as the
median. Target: >= 0.95.

    python benchmarks/bench_train.py --backbone resnet20 --steps 50 --repeats 7
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, Trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_ood.module import OODClassifier


class StepClock(Callback):
    """Wall time from the start of step ``warmup`` to the end of the last step."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start = self.end = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.end = time.perf_counter()


def make_loader(steps: int, batch_size: int, num_classes: int, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(steps * batch_size, 3, 32, 32, generator=generator)
    y = torch.randint(0, num_classes, (steps * batch_size,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False, num_workers=0)


def plain_loop(module: OODClassifier, loader: DataLoader, warmup: int) -> float:
    """Seconds for the timed steps of a hand-written loop doing what ``training_step`` does."""
    config = module.configure_optimizers()
    optimizer = config["optimizer"]
    model = module.backbone.train()
    start = 0.0
    for i, (x, y) in enumerate(loader):
        if i == warmup:
            start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def lightning_loop(module: OODClassifier, loader: DataLoader, warmup: int, log_dir: Path) -> float:
    clock = StepClock(warmup)
    trainer = Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=True,
        default_root_dir=str(log_dir),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock],
    )
    trainer.fit(module, train_dataloaders=loader)
    return clock.end - clock.start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet20")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=50, help="steps per run, warm-up included")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=".bench/train.json")
    args = parser.parse_args()

    torch.manual_seed(0)
    reference = OODClassifier(backbone=args.backbone, num_classes=10)
    loader = make_loader(args.steps, args.batch_size, 10)
    images = (args.steps - args.warmup) * args.batch_size
    rows = []
    for repeat in range(args.repeats):
        plain_s = plain_loop(copy.deepcopy(reference), loader, args.warmup)
        lightning_s = lightning_loop(copy.deepcopy(reference), loader, args.warmup, Path(".bench/logs"))
        rows.append({"plain_img_s": images / plain_s, "lightning_img_s": images / lightning_s})
        rows[-1]["ratio"] = rows[-1]["lightning_img_s"] / rows[-1]["plain_img_s"]
        print(
            f"repeat {repeat + 1}/{args.repeats}: plain {rows[-1]['plain_img_s']:.1f} img/s, "
            f"lightning {rows[-1]['lightning_img_s']:.1f} img/s, ratio {rows[-1]['ratio']:.3f}"
        )
    ratios = [r["ratio"] for r in rows]
    summary = {
        "backbone": args.backbone,
        "batch_size": args.batch_size,
        "timed_steps": args.steps - args.warmup,
        "threads": torch.get_num_threads(),
        "median_ratio": statistics.median(ratios),
        "min_ratio": min(ratios),
        "max_ratio": max(ratios),
        "repeats": rows,
    }
    print(
        f"\nLightning / plain PyTorch training throughput ({args.backbone}, batch {args.batch_size}, "
        f"{torch.get_num_threads()} threads): median {summary['median_ratio']:.3f} "
        f"(min {summary['min_ratio']:.3f}, max {summary['max_ratio']:.3f}; target >= 0.95)"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
