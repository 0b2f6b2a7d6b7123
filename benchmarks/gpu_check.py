"""GPU check: the project's commands and benchmarks on one CUDA GPU in a few minutes, each step timed and checked.

Steps (each a child process with its own timeout; a step that fails does not stop the independent ones after it):

- ``env``: Python, torch, lightning, torchmetrics versions, the GPU (``--allow-cpu``: go on without one, a dry run);
- ``fit``: ResNet-18 (``configs/cifar10_resnet18.yaml``, every scorer's statistics) for ``--epochs`` on an
  image-folder CIFAR-10: per-epoch time, images/s, validation accuracy, the statistics pass;
- ``fit_graphs``: the same run with ``--model.cuda_graphs true`` (forward and backward replayed from a CUDA graph):
  the same figures, and the epoch time and accuracy against ``fit``'s;
- ``test``: that checkpoint with every scorer on the ID test set, MNIST, Fashion-MNIST and Gaussian noise: the results
  file must hold a finite AUROC for every scorer and OOD set;
- ``test_no_stats``: a copy of the checkpoint without its OOD statistics, so that ``test`` computes them first (a few
  scorers; their AUROCs are compared with ``test``'s);
- ``tune`` (the paper's p and lambda; FeatureNorm's block by NormRatio), ``sweep``: the OOD commands on the
  checkpoint;
- ``bench_train``, ``bench_train_graphs``, ``bench_eval``: ``benchmarks/bench_train.py`` (eager, then with
  ``--cuda-graphs``) and ``benchmarks/bench_eval.py`` on the GPU;
- ``profile``: ``benchmarks/profile_step.py``, where one training step's time goes, eager and with CUDA graphs
  (kernels, launches, synchronisations; Chrome traces in ``--out``/traces).

Writes ``gpu_check.json``, ``gpu_check.md``, ``gpu_check.log`` (every step's output), the test's ``ood_results`` and
the benchmarks' JSON into ``--out``; checkpoints, logs and caches into ``--work``. Exits 1 if any step failed.

    make gpu-check DATA=/data/cifar10-jpeg OOD_ROOT=/data    # OOD_ROOT holds mnist/ and fashion-mnist/
    python benchmarks/gpu_check.py --data /data/cifar10-jpeg --ood-root /data --out logs/gpu_check
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "lightning_ood.cli"]  # the checkout's package, installed or not
NO_STATS_SCORERS = "[msp, energy, dice, fmls, knn, odin]"
RESERVE = 30.0  # seconds of --budget kept for a timed-out step's end and the summary


@dataclass
class Step:
    name: str
    budget: float  # timeout in seconds (scaled by --timeout-scale, cut to what --budget leaves)
    needs: tuple[str, ...] = ()


STEPS = (
    Step("env", 120),
    Step("fit", 420, ("env",)),
    Step("fit_graphs", 420, ("env",)),
    Step("test", 360, ("fit",)),
    Step("test_no_stats", 300, ("fit",)),
    Step("tune", 180, ("fit",)),
    Step("sweep", 180, ("fit",)),
    Step("normratio", 180, ("fit",)),
    Step("bench_eval", 240),
    Step("bench_train", 300),
    Step("bench_train_graphs", 300),
    Step("profile", 240),
)


@dataclass
class Result:
    name: str
    status: str = "skipped"  # pass | fail | timeout | skipped (a step it needs failed, or out of time) | off
    seconds: float = 0.0
    figures: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    log: str = ""

    def fail(self, note: str) -> None:
        self.status = "fail" if self.status != "timeout" else self.status
        self.notes.append(note)


# ------------------------------------------------------------------------------------------------ running
def run(command: list[str], log: Path, timeout: float) -> tuple[int | None, float]:
    """Run ``command`` in the repository root with its output in ``log``; (exit code or None on timeout, seconds).
    On timeout the whole process group (loader workers too) is terminated, then killed."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    start = time.perf_counter()
    with open(log, "ab") as out:
        shown = ["<script>" if "\n" in part else part for part in command]
        out.write(f"$ {shlex.join(shown)}\n".encode())
        out.flush()
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
            for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):  # SIGKILL ends what SIGTERM leaves
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=grace)
    return code, time.perf_counter() - start


def tail(path: Path, lines: int = 25) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join("    " + line for line in text.rstrip().splitlines()[-lines:])


