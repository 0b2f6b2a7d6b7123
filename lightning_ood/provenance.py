"""Where a run's numbers came from: the package's version and the commit of its checkout, written with the results."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
from datetime import datetime, timezone
from pathlib import Path


def package_version() -> str:
    try:
        return importlib.metadata.version("lightning-ood")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def git_commit() -> str:
    """The commit of the package's checkout (with ``+changes`` when the tree differs from it), or ""."""
    folder = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder,
                               capture_output=True, text=True, timeout=5)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return ""
    if commit.returncode:
        return ""
    return commit.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def run_provenance(**what: object) -> dict[str, object]:
    """What produced a run's numbers, for its result files: ``what`` the run says of itself (weights, checkpoint,
    fingerprint, input normalisation, statistics, references, scorers, test sets, ...), then the seed, the package's
    version, the git commit and the date."""
    return {
        **what,
        "seed": os.environ.get("PL_GLOBAL_SEED", ""),
        "package": f"lightning-ood {package_version()}",
        "commit": git_commit(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
