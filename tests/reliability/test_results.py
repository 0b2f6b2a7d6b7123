"""Results that cannot mislead: the FPR labelled with its TPR, the best marked without colours."""

from __future__ import annotations

import json

import pytest

from tests.helpers import args, run_cli

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_the_fpr_is_labelled_with_the_tpr_in_use(trained, tmp_path):
    data, ckpt = trained
    run_cli("test", *args(tmp_path / "logs", data, "--ckpt_path", str(ckpt), "--model.tpr", "1.0"))
    (folder,) = {p.parent for p in (tmp_path / "logs").rglob("ood_results.csv")}
    header = (folder / "ood_results.csv").read_text().splitlines()[0]
    assert ",fpr100,auroc," in header and "fpr95," not in header.replace("paper_fpr95", "").replace("diff_fpr95", "")
    assert "FPR100↓" in (folder / "ood_results.md").read_text()
    report = json.loads((folder / "ood_results.json").read_text())
    assert report["tpr"] == 1.0 and "fpr100" in report["average"]["fmls"]


def test_the_result_table_in_a_log_marks_the_best_without_colours(trained, tmp_path, capsys, monkeypatch):
    """Output to a file (no terminal, no colours): the CLI's table marks the best of each column with '*'."""
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    data, ckpt = trained
    run_cli("test", *args(tmp_path / "logs", data, "--ckpt_path", str(ckpt)))
    out = capsys.readouterr().out
    assert "*: the best" in out and "green" not in out
    assert any(line.split()[0] in ("msp", "energy", "fmls") and line.rstrip().endswith("*") for line in
               out.splitlines() if line.split())  # fmt: skip