def log_lines(path: Path, pattern: str) -> list[re.Match]:
    text = path.read_text(errors="replace") if path.exists() else ""
    return list(re.finditer(pattern, text, re.MULTILINE))


# ------------------------------------------------------------------------------------------------ the steps
class Check:
    """The steps, their commands and what is checked of each."""

    def __init__(self, args: argparse.Namespace, out: Path, work: Path) -> None:
        self.args, self.out, self.work = args, out, work
        self.checkpoint = work / "checkpoints" / "last.ckpt"
        self.no_stats_source = self.checkpoint  # test_no_stats's checkpoint, set by its command
        self.env: dict = {}
        self.figures: dict[str, dict] = {}  # the figures of the training steps, by step name

    def cli(self, command: str, step: str, *extra: str, ckpt: Path | None = None, ood: bool = False,
            dirpath: Path | None = None) -> list[str]:  # fmt: skip
        """``lightning-ood COMMAND`` on the data, logging into ``log_dir(step)``; ``ood``: with the OOD sets."""
        a = self.args
        args = [*CLI, command, "-c", "configs/cifar10_resnet18.yaml",
                "--data.init_args.root", a.data, "--data.init_args.download", "false",
                "--data.init_args.val_split", str(a.val_split), "--data.init_args.batch_size", str(a.batch_size),
                "--data.init_args.decoded_cache", str(self.work / "decoded"),
                "--trainer.enable_progress_bar", "false",
                "--trainer.logger.init_args.save_dir", str(self.work / "logs"),
                "--trainer.logger.init_args.name", "gpu_check", "--trainer.logger.init_args.version", step,
                "--checkpoint.dirpath", str(dirpath or self.checkpoint.parent)]  # fmt: skip
        if ood:
            sets = [{"name": "mnist", "group": "far"}, {"name": "fashion_mnist", "group": "far"},
                    {"name": "gaussian_noise", "size": a.noise_size, "group": "far"}]  # fmt: skip
            args += ["--data.init_args.ood_root", a.ood_root, "--data.init_args.ood", json.dumps(sets)]
        if ckpt is not None:
            args += ["--ckpt_path", str(ckpt)]
        return args + list(extra)

    def log_dir(self, step: str) -> Path:
        return self.work / "logs" / "gpu_check" / step

    # ---------------------------------------------------------------- env
    def command_env(self) -> list[str]:
        return [sys.executable, "-c", ENV_PROBE]

    def check_env(self, result: Result, log: Path) -> None:
        found = log_lines(log, r"^GPU_CHECK_ENV (.*)$")
        if not found:
            return result.fail("no environment report")
        self.env = json.loads(found[-1].group(1))
        result.figures.update(self.env)
        if not self.env.get("cuda_available"):
            message = "no CUDA GPU visible to torch"
            if not self.args.allow_cpu:
                return result.fail(message + " (--allow-cpu runs the check on the CPU, as a dry run)")
            result.notes.append(message + ": CPU dry run (--allow-cpu)")
        if not self.env.get("cli_ready"):
            result.fail("LightningCLI unavailable: jsonargparse[signatures] is missing (see benchmarks/gpu_remote.sh)")

    # ---------------------------------------------------------------- fit
    def command_fit(self) -> list[str]:
        return self.training("fit", "all")

    def training(self, step: str, scorers: str, *switches: str, dirpath: Path | None = None) -> list[str]:
        a = self.args
        extra = ["--trainer.max_epochs", str(a.epochs), "--model.scorers", scorers,
                 "--trainer.log_every_n_steps", str(a.log_every)]  # fmt: skip
        if a.limit_train_batches:
            extra += ["--trainer.limit_train_batches", str(a.limit_train_batches),
                      "--trainer.limit_val_batches", str(a.limit_train_batches)]  # fmt: skip
        return self.cli("fit", step, *extra, *switches, dirpath=dirpath)

    def check_fit(self, result: Result, log: Path) -> None:
        self.check_training(result, log, "fit", self.checkpoint)

    def command_fit_graphs(self) -> list[str]:  # the statistics of two scorers: the training is what is compared
        return self.training("fit_graphs", "[msp, fmls]", "--model.cuda_graphs", "true",
                             dirpath=self.work / "checkpoints_graphs")  # fmt: skip

    def check_fit_graphs(self, result: Result, log: Path) -> None:
        self.check_training(result, log, "fit_graphs", self.work / "checkpoints_graphs" / "last.ckpt")
        eager = self.figures.get("fit", {})
        for key in ("val_acc", "train_acc"):
            if key in eager and key in result.figures:
                result.figures[f"{key}_minus_eager"] = round(result.figures[key] - eager[key], 2)
        if eager.get("epoch_s") and result.figures.get("epoch_s"):  # medians, the first epoch (start-up) left out
            steady = [statistics.median(run["epoch_s"][1:] or run["epoch_s"]) for run in (eager, result.figures)]
            result.figures["epoch_speedup_vs_eager"] = round(steady[0] / steady[1], 3)

    def check_training(self, result: Result, log: Path, step: str, checkpoint: Path) -> None:
        if not checkpoint.is_file():
            return result.fail(f"no checkpoint {checkpoint}")
        result.figures["checkpoint_mib"] = round(checkpoint.stat().st_size / 2**20, 1)
        if not log_lines(log, r"Saved .* with the OOD statistics"):
            result.fail("last.ckpt was not saved with the OOD statistics")
        if found := log_lines(log, r"Training fast path: (.*)$"):
            result.figures["fast_path"] = found[-1].group(1).strip()
        if found := log_lines(log, r"Fitted OOD statistics on (\d+) training images in ([\d.]+)s"):
            result.figures["statistics_images"] = int(found[-1].group(1))
            result.figures["statistics_s"] = float(found[-1].group(2))
        self.figures[step] = result.figures
        scalars = read_scalars(self.log_dir(step))
        if scalars is None:
            return result.notes.append("no TensorBoard scalars read (per-epoch figures missing)")
        losses = [value for _, _, value in scalars.get("train/loss", [])]
        if any(not math.isfinite(v) for v in losses):
            result.fail(f"non-finite training loss: {losses}")
        if losses:
            result.figures["last_logged_loss"] = round(losses[-1], 4)
        for tag, key in (("val/acc", "val_acc"), ("train/acc", "train_acc")):
            if scalars.get(tag):
                result.figures[key] = round(100 * scalars[tag][-1][2], 2)
        starts = [wall for _, wall, _ in scalars.get("lr-SGD", [])]
        ends = [wall for _, wall, _ in scalars.get("train/acc", [])]
        if starts and ends:
            epochs = [b - a for a, b in itertools.pairwise(starts)] + [ends[-1] - starts[-1]]
            result.figures["epoch_s"] = [round(s, 2) for s in epochs]
            images = self.train_images()
            if images:
                result.figures["epoch_img_s"] = [round(images / s) for s in epochs if s > 0]
        steps = [(step, wall) for step, wall, _ in scalars.get("train/loss", []) if starts and wall > starts[-1]]
        if len(steps) >= 2:  # steady state: between the first and last logged steps of the last epoch
            (s0, t0), (s1, t1) = steps[0], steps[-1]
            result.figures["steady_img_s"] = round((s1 - s0) * self.args.batch_size / (t1 - t0))

    def train_images(self) -> int:
        """Training images per epoch (the folder's, less the validation split, cut by --limit-train-batches)."""
        total = sum(len(files) for _, _, files in os.walk(Path(self.args.data) / "train")) - self.args.val_split
        if self.args.limit_train_batches:
            total = min(total, self.args.limit_train_batches * self.args.batch_size)
        return max(total, 0)

    # ---------------------------------------------------------------- test, test without statistics
    def command_test(self) -> list[str]:
        return self.cli("test", "test", "--model.scorers", "all", ckpt=self.checkpoint, ood=True)

    def check_test(self, result: Result, log: Path) -> None:
        self.check_results(result, "test")
        if found := log_lines(log, r"OOD statistics (.*): computing them on the training set now"):
            result.notes.append(f"statistics recomputed, not taken from the checkpoint: they {found[-1].group(1)}")

    def command_test_no_stats(self) -> list[str]:
        stripped = self.work / "no_stats" / "last_without_statistics.ckpt"
        stripped.parent.mkdir(parents=True, exist_ok=True)
        self.no_stats_source = strip_statistics(self.checkpoint, stripped)
        return self.cli("test", "test_no_stats", "--model.scorers", self.args.no_stats_scorers,
                        ckpt=self.no_stats_source, ood=True)  # fmt: skip

    def check_test_no_stats(self, result: Result, log: Path) -> None:
        result.figures["checkpoint"] = self.no_stats_source.name
        if not log_lines(log, r"computing them on the training set now"):
            result.fail("the statistics were not computed at test start (were they in the checkpoint?)")
        ours = self.check_results(result, "test_no_stats")
        full = read_results(self.log_dir("test"))
        if ours and full:
            shared = [(s, o) for s in ours["metrics"] for o in ours["metrics"][s] if s in full["metrics"]]
            if shared:
                gap = max(abs(ours["metrics"][s][o]["auroc"] - full["metrics"][s][o]["auroc"]) for s, o in shared)
                result.figures["max_auroc_gap_vs_test"] = float(f"{gap:.2e}")
                if gap > 1e-3:
                    result.notes.append(f"AUROC differs from the test with stored statistics by up to {gap:.4f}")

    def check_results(self, result: Result, step: str) -> dict | None:
        results = read_results(self.log_dir(step))
        if results is None:
            result.fail(f"no readable {self.log_dir(step) / 'ood_results.json'}")
            return None
        metrics = results["metrics"]
        sets = sorted({o for per in metrics.values() for o in per})
        bad = [f"{s}/{o}: {per.get(o, {}).get('auroc')}" for s, per in metrics.items() for o in sets
               if not valid_auroc(per.get(o, {}).get("auroc"))]  # fmt: skip
        if not metrics or bad:
            result.fail(f"AUROC missing, not finite or 0 (a NaN is written as 0): {', '.join(bad) or 'no scorers'}")
        averages = {s: v["auroc"] for s, v in results.get("average", {}).items() if valid_auroc(v.get("auroc"))}
        result.figures.update(scorers=len(metrics), accuracy=round(100 * results["accuracy"], 2),
                              images=results.get("num_images"))  # fmt: skip
        if averages:
            best = max(averages, key=averages.get)
            result.figures["best_avg_auroc"] = f"{best} {100 * averages[best]:.2f}"
            result.figures["min_avg_auroc"] = round(100 * min(averages.values()), 2)
        return results

    # ---------------------------------------------------------------- tune, sweep, tune of featurenorm
    def command_tune(self) -> list[str]:
        return self.cli("tune", "tune", "--output", str(self.work / "tune" / "selected.yaml"),
                        "--noise_size", str(self.args.noise_size), "--val_size", "1000",
                        "--cache_dir", str(self.work / "cache" / "features"), ckpt=self.checkpoint)  # fmt: skip

    def check_tune(self, result: Result, log: Path) -> None:
        selected = self.work / "tune" / "selected.yaml"
        if not selected.is_file():
            return result.fail(f"no {selected}")
        if found := log_lines(log, r"^Selected (.+?) \(grid of (\d+) in ([\d.]+)s\)"):
            result.figures.update(selected=found[-1].group(1), grid=int(found[-1].group(2)))
            result.figures["grid_on_cached_s"] = float(found[-1].group(3))

    def command_sweep(self) -> list[str]:
        return self.cli("sweep", "sweep", "--cache_dir", str(self.work / "cache" / "features"),
                        ckpt=self.checkpoint, ood=True)  # fmt: skip

    def check_sweep(self, result: Result, log: Path) -> None:
        csv = self.log_dir("sweep") / "sensitivity.csv"
        if not csv.is_file():
            return result.fail(f"no {csv}")
        result.figures["csv_rows"] = len(csv.read_text().splitlines()) - 1
        if found := log_lines(log, r"on cached features took ([\d.]+)s"):
            result.figures["sweep_on_cached_s"] = float(found[-1].group(1))

    def command_normratio(self) -> list[str]:  # FeatureNorm's block by NormRatio: tune --scorer featurenorm
        output = self.work / "normratio" / "featurenorm.yaml"
        return self.cli("normratio", "tune", "--scorer", "featurenorm", "--settings",
                        f"{{normratio_images: {self.args.normratio_images}}}", "--output", str(output),
                        ckpt=self.checkpoint)  # fmt: skip

    def check_normratio(self, result: Result, log: Path) -> None:
        if not (self.work / "normratio" / "featurenorm.yaml").is_file():
            result.fail("no featurenorm.yaml written")
        if found := log_lines(log, r"FeatureNorm block: (\S+?)\.$"):
            result.figures["block"] = found[-1].group(1)

    # ---------------------------------------------------------------- benchmarks
    def command_bench_train(self) -> list[str]:
        return [sys.executable, "benchmarks/bench_train.py", "--data", self.args.data,
                "--cache", str(self.work / "decoded"), "--out", str(self.work / "bench" / "bench_train.json"),
                *shlex.split(self.args.bench_train_args)]  # fmt: skip

    def check_bench_train(self, result: Result, log: Path) -> None:
        summary = self.bench_summary(result, "bench_train.json")
        keys = ("device", "precision", "backbone", "median_ratio", "median_speedup_over_pil", "median_fit_img_s",
                "median_plain_img_s")  # fmt: skip
        result.figures.update({k: rounded(summary[k]) for k in keys if k in summary})
        last = (summary.get("repeats") or [{}])[-1]
        result.figures.update({k: round(last[k]) for k in ("fit_img_s", "plain_img_s", "fit_pil_img_s") if k in last})

    def command_bench_train_graphs(self) -> list[str]:
        command = self.command_bench_train()
        command[command.index("--out") + 1] = str(self.work / "bench" / "bench_train_graphs.json")
        return [*command, "--cuda-graphs", "--skip-pil"]

    def check_bench_train_graphs(self, result: Result, log: Path) -> None:
        summary = self.bench_summary(result, "bench_train_graphs.json")
        keys = ("device", "precision", "cuda_graphs", "median_ratio", "median_fit_img_s", "median_plain_img_s")
        result.figures.update({k: rounded(summary[k]) for k in keys if k in summary})

    def command_profile(self) -> list[str]:
        return [sys.executable, "benchmarks/profile_step.py", "--data", self.args.data,
                "--cache", str(self.work / "decoded"), "--out", str(self.work / "bench" / "profile_step.json"),
                "--trace", str(self.out / "traces"), *shlex.split(self.args.profile_args)]  # fmt: skip

    def check_profile(self, result: Result, log: Path) -> None:
        summary = self.bench_summary(result, "profile_step.json")
        for mode, figures in summary.get("modes", {}).items():
            keys = ("wall_ms", "aten_ops", "launches", "graph_launches", "kernel_ms", "gpu_busy", "sync_ms")
            result.figures[mode] = {k: rounded(figures[k]) for k in keys if k in figures}

    def command_bench_eval(self) -> list[str]:
        device = "cuda" if self.env.get("cuda_available") else "cpu"
        out = self.work / "bench" / "bench_eval.json"
        return [sys.executable, "benchmarks/bench_eval.py", "--device", device, "--out", str(out),
                *shlex.split(self.args.bench_eval_args)]  # fmt: skip

    def check_bench_eval(self, result: Result, log: Path) -> None:
        summary = self.bench_summary(result, "bench_eval.json")
        keys = ("device", "backbone", "images", "first_evaluation_seconds", "median_seconds", "b_over_a", "b_img_s")
        result.figures.update({k: rounded(summary[k]) for k in keys if k in summary})

    def bench_summary(self, result: Result, name: str) -> dict:
        """The benchmark's JSON summary (copied to --out), or {} with the step failed."""
        path = self.work / "bench" / name
        if not path.is_file():
            result.fail(f"no {path}")
            return {}
        shutil.copy(path, self.out / name)
        return json.loads(path.read_text())


