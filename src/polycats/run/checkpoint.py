"""Checkpoints: plain dicts of tensors and numbers, written atomically, read with
``torch.load(weights_only=True)`` (never unpickling arbitrary objects), each carrying a SHA-256
of its contents that is checked on every load.

Tensors are written on the CPU and read onto it (``map_location="cpu"``), so a checkpoint of a
run trained on CUDA loads on a machine without one, and the other way round.

The trainer's ``last.pt`` is written with :func:`save_rotating`, which keeps the one before it as
``last.prev.pt``; :func:`load_latest` falls back to that one, with a warning, when ``last.pt`` is
corrupt or missing.
"""

from __future__ import annotations

import copy
import hashlib
import os
import pickle
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from polycats.errors import PolycatsError
from polycats.io import atomic_torch_save

CHECKPOINT_VERSION = 2  # 2: a checksum; 1 (no checksum) still loads
WHAT_TO_DO = "delete it or point to another checkpoint"


class CorruptCheckpoint(PolycatsError):
    """A checkpoint that cannot be used: truncated, bit-flipped, unsafe to unpickle, not ours."""


class NoUsableCheckpoint(PolycatsError):
    """Every full checkpoint there is is unusable; ``problems`` says why, one per file."""

    def __init__(self, message: str, problems: list[str]):
        super().__init__(message)
        self.problems = problems


class CheckpointFallbackWarning(UserWarning):
    """The newest checkpoint was unusable and training resumed from the previous one."""


def state_checksum(state: dict[str, Any]) -> str:
    """SHA-256 of a checkpoint's contents: every tensor's dtype, shape and bytes, every number,
    string and container, in a fixed order. Independent of the file format, so it catches flipped
    bits the zip container does not check."""
    digest = hashlib.sha256()

    def feed(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous().reshape(-1)
            digest.update(f"T{tensor.dtype}{tuple(value.shape)}:".encode())
            digest.update(tensor.view(torch.uint8).numpy())
        elif isinstance(value, dict):
            digest.update(f"D{len(value)}:".encode())
            for key in sorted(value, key=repr):
                feed(key)
                feed(value[key])
        elif isinstance(value, (list, tuple)):
            digest.update(f"{type(value).__name__}{len(value)}:".encode())
            for item in value:
                feed(item)
        else:
            digest.update(f"{type(value).__name__}:{value!r};".encode())

    feed({key: value for key, value in state.items() if key != "checksum"})
    return digest.hexdigest()


def on_cpu(value: Any) -> Any:
    """``value`` with every tensor in it (nested dicts, lists, tuples) on the CPU. What is on the
    CPU already is returned as it is (the same objects, so a CPU run saves what it always did); a
    state dict keeps its type and ``_metadata``."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        moved = {key: on_cpu(item) for key, item in value.items()}
        if all(moved[key] is value[key] for key in value):
            return value
        result = copy.copy(value)
        result.update(moved)
        return result
    if type(value) in (list, tuple):
        moved = [on_cpu(item) for item in value]
        return value if all(a is b for a, b in zip(moved, value)) else type(value)(moved)
    return value


def save_checkpoint(state: dict[str, Any], path: Path, previous: Path | None = None) -> None:
    """Write ``state`` (with format version and checksum) atomically, its tensors on the CPU;
    ``previous``: keep the file it replaces there."""
    state = {"version": CHECKPOINT_VERSION, **on_cpu(state)}
    atomic_torch_save({**state, "checksum": state_checksum(state)}, path, previous)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's dict; :class:`CorruptCheckpoint` if it is unusable, :class:`PolycatsError`
    if it is missing, unreadable or from a newer polycats."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise PolycatsError(f"checkpoint {path} does not exist") from None
    except OSError as error:  # a directory, no permission, an I/O error
        raise PolycatsError(f"cannot read checkpoint {path}: {error.strerror or error}") from None
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, ValueError, TypeError):
        # Truncated, not a zip, or objects the safe unpickler refuses: torch's own text for these
        # (the weights_only essay) tells a user nothing they can act on.
        raise CorruptCheckpoint(f"{path}: not a polycats checkpoint (or corrupt); {WHAT_TO_DO}") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CorruptCheckpoint(f"{path}: not a polycats checkpoint (no 'model' weights); {WHAT_TO_DO}")
    version = state.get("version", 1)
    if not isinstance(version, int):
        raise CorruptCheckpoint(f"{path}: not a polycats checkpoint (format version {version!r}); {WHAT_TO_DO}")
    if version > CHECKPOINT_VERSION:
        raise PolycatsError(f"checkpoint {path} was written by a newer polycats (format {version}); upgrade polycats")
    if version >= 2 and state.get("checksum") != state_checksum(state):
        raise CorruptCheckpoint(f"{path}: corrupt (its contents do not match its checksum); {WHAT_TO_DO}")
    return state


def previous_path(path: Path) -> Path:
    """Where :func:`save_rotating` keeps the checkpoint before ``path``: ``last.pt`` → ``last.prev.pt``."""
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_rotating(state: dict[str, Any], path: Path) -> None:
    """Write ``path``, keeping the checkpoint it replaces as :func:`previous_path`. The new one is
    written and fsynced first, then two renames; a crash between them leaves only the previous
    one, which :func:`load_latest` then takes."""
    save_checkpoint(state, Path(path), previous=previous_path(Path(path)))


def load_latest(path: Path, check: Callable[[dict[str, Any]], str | None] | None = None) -> tuple[dict[str, Any], Path] | None:
    """The newest usable checkpoint of ``path`` and ``previous_path(path)``, or None if neither
    exists. An unusable newer one (corrupt, or refused by ``check``, which returns a reason) is
    moved aside to ``NAME.unusable`` (kept for inspection, never rotated into ``last.prev.pt``)
    with a :class:`CheckpointFallbackWarning`; a broken symbolic link is unusable too. If every one
    that exists is unusable, :class:`NoUsableCheckpoint` says why (never a silent fresh start).
    Call it only while holding the run directory's lock."""
    path = Path(path)
    problems, unusable = [], []
    for candidate in (path, previous_path(path)):
        if not os.path.lexists(candidate):
            if candidate == path and os.path.lexists(previous_path(path)):
                problems.append(f"{candidate.name} is missing (a crash while it was being replaced)")
            continue
        if not candidate.exists():  # a link to nothing, or a loop: a checkpoint that was there once
            problems.append(f"{candidate} is a broken symbolic link (to {os.readlink(candidate)})")
            unusable.append(candidate)
            continue
        try:
            state = load_checkpoint(candidate)
            reason = check(state) if check is not None else None
            if reason is not None:
                raise CorruptCheckpoint(f"checkpoint {candidate} {reason}")
        except CorruptCheckpoint as error:
            problems.append(str(error).removesuffix(f"; {WHAT_TO_DO}"))
            unusable.append(candidate)
            continue
        if problems:
            for bad in unusable:
                os.replace(bad, bad.with_name(f"{bad.name}.unusable"))
            kept = f" (kept as {', '.join(f'{bad.name}.unusable' for bad in unusable)})" if unusable else ""
            warnings.warn(
                f"{'; '.join(problems)}{kept}; resuming from {candidate} (update {state.get('update', '?')}) instead",
                CheckpointFallbackWarning, stacklevel=2,
            )
        return state, candidate
    if problems:
        raise NoUsableCheckpoint(
            f"no usable checkpoint to resume from: {'; '.join(problems)}; move {path.parent} away to start over", problems,
        )
    return None
