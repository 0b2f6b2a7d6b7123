"""Atomic file writes: write to a temporary file in the same folder, then rename over the target.

A crash (or a kill) mid-write leaves the previous file or nothing, never a truncated file that a later run trips over.
The temporary file carries the writer's process id (``.<name>.<pid>.<random>.tmp``): the next write into the folder
removes those of processes that no longer run, so a ``kill -9`` leaves nothing behind for long. A write that fails
(full disk, read-only folder, quota) becomes one :class:`OutputError` naming the file and the cause.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from functools import cache
from pathlib import Path
from typing import IO

from lightning_ood.errors import OutputError

TEMPORARY = re.compile(r"^\..+\.(\d+)\.[^.]+\.tmp$")
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG)


@cache
def file_mode() -> int:
    """The mode a plainly created file gets (0o666 less the umask), not the 0o600 of temporary files."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove the temporary files of atomic writes in ``folder`` whose process has ended (killed mid-write)."""
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = TEMPORARY.match(entry.name)
        if match and int(match[1]) != os.getpid() and not process_alive(int(match[1])):
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def remove_empty_folders(folders: Iterable[Path]) -> None:
    """Remove those of ``folders`` that exist and are empty, deepest first (what a failed step created and left
    empty)."""
    for folder in sorted(folders, key=lambda f: len(f.parts), reverse=True):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def describe_write_failure(path: Path, err: BaseException) -> str:
    """Why writing ``path`` failed and the way out that fits the cause: a full disk or quota (with the free space),
    a read-only file system, missing permissions."""
    cause = err.strerror if isinstance(err, OSError) and err.strerror else str(err).splitlines()[0][:200]
    code = err.errno if isinstance(err, OSError) else None
    if code == errno.EROFS:
        return f"Cannot write {path}: {cause}. Choose a folder on a writable disk."
    if code in (errno.EACCES, errno.EPERM):
        return f"Cannot write {path}: {cause}. Choose a folder you may write into, or fix its permissions."
    try:
        free = shutil.disk_usage(path.parent if path.parent.exists() else Path.cwd()).free
        space = f"; {free:,} bytes free there"
    except OSError:
        space = ""
    if code in FULL_ERRNOS:
        return f"Cannot write {path}: {cause}{space}. Free some space or choose a folder on another disk."
    return f"Cannot write {path}: {cause}{space}. Free some space, choose another folder, or fix its permissions."


def is_write_failure(err: BaseException) -> bool:
    """An OS-level write failure (full disk, quota, read-only, permissions), also when torch.save wraps it."""
    if isinstance(err, OSError) and err.errno in WRITE_ERRNOS:
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("file write failed" in text or "unexpected pos" in text)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(f)`` on a temporary binary file next to ``path`` and move it into place atomically; the file gets
    the usual permissions of a new file.

    Raises:
        OutputError: the folder cannot be written or the disk is full (nothing is left behind).
    """
    path = Path(path)
    tmp: str | None = None
    try:
        make_folder(path.parent)
        remove_stale_temporaries(path.parent)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if is_write_failure(err):
            raise OutputError(describe_write_failure(path, err)) from err
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def make_folder(folder: Path) -> None:
    """``mkdir -p folder``; a file where a folder is needed (``folder`` itself or one above it) is an
    :class:`OutputError` naming it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as err:
        blocking = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), folder)
        message = f"Cannot write into {folder}: {blocking} is a file, not a folder. Choose another folder."
        raise OutputError(message) from err


def read_only_file_system(folder: Path) -> bool:
    """Whether ``folder`` lies on a file system mounted read-only."""
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):  # no statvfs (Windows)
        return False


def free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def folder_write_problem(folder: Path) -> tuple[str, str] | None:
    """Why no file can be created in the existing path ``folder`` and the way out, or ``None``: a file, a read-only
    file system, missing permissions, a full disk."""
    if not folder.is_dir():
        return f"{folder} is a file, not a folder", "Choose another folder"
    if read_only_file_system(folder):
        return f"{folder} is on a read-only file system", "Choose a folder on a writable disk"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"{folder} is not writable (no write permission)", "Choose another folder, or fix its permissions"
    if free_bytes(folder) == 0:
        return f"the disk holding {folder} is full (0 bytes free)", "Free some space, or choose another disk"
    return None


def check_writable_folder(folder: str | os.PathLike, what: str) -> None:
    """Raise an :class:`OutputError` before any work when no file can be written into ``folder``, with the reason
    (see :func:`folder_write_problem`): ``folder`` or its first existing parent is a file, on a read-only file
    system, not writable for this user, or on a full disk. ``what`` names the argument, for the message."""
    folder = Path(folder).expanduser()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    problem = folder_write_problem(existing)
    if problem is not None:
        reason, advice = problem
        raise OutputError(f"{what}: cannot write into {folder}: {reason}. {advice} ({what}).")