def rounded(value):
    if isinstance(value, float):
        return round(value, 3)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    return value


def valid_auroc(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and 0.0 < value <= 1.0


def read_results(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "ood_results.json").read_text())
    except (OSError, ValueError):
        return None


def read_scalars(folder: Path) -> dict[str, list[tuple[int, float, float]]] | None:
    """``{tag: [(step, wall time, value), ...]}`` of the TensorBoard event files in ``folder``."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return None
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.wall_time, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def strip_statistics(checkpoint: Path, target: Path) -> Path:
    """A copy of ``checkpoint`` without its OOD statistics (loaded with ``weights_only=True``); when it cannot be
    loaded so, the epoch checkpoint next to it, written before the statistics pass."""
    import torch

    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        state.pop("ood_statistics", None)
        torch.save(state, target)
        return target
    except Exception as err:  # an unsafe type in an older torch's allow-list
        epochs = sorted(checkpoint.parent.glob("epoch*.ckpt"))
        if not epochs:
            raise
        print(f"    ({type(err).__name__} loading {checkpoint} with weights_only=True; using {epochs[-1]})")
        return epochs[-1]


ENV_PROBE = r"""
import json, os, platform
import lightning, torch, torchmetrics, torchvision
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda_build": torch.version.cuda,
        "lightning": lightning.__version__, "torchmetrics": torchmetrics.__version__,
        "torchvision": torchvision.__version__, "cpus": os.cpu_count(), "cuda_available": torch.cuda.is_available()}
