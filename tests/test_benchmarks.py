"""The benchmark scripts run end to end at toy sizes and write what their README figures come from."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO


def run_bench(script: str, *args: str) -> dict:
    out = REPO / ".bench" / "test"
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{script}.json"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / f"{script}.py"), *args, "--out", str(target)],
                   check=True, cwd=REPO, capture_output=True, timeout=600)  # fmt: skip
    return json.loads(target.read_text())


def test_bench_train_compares_fit_with_a_plain_loop_and_the_pil_pipeline(cifar_folder, tmp_path):
    summary = run_bench("bench_train", "--data", str(cifar_folder), "--batches", "2", "--batch-size", "8",
                        "--repeats", "1", "--cache", str(tmp_path / "decoded"))  # fmt: skip
    (row,) = summary["repeats"]
    assert {"plain_img_s", "fit_img_s", "fit_pil_img_s", "speedup_over_pil", "ratio"} <= row.keys()
    assert summary["median_ratio"] == row["fit_img_s"] / row["plain_img_s"] > 0
    assert any((tmp_path / "decoded").iterdir()), "the decoded images were cached"


def test_profile_step_profiles_eager_and_graphed_steps(cifar_folder, tmp_path):
    summary = run_bench("profile_step", "--data", str(cifar_folder), "--backbone", "resnet20", "--batch-size", "8",
                        "--warmup", "2", "--steps", "2", "--cache", str(tmp_path / "decoded"))  # fmt: skip
    assert summary["modes"].keys() == {"eager", "cuda_graphs"}
    for figures in summary["modes"].values():
        assert figures["wall_ms"] > 0 and figures["aten_ops"] > 10, "a training step runs operators"


def test_bench_score_times_every_scorer():
    summary = run_bench("bench_score", "--n", "3000", "--dim", "32", "--classes", "5", "--train", "300",
                        "--chunk", "1000", "--repeats", "1")  # fmt: skip
    assert summary["head_seconds"] > 0
    rows = summary["scorers"]
    assert {"msp", "energy", "fmls", "line", "mahalanobis", "knn", "vim", "react", "dice"} <= rows.keys()
    assert all(row["ratio"] == row["seconds"] / row["head_seconds"] > 0 for row in rows.values())
    assert set(summary["refused"]) == {"nnguide"}  # 1% of 300 training features is fewer than its k = 100
