"""Where a run's numbers came from: the package's version and the commit of its checkout, written with the results."""

from __future__ import annotations

import importlib.metadata
import subprocess
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
