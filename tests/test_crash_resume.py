"""Crash-resume harness: ``polycats train`` in a separate process, killed with SIGKILL at random
moments and started again, must end bit-identical (parameters, Adam, CATS state, sampler, RNGs,
best/snapshot checkpoints, metrics.jsonl but the wall-clock ``tokens_per_s``) to an uninterrupted
run of the same config on CPU.

The config is tiny but has every source of state: dropout (torch RNG), CATS (α, λ, EMAs), NaN
batches injected by ``nan_injection.poison_batches`` (skipped updates and their
counters), and save/log/valid periods that do not divide each other (the logging window is in
the checkpoint). Each kill lands at a uniform random time within the training that is left, so
kills hit startup, updates, validation, metrics and checkpoint writes alike.

Each attempt is ``polycats.cli.main`` with the ``train`` argv in a process forked from a
``multiprocessing`` fork server that imported polycats once: a real process (own files, own
lock, own signal handlers, killed by the kernel), without a fresh interpreter's ~4 s torch
import per attempt. Three kills run by default; ``pytest -m slow`` runs twenty.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import sys
import time
from multiprocessing import forkserver
from pathlib import Path

import pytest
import torch

from polycats.config import config_from_dict
from polycats.data.prepare import prepare
from polycats.train.metrics import read_metrics
from polycats.train.trainer import Trainer

from nan_injection import poison_batches

CRASH = {
    "name": "crash",
    "data": {"source": "synthetic", "languages": {"de": 60, "sw": 20}, "valid_per_lang": 8, "test_per_lang": 8,
             "vocab_size": 60, "max_len": 40, "synthetic": {"words": 8, "min_words": 2, "max_words": 4}},
    "balancer": {"name": "cats", "warmup_steps": 2},
    "model": {"d_model": 16, "encoder_layers": 1, "decoder_layers": 1, "heads": 2, "ffn_dim": 32, "dropout": 0.1},
    "train": {"max_updates": 40, "max_tokens": 256, "warmup_updates": 5, "save_every": 7, "valid_every": 5,
              "log_every": 3, "threads": 1},
}
NAN_BATCHES = {9, 10, 23}
TIMING = ("tokens_per_s",)
NOT_COMPARED = {"metrics_offset", "checksum"}  # the offset moves with the width of tokens_per_s


def same(a, b, where: str = "") -> None:
    """Bit-identical nested state: tensors by ``torch.equal`` (dtype and shape included)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (where, sorted(a), sorted(b))
        for key in a:
            if key not in NOT_COMPARED:
                same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), (where, a, b)  # NaN equals NaN here


def assert_same_run(reference: Path, run: Path, skip: tuple[str, ...] = ()) -> None:
    load = lambda path: torch.load(path, map_location="cpu", weights_only=True)  # noqa: E731
    names = sorted(p.name for p in (reference / "checkpoints").glob("*.pt"))
    assert names == sorted(p.name for p in (run / "checkpoints").glob("*.pt"))
    for name in names:
        if name not in skip:
            same(load(reference / "checkpoints" / name), load(run / "checkpoints" / name), name)
    strip = lambda events: [{k: v for k, v in e.items() if k not in TIMING} for e in events]  # noqa: E731
    assert strip(read_metrics(reference)) == strip(read_metrics(run))
    assert not list((run / "checkpoints").glob(".*.tmp"))


def last_update(run: Path) -> int:
    """The update of the newest readable checkpoint (0 before the first)."""
    for name in ("last.pt", "last.prev.pt"):
        try:
            return int(torch.load(run / "checkpoints" / name, weights_only=True)["update"])
        except Exception:  # missing or cut short by the kill: the trainer's fallback handles it
            continue
    return 0


def metrics_update(run: Path) -> int:
    """The update of the last complete metrics line (how far the killed trainer got)."""
    try:
        lines = (run / "metrics.jsonl").read_bytes().split(b"\n")[:-1]
        return int(json.loads(lines[-1])["update"]) if lines else 0
    except (OSError, ValueError, KeyError):
        return 0


