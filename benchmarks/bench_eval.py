"""Cost of the one-pass OOD evaluation.

(a) one plain forward pass (``backbone(x)``) over the ID and OOD images;
(b) the full evaluation, ``trainer.test`` of :class:`OODClassifier` with every scorer that needs no input gradients
    (the paper's and every OpenOOD / pytorch-ood method that reads features, logits or block outputs: one backbone
    pass shared by all of them, metric updates, synchronised compute, report), with what is fitted once already
    fitted: a first run fits the training statistics and measures the reference ID images (``reference:
    id_val``); it is timed and reported on its own, not counted in b;
(c) with ``--per-scorer``: a forward pass per scorer, as OpenOOD's evaluator does (each postprocessor runs the
    network again).

Reports b/a (target <= 1.3) and c/b. Images are generated in memory so that every mode sees the same tensors and
no decoding cost hides the overhead; the timing does not depend on image content. The default network is the
paper's CIFAR ResNet-18; ``--scorers paper`` measures the paper's methods only. ``--device`` (default: CUDA when
available, else the CPU) runs all three there.

    python benchmarks/bench_eval.py --backbone resnet18 --id-size 1000 --ood-size 1000 --ood-sets 3 --repeats 3
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

import torch
from bench_train import device_name  # a sibling script: run as benchmarks/bench_eval.py
from lightning.pytorch import Trainer

from lightning_ood.data import SyntheticDataModule
from lightning_ood.hooks import block_outputs
from lightning_ood.models import build_backbone
from lightning_ood.module import OODClassifier
from lightning_ood.scoring import GROUPS, build_scorer
from lightning_ood.scoring.base import Batch


def feature_scorers(group: str = "all") -> list[str]:
    """Every scorer of ``group`` that needs no input gradients (ODIN-type scorers run their own passes), and
    FeatureNorm with a fixed block."""
    return [name for name in GROUPS[group] if not build_scorer(name).needs.inputs]


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that the clock reads what was done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def plain_forward(module: OODClassifier, loaders, device: torch.device) -> float:
    module.to(device)  # the Trainer of (b) leaves the module on the CPU
    synchronize(device)
    start = time.perf_counter()
    for loader in loaders:
        for x, *_ in loader:
            module.backbone(x.to(device))
    synchronize(device)
    return time.perf_counter() - start


@torch.no_grad()
def calibrate_batchnorm(module: OODClassifier, loader, device: torch.device, batches: int = 4) -> None:
    """BatchNorm running statistics from a few training batches (cumulative average), so that the untrained
    network's activations have a trained network's scale (an untrained DenseNet-BC's grow to ~1e5 over its 100
    layers)."""
    norms = {m: m.momentum for m in module.backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    module.backbone.train()
    for x, *_ in itertools.islice(loader, batches):
        module.backbone(x.to(device))
    module.backbone.eval()
    for norm, momentum in norms.items():
        norm.momentum = momentum


def full_evaluation(module: OODClassifier, datamodule: SyntheticDataModule, device: torch.device) -> float:
    trainer = Trainer(
        accelerator=device.type,
        devices=[device.index] if device.index is not None else 1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        inference_mode=False,
    )
    start = time.perf_counter()
    trainer.test(module, datamodule=datamodule, verbose=False)
    return time.perf_counter() - start


@torch.no_grad()
def forward_per_scorer(module: OODClassifier, loaders, device: torch.device) -> float:
    """Each scorer of the module with its own forward pass (the references fitted by (b) are reused)."""
    module.to(device)
    synchronize(device)
    start = time.perf_counter()
    for scorer in module.scorers.values():
        for loader in loaders:
            for x, *_ in loader:
                x = x.to(device)
                with block_outputs(module.backbone, scorer.needs.blocks) as blocks:
                    features = module.backbone.features(x)
                scorer(Batch(features, module.backbone.head(features), blocks))
    synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--id-size", type=int, default=1000)
    parser.add_argument("--ood-size", type=int, default=1000)
    parser.add_argument("--ood-sets", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--per-scorer", action="store_true", help="also (c), a forward pass per scorer (slow)")
    parser.add_argument("--scorers", default="all", choices=sorted(GROUPS), help="which scorers (group)")
    parser.add_argument("--without", nargs="*", default=[], metavar="SCORER", help="leave these scorers out")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:N")
    parser.add_argument("--out", default=".bench/eval.json")
    args = parser.parse_args()
    device = torch.device(args.device)

    torch.manual_seed(0)
    names = feature_scorers(args.scorers)
    unknown = sorted(set(args.without) - set(names))
    if unknown:
        parser.error(f"--without: {', '.join(unknown)} not among the measured scorers ({', '.join(names)})")
    names = [name for name in names if name not in args.without]
    datamodule = SyntheticDataModule(
        num_classes=10,
        train_size=2000,
        test_size=args.id_size,
        ood_sizes={f"noise{i}" if i % 2 else f"shifted{i}": args.ood_size for i in range(args.ood_sets)},
        batch_size=args.batch_size,
        eval_batch_size=args.batch_size,
    )
    datamodule.setup("test")
    blocks = list(build_backbone(args.backbone, 10).blocks())
    block = "layer3.0" if "layer3.0" in blocks else blocks[-2]  # FeatureNorm's block, fixed (NormRatio costs passes)
    specs = {name: ({"block": block} if name == "featurenorm" else {}) for name in names}
    module = OODClassifier(backbone=args.backbone, num_classes=10, scorers=specs).eval().to(device)
    calibrate_batchnorm(module, datamodule.statistics_dataloader(), device)
    loaders = datamodule.test_dataloader()
    images = sum(len(loader.dataset) for loader in loaders)

    first = full_evaluation(module, datamodule, device)
    print(f"first evaluation (fits the statistics, measures the reference images): {first:.2f}s")
    runs = {"a_forward": [], "b_full": [], "c_per_scorer": []}
    for repeat in range(args.repeats):
        runs["a_forward"].append(plain_forward(module, loaders, device))
        runs["b_full"].append(full_evaluation(module, datamodule, device))
        if args.per_scorer:
            runs["c_per_scorer"].append(forward_per_scorer(module, loaders, device))
        print(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in runs.items() if v))
    median = {k: statistics.median(v) for k, v in runs.items() if v}
    summary = {
        "backbone": args.backbone,
        "device": str(device),
        "device_name": device_name(device),
        "precision": "32-true",  # evaluation scores in float32 whatever the Trainer's precision (module.score_batch)
        "compile": False,  # evaluation runs the network as it is (the compile switch is for training)
        "images": images,
        "scorers": names,
        "threads": torch.get_num_threads(),
        "first_evaluation_seconds": first,
        "seconds": runs,
        "median_seconds": median,
        "b_over_a": median["b_full"] / median["a_forward"],
        "a_img_s": images / median["a_forward"],
        "b_img_s": images / median["b_full"],
    }
    if "c_per_scorer" in median:
        summary["c_over_b"] = median["c_per_scorer"] / median["b_full"]
    print(
        f"\n{len(names)} scorers, {images} images, {args.backbone}, {summary['device_name']}, "
        f"{torch.get_num_threads()} threads, precision float32, compile off (median of {args.repeats}):\n"
        f"  (a) plain forward       {median['a_forward']:.2f}s  {summary['a_img_s']:.0f} images/s\n"
        f"  (b) full evaluation     {median['b_full']:.2f}s  {summary['b_img_s']:.0f} images/s   "
        f"b/a = {summary['b_over_a']:.3f} (target <= 1.3)"
    )
    if "c_over_b" in summary:
        print(f"  (c) forward per scorer  {median['c_per_scorer']:.2f}s   c/b = {summary['c_over_b']:.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