if info["cuda_available"]:
    properties = torch.cuda.get_device_properties(0)
    info.update(gpu=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count(),
                capability="%d.%d" % torch.cuda.get_device_capability(0),
                memory_gib=round(properties.total_memory / 2**30, 1), bf16=torch.cuda.is_bf16_supported(),
                cudnn=torch.backends.cudnn.version())
    x = torch.randn(1024, 1024, device="cuda")
    info["matmul_finite"] = bool(torch.isfinite(x @ x).all())
try:
    import jsonargparse
    info["jsonargparse"] = jsonargparse.__version__
except ImportError:
    info["jsonargparse"] = "missing"
from lightning.pytorch.cli import _JSONARGPARSE_SIGNATURES_AVAILABLE
import lightning_ood.cli
info["cli_ready"] = bool(_JSONARGPARSE_SIGNATURES_AVAILABLE)
print("GPU_CHECK_ENV " + json.dumps(info))
"""


# ------------------------------------------------------------------------------------------------ main
def summarise(results: list[Result], env: dict, out: Path, started: float) -> bool:
    """Write gpu_check.json and gpu_check.md; whether every step passed."""
    passed = all(r.status in ("pass", "off") for r in results)
    payload = {"passed": passed, "seconds": round(time.perf_counter() - started, 1), "env": env,
               "steps": [r.__dict__ for r in results]}  # fmt: skip
    (out / "gpu_check.json").write_text(json.dumps(payload, indent=1, default=str))
    gpu = env.get("gpu") or "no CUDA GPU"
    versions = ", ".join(f"{k} {env[k]}" for k in ("torch", "lightning", "torchmetrics", "python") if k in env)
    lines = [f"# GPU check: {'passed' if passed else 'FAILED'}", "", f"{gpu}; {versions}", "",
             "| step | status | seconds | figures | notes |", "|---|---|---:|---|---|"]  # fmt: skip
    for r in results:
        figures = "; ".join(f"{k} {v}" for k, v in r.figures.items() if r.name != "env" or k in ENV_SHOWN)
        lines.append(f"| {r.name} | {r.status} | {r.seconds:.1f} | {figures} | {'; '.join(r.notes)} |")
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    return passed


ENV_SHOWN = ("gpu", "memory_gib", "bf16", "cuda_build", "cudnn", "cpus", "jsonargparse")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="image-folder CIFAR-10: {train,test}/<class>/<image>")
    parser.add_argument("--ood-root", required=True, help="folder holding mnist/ and fashion-mnist/ (idx files)")
    parser.add_argument("--out", default=os.environ.get("OUT") or "logs/gpu_check", help="summary folder")
    parser.add_argument("--work", help="checkpoints, logs and caches (default: <out>/work); a new run-<time> folder")
    parser.add_argument("--allow-cpu", action="store_true", help="run without a CUDA GPU (a dry run of the wiring)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--limit-train-batches", type=int, help="cut each training and validation epoch (dry runs)")
    parser.add_argument("--log-every", type=int, default=50, help="training steps between logged losses")
    parser.add_argument("--val-split", type=int, default=1000, help="training images held out for val/acc")
    parser.add_argument("--noise-size", type=int, default=2000, help="Gaussian-noise OOD images (test and tune)")
    parser.add_argument("--normratio-images", type=int, default=1000)
    parser.add_argument("--no-stats-scorers", default=NO_STATS_SCORERS, help="scorers of test_no_stats")
    parser.add_argument("--bench-train-args", default="--batches 100 --repeats 2")
    parser.add_argument("--bench-eval-args", default="--repeats 2")
    parser.add_argument("--profile-args", default="", help="extra arguments of benchmarks/profile_step.py")
    parser.add_argument("--steps", help=f"comma-separated subset of {','.join(s.name for s in STEPS)}")
    parser.add_argument("--budget", type=float, help="seconds for the whole check: later steps get what is left")
    parser.add_argument("--timeout-scale", type=float, default=1.0, help="multiply every step's timeout")
    args = parser.parse_args()
    for flag, folder in (("--data", Path(args.data) / "train"), ("--ood-root", Path(args.ood_root))):
        if not folder.is_dir():
            parser.error(f"{flag}: {folder} is not a folder")
    args.data, args.ood_root = str(Path(args.data).resolve()), str(Path(args.ood_root).resolve())
    chosen = set(args.steps.split(",")) if args.steps else {s.name for s in STEPS}
    unknown = chosen - {s.name for s in STEPS}
    if unknown:
        parser.error(f"--steps: unknown {', '.join(sorted(unknown))}")
    chosen.add("env")

    started = time.perf_counter()
    out = Path(args.out).resolve()
    work = (Path(args.work) if args.work else out / "work").resolve() / time.strftime("run-%Y%m%d-%H%M%S")
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.log").write_text(f"GPU check of {ROOT} with {sys.executable}; work in {work}\n")
    check = Check(args, out, work)
    results: list[Result] = []
    print(f"GPU check: {ROOT} with {sys.executable}; summary in {out}, work in {work}", flush=True)
    for step in STEPS:
        result = Result(step.name)
        results.append(result)
        blocked = [n for n in step.needs if next(r for r in results if r.name == n).status != "pass"]
        left = args.budget - RESERVE - (time.perf_counter() - started) if args.budget else math.inf
        timeout = min(step.budget * args.timeout_scale, left)
        if step.name not in chosen:
            result.status = "off"
            result.notes.append("not selected (--steps)")
        elif step.name != "env" and not args.allow_cpu and not check.env.get("cuda_available"):
            result.notes.append("no CUDA GPU seen by the env step")  # every step would run on the CPU, for hours
        elif blocked:
            result.notes.append(f"needs {', '.join(blocked)}")
        elif left < 20:
            result.notes.append("out of time (--budget)")
        else:
            run_step(check, step.name, result, timeout)
        if result.status in ("skipped", "off"):
            print(f"[{result.status}] {step.name}: {'; '.join(result.notes)}", flush=True)
        summarise(results, check.env, out, started)
    for name in ("ood_results.md", "ood_results.json"):
        if (check.log_dir("test") / name).is_file():
            shutil.copy(check.log_dir("test") / name, out / f"test_{name}")
    passed = summarise(results, check.env, out, started)
    print("\n" + (out / "gpu_check.md").read_text(), flush=True)
    sys.exit(0 if passed else 1)


def run_step(check: Check, name: str, result: Result, timeout: float) -> None:
    """Run one step's command, check what it wrote, print the outcome and append its output to gpu_check.log."""
    log = check.work / f"{name}.log"
    result.log = str(log)
    print(f"[run ] {name} (timeout {timeout:.0f}s) ...", flush=True)
    try:
        code, result.seconds = run(getattr(check, f"command_{name}")(), log, timeout)
        result.status = "pass" if code == 0 else "timeout" if code is None else "fail"
        if code:
            result.notes.append(f"exit code {code}")
        elif code is None:
            result.notes.append(f"timed out after {timeout:.0f}s")
        getattr(check, f"check_{name}")(result, log)
    except Exception as err:  # one step's surprise must not hide the others
        result.fail(f"{type(err).__name__}: {err}")
    shown = {k: v for k, v in result.figures.items() if name != "env" or k in ENV_SHOWN}
    print(f"[{result.status:4s}] {name} {result.seconds:.1f}s " + json.dumps(shown, default=str), flush=True)
    for note in result.notes:
        print(f"       {note}", flush=True)
    if result.status != "pass":
        print(f"       last lines of {log}:\n{tail(log)}", flush=True)
    with open(check.out / "gpu_check.log", "a") as combined:
        combined.write(f"\n===== {name}: {result.status} in {result.seconds:.1f}s =====\n")
        combined.write(log.read_text(errors="replace") if log.exists() else "(no output)\n")


if __name__ == "__main__":
    main()
