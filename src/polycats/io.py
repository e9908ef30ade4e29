"""Atomic file writes: write a sibling temp file, fsync, rename, fsync the directory. A crash
(even SIGKILL or a power cut) leaves either the old file or the new one, never half of one; a
killed write leaves at most a ``.NAME.*.tmp`` sibling, which :func:`remove_stale_temp_files`
clears."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def fsync_directory(directory: str | Path) -> None:
    """Make a rename in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process's umask. It can only be read by setting it: set it back at once (0o022 in the
    meantime, so a file another thread creates in that instant is not world-writable)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None], previous: str | Path | None = None) -> None:
    """Write ``path`` through ``write(handle)``. With ``previous``, the file it replaces is kept
    there: renamed only once the new one is on disk, so at most the instant between two renames
    has no ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:  # name the file being written, not the random temp name
        raise type(error)(error.errno, error.strerror, str(path)) from None
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o666 & ~current_umask())  # mkstemp's is 0600; be what open() makes
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        if previous is not None and path.exists():
            os.replace(path, previous)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def staging_directory(parent: str | Path, prefix: str) -> Path:
    """A new, empty folder in ``parent`` to build into and then rename, with the permissions
    ``mkdir`` would give it (mkdtemp's are 0700, which would hide a shared cache from other users)."""
    staging = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    staging.chmod(0o777 & ~current_umask())
    return staging


def unwritable_reason(directory: str | Path) -> str | None:
    """Why files cannot be made in ``directory`` (or, if it does not exist yet, in the nearest
    folder above it that does), or None if they can. It tries: permission bits say nothing about
    read-only mounts, /proc or /sys, or what root may do. The probe folder is removed at once."""
    existing = Path(directory)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a directory"
    try:
        probe = tempfile.mkdtemp(dir=existing, prefix=".polycats-probe.")
    except OSError as error:
        return f"cannot create files in {existing} ({error.strerror or error})"
    os.rmdir(probe)
    return None


def remove_stale_temp_files(directory: str | Path, name: str = "*") -> list[Path]:
    """Delete the ``.NAME.*.tmp`` files that killed atomic writes of ``directory/NAME`` left
    (``name="*"``: of any file). Call it only while no one else writes there (the trainer holds
    the run directory's lock)."""
    directory = Path(directory)
    stale = [p for p in directory.glob(f".{name}.*.tmp") if p.is_file()] if directory.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def atomic_torch_save(obj: Any, path: str | Path, previous: str | Path | None = None) -> None:
    import torch

    atomic_write(path, lambda handle: torch.save(obj, handle), previous)
