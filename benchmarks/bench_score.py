"""Cost of each scorer on cached features: N feature vectors (L = 512, C = 100 by default, 1M of them) scored by every
scorer that works on features and logits, against the bare head matmul ``h @ W.T + b`` on the same vectors.

The statistics come from random "training" features (``--train`` of them; the bank scorers search all of them, so
their cost grows with it: KNN, Relation and OpenMax read the bank by definition, NNGuide 1% of it). Scores are computed
in chunks of ``--chunk`` vectors, as the test pass sees batches. Reports seconds and the ratio to the head matmul.

    python benchmarks/bench_score.py --n 1000000 --dim 512 --classes 100 --train 10000
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from lightning_ood.scoring import GROUPS, build_scorer
from lightning_ood.scoring.base import Batch
from lightning_ood.statistics import FeatureStatistics, ReferenceSet


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="feature vectors scored")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--train", type=int, default=10_000, help="training features (the bank)")
    parser.add_argument("--chunk", type=int, default=4096, help="vectors per call, as test batches")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*", help="score only these scorers")
    parser.add_argument("--out", default=".bench/score.json")
    args = parser.parse_args()

    torch.manual_seed(0)
    head = nn.Linear(args.dim, args.classes)
    centres = torch.rand(args.classes, args.dim) * 2
    labels = torch.arange(args.train) % args.classes
    with torch.no_grad():
        # Scaled so that each vector's logits spread over about 20, as a trained CIFAR network's do. Unscaled they
        # spread over ~185, exp(-185) is a subnormal float, and x86 computes with those ~10x slower: the cost of
        # every softmax and logsumexp would then be an artefact that no real head produces.
        head.weight.copy_((centres - 0.5 * centres.mean(0)) * 0.1)
        train = (centres[labels] + torch.randn(args.train, args.dim)).relu()
        features = (centres[torch.randint(args.classes, (args.n,))] + torch.randn(args.n, args.dim) * 1.5).relu()
        logits = torch.cat([head(chunk) for chunk in features.split(args.chunk)])
    chunks = list(zip(features.split(args.chunk), logits.split(args.chunk), strict=True))
    weight, bias = head.weight.detach(), head.bias.detach()

    def bare_head() -> None:
        for h, _ in chunks:
            torch.addmm(bias, h, weight.T)

    baseline = timed(bare_head, args.repeats)
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
    for name, scorer in scorers.items():
        scorer = scorer.fit_statistics(stats, head)

        def run(scorer=scorer) -> None:
            with torch.no_grad():
                for h, z in chunks:
                    scorer(Batch(h, z))

        seconds = timed(run, args.repeats if name not in ("knn", "relation", "openmax", "cfood") else 1)
        rows[name] = {"seconds": seconds, "ratio": seconds / baseline}
        print(f"{name:14s} {seconds:8.3f}s  {seconds / baseline:8.2f}x the head matmul", flush=True)
    summary = {"n": args.n, "dim": args.dim, "classes": args.classes, "train": args.train, "chunk": args.chunk,
               "threads": torch.get_num_threads(), "head_seconds": baseline, "scorers": rows}  # fmt: skip
    print(f"\nbare head matmul: {baseline:.3f}s for {args.n} vectors ({args.dim}-d, {args.classes} classes)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
