"""metrics.jsonl (one flat JSON object per logged event) mirrored to TensorBoard."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


class MetricsLog:
    """Appends events to ``RUN_DIR/metrics.jsonl`` and TensorBoard scalars to ``RUN_DIR/tb``.

    ``resume_at`` truncates metrics.jsonl to the byte offset stored in a checkpoint, so a resumed
    run logs exactly what an uninterrupted run would have (a partly written last line of a killed
    run included); TensorBoard drops the events after the checkpoint's update (``purge_step``),
    and on a fresh start every older event.
    """

    def __init__(self, run_dir: Path, resume_at: int | None = None, resume_update: int = 0, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        if resume_at is None:
            self.path.write_bytes(b"")
        else:
            with open(self.path, "r+b") as handle:
                handle.truncate(resume_at)
        self.handle = open(self.path, "ab")
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=resume_update + 1 if resume_at is not None else 0)

    def log(self, event: str, update: int, values: dict[str, float]) -> None:
        record = {"event": event, "update": update, **{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}}
        self.handle.write((json.dumps(record) + "\n").encode())
        self.handle.flush()
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(key, value, update)

    def offset(self) -> int:
        """The byte offset after the last event, flushed and fsynced: a checkpoint that stores it
        never points past what is on disk."""
        self.handle.flush()
        os.fsync(self.handle.fileno())
        if self.writer is not None:
            self.writer.flush()
        return self.handle.tell()

    def close(self) -> None:
        self.handle.close()
        if self.writer is not None:
            self.writer.close()


class DiscardedMetrics(MetricsLog):
    """What ranks other than 0 log to under torchrun: nothing (rank 0 writes the run's metrics)."""

    def __init__(self) -> None:
        pass

    def log(self, event: str, update: int, values: dict[str, float]) -> None:
        pass

    def offset(self) -> int:
        return 0

    def close(self) -> None:
        pass


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
