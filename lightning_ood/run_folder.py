"""The run's output folder (``logs/<name>/version_N``): checked before any work, held by one run at a time, and removed
again when a failed or interrupted run created it and left it truly empty.

- Writability of the logs and checkpoint folders is checked up front, not after the first epoch or the whole test.
- A folder that already holds another run's files is not written into unless the user asks
  (``--overwrite_results true``): its results (``ood_results.*``, ``selected.yaml``, ...) or its logs (``config.yaml``,
  ``hparams.yaml``, TensorBoard events), which two runs with the same explicit version would overwrite or mix. A
  ``fit`` that resumes (``--ckpt_path``) continues its own run and may write into that run's folder. A checkpoint
  folder holding another run's checkpoints is refused the same way (see :func:`check_checkpoint_folder`).
- The run's config is never written over an earlier one: beside it as ``config-2.yaml``, ... (see
  :class:`lightning_ood.cli.SaveConfigBeside`).
- A lock file ``.lightning-ood.lock`` holding the writer's process id keeps a concurrent run out; a lock left by a
  process that no longer runs is taken over.
- A run that fails or is interrupted keeps every file it wrote (TensorBoard events, ``config.yaml``, checkpoints): an
  interrupted ``fit``'s curves are what the user needs most. Only its lock and the folders it created and left without
  a single file are removed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from lightning_ood.errors import OutputError
from lightning_ood.io import check_writable_folder, process_alive, remove_empty_folders

# Results: the test's tables and scores, tune's overlay, and every table tune and sweep write (``tune_grid.csv``,
# ``sensitivity.csv``, what a scorer's own choice measured: ``<preparation name>.csv``).
RESULT_FILES = ("ood_results.*", "ood_scores.pt", "selected.yaml", "*.csv")
LOCK = ".lightning-ood.lock"


RUN_FILES = ("config*.yaml", "hparams.yaml", "events.out.tfevents.*")  # what any run writes into its log folder


def holds_results(folder: Path) -> list[Path]:
    return sorted(p for pattern in RESULT_FILES for p in folder.glob(pattern))


def holds_logs(folder: Path) -> list[Path]:
    return sorted(p for pattern in RUN_FILES for p in folder.glob(pattern))


def named(paths: list[Path], limit: int = 4) -> str:
    names = ", ".join(p.name for p in paths[:limit])
    return names + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def check_checkpoint_folder(folder: Path, resumes_from: str | None, overwrite: bool) -> None:
    """Refuse a ``fit`` into a checkpoint folder holding another run's checkpoints: Lightning would write this run's
    beside them as ``last-v1.ckpt``, ``epoch009-v1.ckpt`` and its statistics would end up in one of them; ``--ckpt_path
    last`` would then resume the other run. ``resumes_from``: the fit's ``--ckpt_path`` (a resume of the run whose
    checkpoints these are is its own run: ``last`` or a checkpoint in this folder)."""
    found = sorted(folder.glob("*.ckpt")) if folder.is_dir() else []
    if not found or overwrite:
        return
    if resumes_from == "last" or (
        resumes_from is not None and Path(resumes_from).expanduser().resolve().parent == folder.resolve()
    ):
        return
    raise OutputError(
        f"{folder} already holds the checkpoints of another run ({named(found)}); this fit would mix its own with "
        f"them. Resume that run with --ckpt_path last, choose another --checkpoint.dirpath, or pass "
        f"--overwrite_results true to replace them."
    )


@dataclass
class RunFolder:
    """One run's log folder and what the run did to it."""

    path: Path
    created: bool = False
    locked: bool = False
    extra: list[Path] = field(default_factory=list)  # other folders this run created (checkpoints)

    @classmethod
    def claim(
        cls,
        path: Path,
        overwrite: bool,
        also_writable: tuple[tuple[Path, str], ...] = (),
        resuming: bool = False,
    ) -> RunFolder:
        """Check, lock and remember ``path`` before the run starts; ``resuming``: a ``fit`` that continues the run
        whose logs ``path`` may hold.

        Raises:
            OutputError: a folder cannot be written, ``path`` holds another run's results or logs and ``overwrite``
                is false, or another running process holds it.
        """
        check_writable_folder(path, "logs")
        for folder, what in also_writable:
            check_writable_folder(folder, what)
        existing = holds_results(path) if path.is_dir() else []
        if existing and not overwrite:
            raise OutputError(
                f"{path} already holds the results of an earlier run ({named(existing)}); choose another "
                f"--trainer.logger.init_args.version, or pass --overwrite_results true to replace them."
            )
        logs = holds_logs(path) if path.is_dir() else []
        if logs and not (overwrite or resuming):
            raise OutputError(
                f"{path} already holds the logs of an earlier run ({named(logs)}); this run would replace its "
                f"hparams.yaml and mix its curves with them. Choose another --trainer.logger.init_args.version (or "
                f"none: a new version_N), resume that run with fit --ckpt_path, or pass --overwrite_results true to "
                f"write into it anyway (its config.yaml is kept; this run's is saved beside it)."
            )
        run = cls(path, created=not path.exists())
        # other folders this run creates: the checkpoint folder, and the parents of the log folder (logs/<name>)
        run.extra = [folder for folder, _ in also_writable if not folder.exists()]
        run.extra += [parent for parent in path.parents if not parent.exists()]
        path.mkdir(parents=True, exist_ok=True)
        run.lock()
        return run

    def lock(self) -> None:
        lock = self.path / LOCK
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    owner = int(lock.read_text().strip() or 0)
                except (OSError, ValueError):
                    owner = 0
                if owner and owner != os.getpid() and process_alive(owner):
                    raise OutputError(
                        f"Another run (process {owner}) is writing into {self.path}; wait for it, or choose another "
                        f"--trainer.logger.init_args.version."
                    ) from None
                lock.unlink(missing_ok=True)  # left by a run that was killed
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            self.locked = True
            return

    def release(self) -> None:
        if self.locked:
            (self.path / LOCK).unlink(missing_ok=True)
            self.locked = False

    def abandon(self) -> None:
        """After a failure or an interruption: release the lock and remove the folders this run created that hold no
        file at all (deepest first). No file the run wrote is deleted."""
        self.release()
        created = [self.path, *(p for p in self.path.rglob("*") if p.is_dir())] if self.created else []
        remove_empty_folders([*created, *self.extra])