def cli_child(argv: list[str], env: dict[str, str], stderr: str) -> None:
    """``polycats ARGV`` in a forked child with the NaN batches (its exit code is the process's)."""
    os.environ.update(env)
    poison_batches(pytest.MonkeyPatch(), NAN_BATCHES)  # the child's own copy of the trainer class
    descriptor = os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(descriptor, 2)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    sys.argv = ["polycats", *argv]
    from polycats.cli import main

    main()


def trainer_processes():
    """A fork server with polycats (and this module) imported: forking a trainer costs ~0.1 s.
    ``torch._dynamo`` is what the first ``torch.optim.Adam`` imports (~2.5 s)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(
        ["polycats.cli", "polycats.train.trainer", "torch.utils.tensorboard", "torch._dynamo", __name__]
    )
    forkserver.ensure_running()
    return context


@pytest.fixture(scope="module")
def processes():
    return trainer_processes()  # imports in the background while the reference trains


@pytest.fixture(scope="module")
def reference(processes, tmp_path_factory) -> tuple[Path, float]:
    """The uninterrupted run, in-process (same threads, same NaN batches), and the seconds its
    training took (imports warmed up, as in the fork server's children)."""
    path = tmp_path_factory.mktemp("reference") / "run"
    config = config_from_dict(CRASH)
    prepare(config.data)  # cached for the children too; not part of the timing
    ready = processes.Process(target=os.getpid)  # waits until the fork server has imported everything,
    ready.start()  # so that the timing below does not share the CPUs with it
    ready.join()
    with pytest.MonkeyPatch.context() as patch:
        poison_batches(patch, NAN_BATCHES)
        trainer = Trainer(config, path, progress=False)  # the first Adam imports torch._dynamo
        import torch.utils.tensorboard  # noqa: F401 (preloaded in the children)

        started = time.perf_counter()
        trainer.fit()
        seconds = time.perf_counter() - started
    skipped = [e for e in read_metrics(path) if e["event"] == "skipped_update"]
    assert [e["skipped_total"] for e in skipped] == [1, 2, 3]  # the injected NaN batches were survived
    return path, seconds


class Harness:
    """Stops one run again and again at random moments, with SIGKILL or (cycling through
    ``signals``) SIGTERM/SIGINT for a clean stop, resuming each time; then compares."""

    def __init__(self, root: Path, processes, reference: tuple[Path, float], seed: int, signals: list[signal.Signals]):
        self.root = root
        self.processes = processes
        self.reference, self.training_seconds = reference
        self.rng = random.Random(seed)
        self.signals = signals
        self.stop = signals[0]
        self.config = config_from_dict(CRASH)
        self.config_path = root / "crash.yaml"
        self.config_path.write_text(self.config.to_yaml(), encoding="utf-8")
        self.env = {"POLYCATS_CACHE": os.environ["POLYCATS_CACHE"]}
        self.stderr = root / "stderr.txt"
        self.stops: list[dict] = []
        self.completed: list[Path] = []

    def wait_until_training(self, process, run: Path, checkpoint: int) -> None:
        """Until the child holds the lock (SIGKILL: any moment after is fair game) or, for a clean
        stop, has logged an update past its checkpoint (its signal handlers are installed)."""
        owner = f"pid {process.pid} "
        deadline = time.monotonic() + 120
        while True:
            started = (run / ".lock").exists() and (run / ".lock").read_text().startswith(owner)
            if started and (self.stop == signal.SIGKILL or metrics_update(run) > checkpoint):
                return
            if process.exitcode is not None:  # finished (or failed) before that: the caller looks
                return
            assert time.monotonic() < deadline, "the trainer did not start"
            time.sleep(0.002)

    def attempt(self, run: Path, stop: bool) -> bool:
        """Start ``polycats train``; stop it at a random moment of the training left (or let it
        finish). True if it was stopped."""
        process = self.processes.Process(
            target=cli_child, args=(["train", str(self.config_path), "--out", str(run)], self.env, str(self.stderr)),
        )
        checkpoint = last_update(run)
        self.stop = self.signals[len(self.stops) % len(self.signals)]
        process.start()
        try:
            self.wait_until_training(process, run, checkpoint)
            started = time.perf_counter()
            done = max(checkpoint, metrics_update(run)) if self.stop != signal.SIGKILL else checkpoint
            left = 1 - done / self.config.train.max_updates
            delay = self.rng.uniform(0, 0.9 * left * self.training_seconds) if stop else None
            process.join(timeout=delay if delay is not None else 300)
            if process.exitcode is None:
                assert delay is not None, "the trainer did not finish"
                os.kill(process.pid, self.stop)
                process.join(timeout=60)
            # A clean stop that lands after the last update (its handlers already restored, the
            # process shutting down) ends a finished run by the signal's default action.
            shut_down = self.stop != signal.SIGKILL and last_update(run) == self.config.train.max_updates
            if process.exitcode == 0 or shut_down and process.exitcode in (-self.stop, 128 + self.stop):
                if stop and left > 0:  # it finished first: a busy machine; aim by how long this child took
                    self.training_seconds = min(self.training_seconds, (time.perf_counter() - started) / left)
                return False
            expected = -signal.SIGKILL if self.stop == signal.SIGKILL else 128 + self.stop
            assert process.exitcode == expected, (process.exitcode, self.stderr.read_text())
            checkpoints = run / "checkpoints"
            self.stops.append({
                "signal": self.stop.name, "after_s": round(delay, 3), "checkpoint_before": checkpoint,
                "reached": metrics_update(run), "checkpoint_after": last_update(run),
                # A kill inside a write: the temp file it left, or last.pt rotated away but not yet rewritten.
                "in_write": sorted(p.name for p in checkpoints.glob(".*.tmp"))
                + (["last.pt (rotated, not rewritten)"] if (checkpoints / "last.prev.pt").exists()
                   and not (checkpoints / "last.pt").exists() else []),
            })
            return True
        finally:
            if process.is_alive():
                process.kill()
                process.join()

    def run(self, stops: int) -> None:
        """Every run directory that reaches the end is kept for comparison (one more is started
        if a child ever outruns its stop)."""
        run = self.root / "run0"
        while len(self.stops) < stops:
            if not self.attempt(run, stop=True):
                self.completed.append(run)
                run = self.root / f"run{len(self.completed)}"
        assert not self.attempt(run, stop=False)  # the last resume runs to the end
        self.completed.append(run)
        # A clean stop writes an extra checkpoint (the update it stopped after), which may become
        # last.prev.pt: a valid fallback, but not the reference's.
        skip = () if self.signals == [signal.SIGKILL] else ("last.prev.pt",)
        for path in self.completed:
            assert_same_run(self.reference, path, skip)
        print(json.dumps({"training_seconds": round(self.training_seconds, 2),
                          "stops": self.stops, "completed_runs": len(self.completed)}))
        if os.environ.get("POLYCATS_CRASH_LOG"):  # for docs/reliability.md
            with open(os.environ["POLYCATS_CRASH_LOG"], "a", encoding="utf-8") as log:
                log.write(json.dumps({"signals": [s.name for s in self.signals], "stops": self.stops,
                                      "completed_runs": len(self.completed)}) + "\n")


def test_three_sigkills_resume_bit_identically(tmp_path, processes, reference):
    harness = Harness(tmp_path, processes, reference, seed=0, signals=[signal.SIGKILL])
    harness.run(3)
    assert len(harness.stops) == 3


def test_sigterm_and_sigint_stop_cleanly_and_resume_bit_identically(tmp_path, processes, reference):
    harness = Harness(tmp_path, processes, reference, seed=2, signals=[signal.SIGTERM, signal.SIGINT])
    harness.run(2)
    stderr = harness.stderr.read_text()
    assert "Traceback" not in stderr
    stopped = [line for line in stderr.splitlines() if line.startswith("stopped: ")]
    assert [line.split()[1] for line in stopped] == ["SIGTERM", "SIGINT"], stderr
    for line, stop in zip(stopped, harness.stops):
        # Each stop saved the update it stopped after, not only the last periodic checkpoint.
        update = int(line.split("stopped after update ")[1].split("/")[0])
        assert stop["checkpoint_after"] == update >= stop["reached"]


@pytest.mark.slow
def test_twenty_sigkills_resume_bit_identically(tmp_path, processes, reference):
    harness = Harness(tmp_path, processes, reference, seed=1, signals=[signal.SIGKILL])
    harness.run(20)
    assert len(harness.stops) == 20
