"""``lightning-ood report RUN_DIR... [--output DIR]``: aggregate the results of several runs of one setting (seeds,
checkpoints) into mean +- std tables (``report.md``, ``report.csv``, ``report.tex``), printed and written.

It reads the runs' ``ood_results.json`` only: no model, no data, so it is not a LightningCLI subcommand; ``main``
dispatches it before the CLI is built. A damaged results file, and runs whose recorded settings differ (scorer
hyperparameters, TPR, statistics images, ...: see :func:`lightning_ood.aggregate.run_settings`), are refused with one
message naming the file or the setting; so are runs given twice: one results file named twice, or two run folders
that evaluated the same weights (the weights fingerprint of their provenance), which would count one run as two.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.markdown import Markdown

from lightning_ood.aggregate import Aggregate, find_results, load_results
from lightning_ood.errors import ConfigError
from lightning_ood.io import atomic_write_text, check_writable_folder


def report_parser() -> argparse.ArgumentParser:
    """The arguments of ``lightning-ood report``."""
    parser = argparse.ArgumentParser(
        prog="lightning-ood report",
        description="Aggregate runs of one setting (seeds, checkpoints) into mean ± std tables. Runs whose settings "
        "differ (scorer hyperparameters, TPR, statistics images, ...) are refused.",
    )
    parser.add_argument("runs", nargs="+", help="run folders of `lightning-ood test` (or their ood_results.json)")
    parser.add_argument("--output", help="folder for report.{md,csv,tex} (default: the runs' common parent)")
    return parser


def report(argv: list[str]) -> dict:
    parser = report_parser()
    args = parser.parse_args(argv)
    paths = find_results(args.runs)
    aggregate = Aggregate.of(paths)  # refuses damaged files and runs of different settings
    check_distinct_runs(paths)
    output = Path(args.output) if args.output else Path(*_common_parts([p.parent for p in paths])) / "report"
    check_writable_folder(output, "--output")
    written = [
        atomic_write_text(output / "report.md", aggregate.to_markdown()),
        atomic_write_text(output / "report.csv", aggregate.to_csv()),
        atomic_write_text(output / "report.tex", aggregate.to_latex()),
    ]
    Console(width=160).print(Markdown(aggregate.to_markdown()))
    Console().print(f"Written: {', '.join(map(str, written))}")
    return {"written": [str(p) for p in written]}


def _common_parts(folders: list[Path]) -> list[str]:
    parts = [f.resolve().parts for f in folders]
    common = []
    for level in zip(*parts, strict=False):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return common or ["."]


def check_distinct_runs(paths: list[Path]) -> None:
    """Refuse runs of one setting given twice: the same results file (under two spellings), or results of the same
    weights in two run folders (the ``fingerprint`` of their provenance: every backbone tensor and the input
    normalisation), which the mean ± std would count as two runs."""
    seen: dict[Path, Path] = {}
    for path in paths:
        real = path.resolve()
        if real in seen:
            also = f" (also as {seen[real]})" if seen[real] != path else ""
            raise ConfigError(f"{path} is given twice{also}: each run counts once. Name each run folder once.")
        seen[real] = path
    by_weights: dict[str, list[Path]] = {}
    for path in paths:
        fingerprint = load_results(path).get("provenance", {}).get("fingerprint")
        if fingerprint:  # older results files record none
            by_weights.setdefault(fingerprint, []).append(path)
    same = [group for group in by_weights.values() if len(group) > 1]
    if same:
        described = "; ".join(
            f"{' and '.join(str(p.parent) for p in group)} (fingerprint {fingerprint})"
            for fingerprint, group in by_weights.items()
            if len(group) > 1
        )
        raise ConfigError(
            f"{sum(len(g) - 1 for g in same)} of the {len(paths)} runs repeat the weights of another: {described} "
            f"are results of the same weights, one run stored twice, and would count as several. report averages "
            f"runs of different weights (seeds, checkpoints): give each of them once."
        )
