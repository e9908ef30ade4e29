"""A run directory: config.yaml, metrics.jsonl, checkpoints/, eval/, tb/, .lock — its config,
checkpoints and the model of a finished run (for evaluate, translate and analyze), and the lock
that keeps one trainer per directory."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import warnings
from pathlib import Path

import torch

from polycats.config import Config, config_from_dict, load_config
from polycats.data.prepare import PreparedData, PreparedDataWarning, prepare
from polycats.errors import PolycatsError
from polycats.model.transformer import Transformer
from polycats.run.build import build_model, resolve_device
from polycats.run.checkpoint import load_checkpoint

# Where a run computes, not what: a run may move to other hardware.
PLACEMENT = {("train", "threads"), ("train", "device")}
# Changing these on resume is allowed: they do not change what has been trained so far.
RESUMABLE_CHANGES = {("train", "max_updates"), ("train", "patience"), ("eval",), *PLACEMENT}


SNAPSHOT = re.compile(r"update_(\d+)\.pt")
# What training, evaluate and analyze write besides config.yaml and .lock, checkpoints first: a
# --restart killed halfway leaves no last.pt to resume from beside the others' partial removal.
OUTPUTS = ("checkpoints/", "metrics.jsonl", "tb/", "eval/", "analysis/")


def last_logged_update(metrics: Path) -> int:
    """The highest update of any event in a metrics.jsonl (0: none, or no file); a half-written
    line is skipped."""
    try:
        lines = metrics.read_bytes().splitlines()
    except FileNotFoundError:
        return 0
    last = 0
    for line in lines:
        try:
            last = max(last, int(json.loads(line)["update"]))
        except (ValueError, KeyError, TypeError):
            continue
    return last


def config_differences(old: dict, new: dict, prefix: tuple[str, ...] = (),
                       ignore: set[tuple[str, ...]] = RESUMABLE_CHANGES) -> list[str]:
    """``field: old -> new`` for every field (dotted) two config dicts disagree on, but those under ``ignore``."""
    differences = []
    for key in sorted(set(old) | set(new)):
        path = (*prefix, key)
        if any(path[: len(allowed)] == allowed for allowed in ignore):
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            differences += config_differences(a, b, path, ignore)
        elif a != b:
            differences.append(f"{'.'.join(path)}: {a!r} -> {b!r}")
    return differences


def with_current_defaults(saved: dict) -> dict:
    """A config saved by an earlier version, with the fields added since at their defaults (so
    that adding an option never blocks resuming); as saved where it no longer validates."""
    try:
        return config_from_dict(saved).model_dump(mode="json")
    except PolycatsError:
        return saved


def summarise(differences: list[str]) -> str:
    return "; ".join(differences[:3]) + (f"; and {len(differences) - 3} more" if len(differences) > 3 else "")


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def config(self) -> Config:
        if not self.config_path.exists():
            raise PolycatsError(f"{self.path} is not a polycats run directory (no config.yaml); train into it first")
        return load_config(self.config_path)

    def check_compatible(self, config: Config) -> None:
        """Refuse to mix two experiments in one directory."""
        if not self.config_path.exists():
            return
        differences = config_differences(load_config(self.config_path).model_dump(mode="json"), config.model_dump(mode="json"))
        if differences:
            raise PolycatsError(
                f"{self.path} holds a run of a different config ({summarise(differences)}); "
                "use a new --out directory or the same config"
            )

    @property
    def lock_path(self) -> Path:
        return self.path / ".lock"

    def checkpoint_path(self, which: str = "last") -> Path:
        path = self.checkpoints / f"{which}.pt"
        if not path.exists():
            raise PolycatsError(f"{path} does not exist; train the run first (polycats train CONFIG --out {self.path})")
        return path

    def snapshot_path(self, update: int) -> Path:
        return self.checkpoints / f"update_{update:06d}.pt"

    def snapshots(self) -> list[tuple[int, Path]]:
        """The ``update_N.pt`` snapshots as (update, path), oldest first."""
        return sorted((int(m.group(1)), path) for path in self.checkpoints.glob("update_*.pt")
                      if (m := SNAPSHOT.fullmatch(path.name)))

    def history(self) -> list[str]:
        """What an earlier run left here that a fresh start would overwrite, in words (empty:
        nothing). A fresh start logs its first event at update 0 and writes ``last.pt`` at once,
        so anything more, without a last checkpoint, means that checkpoint was lost."""
        found = []
        if last := last_logged_update(self.path / "metrics.jsonl"):
            found.append(f"metrics.jsonl up to update {last}")
        snapshots = self.snapshots()
        files = sorted({p.name for p in self.checkpoints.iterdir()} - {p.name for _, p in snapshots}) if self.checkpoints.is_dir() else []
        if snapshots:
            files.append(f"{len(snapshots)} snapshot{'s' * (len(snapshots) > 1)} up to {snapshots[-1][1].name}")
        if files:
            found.append(f"checkpoints/ ({', '.join(files)})")
        return found + [f"{name}/" for name in ("eval", "analysis") if (self.path / name).exists()]

    def clear_outputs(self) -> list[str]:
        """Remove what an earlier run left (:data:`OUTPUTS`; never config.yaml, the lock or any
        other file) and return the names removed. A link is removed, never followed. Call it only
        while holding the lock."""
        removed = []
        for name in OUTPUTS:
            path = self.path / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif os.path.lexists(path):
                path.unlink()
            else:
                continue
            removed.append(name)
        return removed

    @property
    def data_copy(self) -> Path:
        """The run's copy of what evaluate and translate read (written when training starts)."""
        return self.path / "data"

    def prepared(self, config: Config | None = None) -> PreparedData:
        """The run's prepared data; when the corpus cannot be read any more (moved, deleted), the
        run's own copy of its tokenizer and valid/test data, with a warning."""
        try:
            return prepare((config or self.config()).data)
        except (PolycatsError, OSError) as error:
            if not (self.data_copy / "meta.json").is_file():
                raise
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            warnings.warn(f"{reason}; using the run's own copy of its tokenizer and valid/test data ({self.data_copy})",
                          PreparedDataWarning, stacklevel=2)
            return PreparedData(self.data_copy)

    def load_model(self, which: str = "best", config: Config | None = None, data: PreparedData | None = None,
                   device: str | None = None) -> Transformer:
        """The checkpoint's model in eval mode on ``device`` (auto, cpu, cuda; default: the
        config's ``train.device``), whichever device it was trained on."""
        config = config or self.config()
        data = data or self.prepared(config)
        model = build_model(config, data.vocab_size).to(resolve_device(device or config.train.device))
        state = load_checkpoint(self.checkpoint_path(which))
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as error:
            raise PolycatsError(
                f"checkpoint {self.checkpoint_path(which)} does not fit the model of {self.config_path} "
                f"({str(error).splitlines()[0][:120]}); was it copied from another run?"
            ) from None
        model.eval()
        return model


class RunLock:
    """One trainer per run directory: an exclusive ``flock`` on ``RUN_DIR/.lock``.

    The kernel drops the lock when its holder exits, however it exits (SIGKILL, a crash, a power
    cut), so a ``.lock`` file left behind by a dead run never blocks the next one. The file keeps
    the holder's pid and host for the error message; it is never deleted (deleting a lock file
    races with a process opening it). Needs a filesystem with working ``flock`` (local disks; NFS
    only with lock support).
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.handle = None

    @property
    def held(self) -> bool:
        return self.handle is not None

    def acquire(self) -> RunLock:
        if self.handle is not None:
            return self
        import fcntl

        handle = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise PolycatsError(
                f"{self.path.parent} is in use by another training run ({holder}); wait for it to finish "
                "or train into another --out directory"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        self.handle = handle
        return self

    def release(self) -> None:
        if self.handle is not None:
            self.handle.close()  # closing the descriptor drops the flock
            self.handle = None
