"""How far the scores of N processes are from those of one: the same checkpoint tested with every registered scorer
(`lightning-ood test`, with the same statistics) in 1 and in ``--devices`` processes, then,
per scorer, the largest difference of one image's score over every test image as a share of the scorer's largest
|score|, and the metrics that differ.

What it shows: DDP's metrics are exactly those of the union of the ranks' scores (tests/ddp/test_cli.py), but the
network sees other batches in N processes, and convolutions round by batch composition (oneDNN on a CPU, cuDNN on a
GPU): the scores agree to rounding, which some scorers magnify (distances near 0, logs of probabilities near 1) and a
scorer with a hard threshold can turn into another decision.

    python benchmarks/bench_ddp.py --devices 2                      # CPU processes (gloo)
    python benchmarks/bench_ddp.py --devices 2 --accelerator gpu    # two GPUs
    python benchmarks/bench_ddp.py --precision 64-true              # the same in float64
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lightning_ood.scoring import GROUPS

REPO = Path(__file__).resolve().parents[1]
# settings that the small synthetic training set (81 images) can fit; every other scorer with its defaults
SMALL = {"knn": {"k": 5}, "nnguide": {"k": 5, "fraction": 0.25}, "gmm": {"components": 4, "dim": 10}}
DATA = ["--data", "SyntheticDataModule", "--data.num_classes", "4", "--data.train_size", "101",
        "--data.val_split", "20", "--data.test_size", "53", "--data.ood_sizes", '{"shifted": 37, "noise": 41}',
        "--data.batch_size", "8", "--data.eval_batch_size", "8", "--model.backbone", "resnet20",
        "--trainer.enable_progress_bar", "false"]  # fmt: skip


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def run(args: list[str], devices: int, accelerator: str) -> float:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": free_port(), "PL_DISABLE_FORK": "1"}
    strategy = ["--trainer.strategy", "ddp"] if devices > 1 else []
    command = [sys.executable, "-m", "lightning_ood", *args, "--trainer.accelerator", accelerator,
               "--trainer.devices", str(devices), *strategy]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--precision", default="32-true", help="the test's precision (32-true, 64-true)")
    parser.add_argument("--out", default=".bench/ddp.json")
    args = parser.parse_args()

    scorers = json.dumps({name: {"scorer": name, **SMALL.get(name, {})} for name in GROUPS["all"]})
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        logs = ["--trainer.logger.init_args.save_dir", str(tmp / "logs")]
        run(["fit", *DATA, *logs, "--trainer.max_epochs", "1", "--model.scorers", scorers, "--checkpoint.dirpath",
             str(tmp / "ckpt")], 1, args.accelerator)  # fmt: skip
        seconds, scores, results = {}, {}, {}
        # N processes first: the statistics of these weights in this precision are the checkpoint's, or computed by
        # that run and kept in the cache, where the 1-process run finds them: both score with the same statistics
        for devices in (args.devices, 1):
            version = f"test{devices}"
            test = ["test", *DATA, *logs, "--model.scorers", scorers, "--ckpt_path", str(tmp / "ckpt" / "last.ckpt"),
                    "--trainer.precision", args.precision, "--trainer.logger.init_args.version", version,
                    "--histograms", "false", "--model.statistics_cache", str(tmp / "statistics")]  # fmt: skip
            seconds[devices] = run(test, devices, args.accelerator)
            folder_of = tmp / "logs" / "lightning_ood" / version
            scores[devices] = torch.load(folder_of / "ood_scores.pt", weights_only=True)["scores"]
            results[devices] = json.loads((folder_of / "ood_results.json").read_text())
    one, many = scores[1], scores[args.devices]
    rows = {}
    for scorer, per_set in one.items():
        scale = max(float(s.double().abs().max()) for s in per_set.values()) or 1.0
        worst = max(float((s.double() - many[scorer][name].double()).abs().max()) for name, s in per_set.items())
        metrics = results[1]["metrics"][scorer] != results[args.devices]["metrics"][scorer]
        rows[scorer] = {"largest_difference_over_scale": worst / scale, "metrics_differ": metrics}
    order = sorted(rows, key=lambda s: rows[s]["largest_difference_over_scale"], reverse=True)
    print(f"1 vs {args.devices} {args.accelerator} processes, {args.precision}, {len(rows)} scorers, 131 test images")
    for scorer in order[:12]:
        row = rows[scorer]
        print(f"  {scorer:22s} {row['largest_difference_over_scale']:9.2e}"
              f"{'  (metrics differ)' if row['metrics_differ'] else ''}")  # fmt: skip
    equal = sum(row["largest_difference_over_scale"] == 0 for row in rows.values())
    differ = sum(row["metrics_differ"] for row in rows.values())
    print(f"  bitwise equal: {equal} of {len(rows)}; metrics differ for {differ}")
    summary = {"devices": args.devices, "accelerator": args.accelerator, "precision": args.precision,
               "threads": torch.get_num_threads(), "seconds": seconds, "scorers": rows}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
