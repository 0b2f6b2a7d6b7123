"""Cost of each scorer on cached features, as a user's test pass scores them: N feature vectors (by default 300,000:
L = 512, C = 100) scored in chunks of 65,536 vectors (a feature cache's chunks; ``--chunk`` for others) by every
scorer that works on features and logits, against the bare head product ``h @ W.T + b`` on the same chunks.

The features look like a trained network's penultimate layer: non-negative (after ReLU and pooling), units of
unequal scale (log-normal), a third near zero; half of them are ID-like (around one of C class centres), half
OOD-like (no class centre). The head is scaled so that an ID vector's top logit stands about 10 above the mean of its
logits, as a trained CIFAR network's do (an unscaled random head spreads logits over ~185, exp(-185) is a subnormal
float and x86 computes those ~10x slower: an artefact no real head produces). The statistics come from ``--train``
ID-like "training" features (the bank scorers search all of them, so their cost grows with it: KNN, Relation and
OpenMax read the bank by definition, NNGuide 1% of it). Reports seconds and the ratio to the head product.

    python benchmarks/bench_score.py                        # 300,000 vectors, chunks of 65,536, every scorer
    python benchmarks/bench_score.py --only fmls mahalanobis --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from lightning_ood.errors import FitError
from lightning_ood.scoring import GROUPS, build_scorer
from lightning_ood.scoring.base import Batch
from lightning_ood.statistics import FeatureStatistics, ReferenceSet


def wall(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def timed_pair(fn, baseline, repeats: int) -> tuple[float, float]:
    """Median seconds of ``fn`` and of ``baseline``, run alternately."""
    first, second = [], []
    for _ in range(repeats):
        first.append(wall(fn))
        second.append(wall(baseline))
    return statistics.median(first), statistics.median(second)


def realistic_features(n: int, n_train: int, dim: int, classes: int, chunk: int):
    """A head, ID-like training features with labels, and ``n`` test features (half ID-like, half OOD-like) with
    their logits; see the module docstring."""
    scale = torch.randn(dim).mul_(0.5).exp_()  # units of unequal scale
    centres = (torch.randn(classes, dim) - 0.3).relu_() * scale  # each class lights up its own units

    def draw(count: int, ood: bool) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(classes, (count,))
        centre = centres.mean(0).expand(count, dim) if ood else centres[y]
        return (centre + torch.randn(count, dim) * scale * 0.6).relu_(), y

    train, labels = draw(n_train, ood=False)
    head = nn.Linear(dim, classes)
    with torch.no_grad():
        head.weight.copy_(centres - centres.mean(0))
        head.bias.zero_()
        id_logits = head(train)
        margin = (id_logits.max(1).values - id_logits.mean(1)).mean()
        head.weight.mul_(10.0 / margin)  # an ID vector's top logit about 10 above the mean of its logits
        features = torch.cat([draw(n - n // 2, ood=False)[0], draw(n // 2, ood=True)[0]])
        logits = torch.cat([head(part) for part in features.split(chunk)])
    return head, train, labels, features, logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=300_000, help="feature vectors scored")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--train", type=int, default=10_000, help="training features (the bank)")
    parser.add_argument("--chunk", type=int, default=65_536, help="vectors per call (a feature cache's chunk)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*", help="score only these scorers")
    parser.add_argument("--out", default=".bench/score.json")
    args = parser.parse_args()

    torch.manual_seed(0)
    head, train, labels, features, logits = realistic_features(args.n, args.train, args.dim, args.classes, args.chunk)
    chunks = list(zip(features.split(args.chunk), logits.split(args.chunk), strict=True))
    weight, bias = head.weight.detach(), head.bias.detach()

    def bare_head() -> None:
        for h, _ in chunks:
            torch.addmm(bias, h, weight.T)

    rows = {}
    scorers = {name: build_scorer(name) for name in args.only or GROUPS["all"]}
    scorers = {  # those that read inputs or block outputs are not a cost on cached features (see bench_eval.py)
        name: scorer
        for name, scorer in scorers.items()
        if not (
            scorer.needs.inputs
            or name in ("featurenorm", "gram", "rankfeat", "rankfeat_block4", "mds_ensemble")
            or getattr(scorer, "where", None) == "map"
            or (name == "bats" and scorer.statistics == "bn")
        )
    }
    extras = set().union(*(scorer.needs.statistics for scorer in scorers.values()))
    stats = FeatureStatistics.from_features(train, labels, args.classes, head, extras)  # once, for every scorer
    with torch.no_grad():
        stats.reference["id_val"] = ReferenceSet(train[:2000], head(train[:2000]), labels[:2000])
    refused = {}
    for name, scorer in scorers.items():
        try:
            scorer = scorer.fit_statistics(stats, head)
        except FitError as err:  # e.g. nnguide's 1% of a small --train holds fewer features than its k
            refused[name] = str(err)
            print(f"{name:14s} not timed: its fit is refused on these statistics: {err}", flush=True)
            continue

        def run(scorer=scorer) -> None:
            with torch.no_grad():
                for h, z in chunks:
                    scorer(Batch(h, z))

        repeats = args.repeats if name not in ("knn", "relation", "openmax", "cfood") else 1
        seconds, baseline = timed_pair(run, bare_head, repeats)  # side by side: the ratio survives a busy machine
        rows[name] = {"seconds": seconds, "head_seconds": baseline, "ratio": seconds / baseline}
        print(f"{name:14s} {seconds:8.3f}s  {seconds / baseline:8.2f}x the head product ({baseline:.3f}s)", flush=True)
    baseline = statistics.median(row["head_seconds"] for row in rows.values())
    summary = {"n": args.n, "dim": args.dim, "classes": args.classes, "train": args.train, "chunk": args.chunk,
               "threads": torch.get_num_threads(), "head_seconds": baseline, "scorers": rows,
               "refused": refused}  # fmt: skip
    print(
        f"\nbare head product: {baseline:.3f}s (median) for {args.n} vectors ({args.dim}-d, {args.classes} classes) "
        f"in chunks of {args.chunk}, {torch.get_num_threads()} threads"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
