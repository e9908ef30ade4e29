"""Reliability and bad input (docs/reliability.md): checkpoint checksums and the fallback to the
previous good checkpoint, the run-directory lock, the NaN/inf guard (trainer and balancers),
safe loading (malicious pickles, checkpoints of another config or version), and fuzzing of the
readers, the config loader, ``--set`` and ``translate``: every failure is one of our one-line
errors. (Kills and signals at random moments: tests/test_crash_resume.py.)"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import shlex
import signal
import string
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from polycats.balance import TaskStats
from polycats.config import DataConfig, config_from_dict, load_config
from polycats.data.corpus import ParallelCorpus, read_corpus
from polycats.errors import PolycatsError
from polycats.train import trainer as trainer_module
from polycats.run.build import build_balancer
from polycats.run.checkpoint import (
    CheckpointFallbackWarning, CorruptCheckpoint, load_checkpoint, save_checkpoint, state_checksum,
)
from polycats.run.directory import RunDir
from polycats.train.metrics import read_metrics
from polycats.train.trainer import Trainer, train

from cli_runner import assert_one_line_error, run_cli, text as cli_text
from nan_injection import poison_batches

# The data section of tests/test_crash_resume.py: prepared once per session for both.
TINY = {
    "name": "tiny",
    "data": {"source": "synthetic", "languages": {"de": 60, "sw": 20}, "valid_per_lang": 8, "test_per_lang": 8,
             "vocab_size": 60, "max_len": 40, "synthetic": {"words": 8, "min_words": 2, "max_words": 4}},
    "model": {"d_model": 16, "encoder_layers": 1, "decoder_layers": 1, "heads": 2, "ffn_dim": 32, "dropout": 0.1},
    "train": {"max_updates": 12, "max_tokens": 256, "warmup_updates": 3, "save_every": 4, "valid_every": 5,
              "log_every": 3, "threads": 1},
    "eval": {"beam": 1, "batch_size": 16, "max_len_b": 4, "max_len_a": 0.0},
}


def tiny(**sections) -> object:
    tree = json.loads(json.dumps(TINY))
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(tree.get(section), dict):
            tree[section].update(values)
        else:
            tree[section] = values
    return config_from_dict(tree)


def one_line(error: BaseException) -> str:
    message = str(error)
    assert message and "\n" not in message and "Traceback" not in message, repr(message)
    return message


def same(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            if key not in ("metrics_offset", "checksum"):
                same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), (where, a, b)


def assert_same_run(reference: Path, run: Path) -> None:
    load = lambda path: torch.load(path, weights_only=True)  # noqa: E731
    names = sorted(p.name for p in (reference / "checkpoints").glob("*.pt"))
    assert names == sorted(p.name for p in (run / "checkpoints").glob("*.pt"))
    for name in names:
        same(load(reference / "checkpoints" / name), load(run / "checkpoints" / name), name)
    strip = lambda events: [{k: v for k, v in e.items() if k != "tokens_per_s"} for e in events]  # noqa: E731
    assert strip(read_metrics(reference)) == strip(read_metrics(run))


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """An uninterrupted 12-update run (checkpoints at 4, 8, 12)."""
    run = tmp_path_factory.mktemp("straight") / "run"
    train(tiny(), run, progress=False)
    return run


@pytest.fixture
def run_to_8(tmp_path) -> Path:
    """The same run stopped at update 8: last.pt = 8, last.prev.pt = 4."""
    run = tmp_path / "run"
    train(tiny(train={"max_updates": 8}), run, progress=False)
    return run


# ------------------------------------------------------------------------------ checksums

def test_checksum_catches_a_changed_value(tmp_path):
    save_checkpoint({"model": {"w": torch.arange(6.0)}, "update": 3}, tmp_path / "a.pt")
    state = torch.load(tmp_path / "a.pt", weights_only=True)
    assert state["checksum"] == state_checksum(state)
    state["model"]["w"][2] = 2.5  # a silent change the zip container would not notice
    torch.save(state, tmp_path / "a.pt")
    with pytest.raises(CorruptCheckpoint, match="checksum"):
        load_checkpoint(tmp_path / "a.pt")


def test_checksum_catches_a_flipped_bit_on_disk(tmp_path):
    marker = torch.full((256,), 1.2345678)
    save_checkpoint({"model": {"w": marker}}, tmp_path / "a.pt")
    data = bytearray((tmp_path / "a.pt").read_bytes())
    at = bytes(data).index(marker.numpy().tobytes()) + 100
    data[at] ^= 0x10
    (tmp_path / "a.pt").write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpoint) as caught:
        load_checkpoint(tmp_path / "a.pt")
    assert "a.pt" in one_line(caught.value)


# ------------------------------------------------------------------------------ fallback

def test_a_corrupt_last_checkpoint_falls_back_to_the_previous_one_and_resumes_exactly(straight, run_to_8):
    last = run_to_8 / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])  # cut short
    (run_to_8 / "checkpoints" / ".last.pt.x1y2.tmp").write_bytes(b"left by a killed write")
    with pytest.warns(CheckpointFallbackWarning, match=r"last\.pt: not a polycats checkpoint \(or corrupt\).*resuming from .*last\.prev\.pt \(update 4\)"):
        train(tiny(), run_to_8, progress=False)
    assert_same_run(straight, run_to_8)
    assert (run_to_8 / "checkpoints" / "last.pt.unusable").exists()  # kept aside, never rotated into last.prev.pt
    assert not list((run_to_8 / "checkpoints").glob(".*.tmp"))


def test_a_kill_between_rotation_and_write_resumes_from_the_previous_one(straight, run_to_8):
    (run_to_8 / "checkpoints" / "last.pt").unlink()  # last.pt → last.prev.pt happened, the new write did not
    with pytest.warns(CheckpointFallbackWarning, match="missing"):
        train(tiny(), run_to_8, progress=False)
    assert_same_run(straight, run_to_8)


def test_no_usable_checkpoint_is_an_error_not_a_fresh_start(run_to_8):
    for name in ("last.pt", "last.prev.pt"):
        (run_to_8 / "checkpoints" / name).write_bytes(b"PK\x03\x04 not really a zip")
    metrics = (run_to_8 / "metrics.jsonl").read_bytes()
    with pytest.raises(PolycatsError) as caught:
        train(tiny(), run_to_8, progress=False)
    message = one_line(caught.value)
    assert "no usable checkpoint" in message and "last.pt" in message and "last.prev.pt" in message
    assert (run_to_8 / "metrics.jsonl").read_bytes() == metrics  # nothing was truncated


def test_a_checkpoint_pointing_past_metrics_falls_back(straight, run_to_8):
    """metrics.jsonl shorter than last.pt expects (e.g. lost in a crash of the whole machine)."""
    metrics = run_to_8 / "metrics.jsonl"
    offset = torch.load(run_to_8 / "checkpoints" / "last.prev.pt", weights_only=True)["metrics_offset"]
    metrics.write_bytes(metrics.read_bytes()[: offset + 10])
    with pytest.warns(CheckpointFallbackWarning, match="metrics.jsonl"):
        train(tiny(), run_to_8, progress=False)
    assert_same_run(straight, run_to_8)


def files_of(run: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in sorted(run.rglob("*")) if path.is_file()}


@pytest.mark.parametrize("damage", ["dangling link", "link loop", "both deleted"])
def test_a_run_that_lost_its_last_checkpoint_is_refused_not_restarted(straight, run_to_8, tmp_path, damage):
    """These silently started over at update 0 and rewrote metrics.jsonl, best.pt and the
    snapshots. Snapshots hold no optimizer or random state, so none is resumed from either."""
    checkpoints = run_to_8 / "checkpoints"
    for name in ("last.pt", "last.prev.pt"):
        (checkpoints / name).unlink()
    if damage == "dangling link":
        (checkpoints / "last.pt").symlink_to(tmp_path / "moved-to-another-disk.pt")
    elif damage == "link loop":
        (checkpoints / "last.pt").symlink_to("last.pt")
    (tmp_path / "tiny.yaml").write_text(tiny().to_yaml(), encoding="utf-8")
    before = files_of(run_to_8)
    message = assert_one_line_error(run_cli(["train", "tiny.yaml", "--out", str(run_to_8)], tmp_path),
                                    str(run_to_8), "metrics.jsonl up to update 8", "update_000008.pt",
                                    "no usable checkpoint", "--restart")
    assert ("broken symbolic link" in message) == (damage != "both deleted")
    assert files_of(run_to_8) == before  # nothing written, not even config.yaml
    process = run_cli(["train", "tiny.yaml", "--out", str(run_to_8), "--restart"], tmp_path)
    assert process.returncode == 0, cli_text(process)
    assert f"restarting: removed checkpoints/, metrics.jsonl, tb/ of the earlier run in {run_to_8}" in cli_text(process)[0]
    assert_same_run(straight, run_to_8)
    assert not os.path.lexists(checkpoints / "last.pt.unusable")


def test_a_broken_link_for_last_pt_falls_back_to_the_previous_one(straight, run_to_8, tmp_path):
    last = run_to_8 / "checkpoints" / "last.pt"
    last.unlink()
    last.symlink_to(tmp_path / "gone.pt")
    with pytest.warns(CheckpointFallbackWarning, match=r"last\.pt is a broken symbolic link .*resuming from .*last\.prev\.pt"):
        train(tiny(), run_to_8, progress=False)
    assert_same_run(straight, run_to_8)


def test_a_run_killed_before_its_first_periodic_checkpoint_resumes_from_update_0(straight, tmp_path):
    """A fresh run writes last.pt at update 0, right after its first event: so a kill before the
    first periodic checkpoint resumes, and metrics with no last checkpoint always mean a lost one."""
    run = tmp_path / "run"
    train(tiny(train={"max_updates": 3}), run, progress=False)  # checkpoints at 0 and 3 (the first periodic one: 4)
    checkpoints = run / "checkpoints"
    # As if killed after update 3, before its save:
    (checkpoints / "update_000003.pt").unlink()
    (checkpoints / "last.prev.pt").replace(checkpoints / "last.pt")
    assert torch.load(checkpoints / "last.pt", weights_only=True)["update"] == 0
    train(tiny(), run, progress=False)
    assert_same_run(straight, run)


# ------------------------------------------------------------------------------ safe loading

class Payload:
    """Unpickling this runs a shell command: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_is_refused_everywhere(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": Payload(marker), "update": 1}, tmp_path / "zip.pt")  # torch's zip format
    (tmp_path / "legacy.pt").write_bytes(pickle.dumps({"model": Payload(marker)}, protocol=2))  # a bare pickle
    for name in ("zip.pt", "legacy.pt"):
        with pytest.raises(CorruptCheckpoint) as caught:
            load_checkpoint(tmp_path / name)
        assert f"{name}: not a polycats checkpoint (or corrupt)" in one_line(caught.value)
    # In a run directory: resume and evaluate/translate refuse it too.
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for name in ("last.pt", "best.pt"):
        shutil.copy(tmp_path / "zip.pt", run / "checkpoints" / name)
    (run / "config.yaml").write_text(tiny().to_yaml(), encoding="utf-8")
    with pytest.raises(PolycatsError, match="no usable checkpoint"):
        train(tiny(), run, progress=False)
    with pytest.raises(PolycatsError, match="not a polycats checkpoint"):
        RunDir(run).load_model("best")
    assert not marker.exists()


def test_a_checkpoint_of_another_config_is_refused(straight, tmp_path):
    other = tmp_path / "other"
    (other / "checkpoints").mkdir(parents=True)
    shutil.copy(straight / "checkpoints" / "last.pt", other / "checkpoints" / "last.pt")
    (other / "metrics.jsonl").write_bytes((straight / "metrics.jsonl").read_bytes())
    with pytest.raises(PolycatsError) as caught:
        train(tiny(model={"ffn_dim": 48}), other, progress=False)
    message = one_line(caught.value)
    assert "different config" in message and "model.ffn_dim: 32 -> 48" in message


def test_a_checkpoint_from_before_a_new_option_resumes(run_to_8, straight):
    """A field added to the config since the checkpoint was written is at its default, not a
    "different config" (the two-stage sampling options were once such fields)."""
    path = run_to_8 / "checkpoints" / "last.pt"
    state = torch.load(path, weights_only=True)
    older = json.loads(state.pop("config"))
    del older["sampling"]["first_stage_updates"], older["sampling"]["first_stage_languages"]
    state.pop("checksum")
    save_checkpoint({**state, "config": json.dumps(older, sort_keys=True)}, path)
    train(tiny(), run_to_8, progress=False)
    resumed = torch.load(path, weights_only=True)
    reference = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)
    assert resumed["update"] == 12
    assert all(torch.equal(t, reference["model"][name]) for name, t in resumed["model"].items())


def test_a_checkpoint_of_a_newer_version_is_an_error_not_a_fallback(run_to_8):
    state = torch.load(run_to_8 / "checkpoints" / "last.pt", weights_only=True)
    torch.save({**state, "version": 99}, run_to_8 / "checkpoints" / "last.pt")
    with pytest.raises(PolycatsError, match="newer polycats"):
        train(tiny(), run_to_8, progress=False)


# ------------------------------------------------------------------------------ the lock

def test_one_trainer_per_run_directory(tmp_path):
    first = Trainer(tiny(), tmp_path / "run", progress=False)
    config_yaml = (tmp_path / "run" / "config.yaml").read_text()
    with pytest.raises(PolycatsError) as caught:
        Trainer(tiny(train={"max_updates": 3}), tmp_path / "run", progress=False)
    message = one_line(caught.value)
    assert "in use by another training run" in message and f"pid {os.getpid()}" in message
    assert (tmp_path / "run" / "config.yaml").read_text() == config_yaml  # the loser wrote nothing
    first.close()
    Trainer(tiny(), tmp_path / "run", progress=False).close()  # free again


def test_the_cli_reports_a_locked_run_directory_in_one_line(tmp_path):
    (tmp_path / "tiny.yaml").write_text(tiny().to_yaml(), encoding="utf-8")
    holder = Trainer(tiny(), tmp_path / "run", progress=False)
    process = run_cli(["train", "tiny.yaml", "--out", "run"], tmp_path)
    holder.close()
    assert_one_line_error(process, "in use")


@pytest.mark.parametrize("existing", [False, True], ids=["new --out", "empty --out"])
def test_a_train_that_cannot_start_leaves_nothing_behind(tmp_path, existing):
    """A failed prepare used to leave config.yaml and .lock, and the corrected config was then
    refused as "a different config"."""
    run = tmp_path / "run"
    if existing:
        run.mkdir()
    (tmp_path / "bad.yaml").write_text(tiny(data={"max_len": 3}).to_yaml(), encoding="utf-8")  # too few short pairs
    (tmp_path / "good.yaml").write_text(tiny(train={"max_updates": 2}).to_yaml(), encoding="utf-8")
    assert_one_line_error(run_cli(["train", "bad.yaml", "--out", "run"], tmp_path), "data.max_len=3")
    assert (list(run.iterdir()) == []) if existing else not run.exists()
    process = run_cli(["train", "good.yaml", "--out", "run"], tmp_path)
    assert process.returncode == 0, cli_text(process)


def test_a_resume_says_where_it_resumed_from(run_to_8, capsys):
    capsys.readouterr()
    train(tiny(), run_to_8, progress=False)
    out = capsys.readouterr().out
    assert out.count("resumed from") == 1
    assert f"resumed from update 8 (checkpoint {run_to_8 / 'checkpoints' / 'last.pt'})\n" in out


def test_the_progress_bar_shows_the_validation_nll_and_labelled_times(tmp_path, capsys):
    train(tiny(train={"max_updates": 5}), tmp_path / "run", progress=True)
    out = capsys.readouterr().out
    valid = read_metrics(tmp_path / "run")[-1]["valid_nll"]
    assert f"valid {valid:.3f}" in out and "elapsed" in out and "left" in out, out


def test_a_lock_file_left_by_a_dead_process_does_not_block(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").write_text("pid 999999 on a-machine-that-crashed\n")
    train(tiny(train={"max_updates": 2}), tmp_path / "run", progress=False)
    assert (tmp_path / "run" / ".lock").read_text().startswith(f"pid {os.getpid()} ")


def test_a_second_signal_stops_at_once_and_releases_the_directory(tmp_path, monkeypatch):
    step = Trainer.train_step

    def signalled_step(self, batch):
        if self.state.batches_drawn == 2:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return step(self, batch)

    monkeypatch.setattr(Trainer, "train_step", signalled_step)
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN where pytest runs as a background job
    with pytest.raises(KeyboardInterrupt):
        train(tiny(), tmp_path / "run", progress=False)
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored
    Trainer(tiny(), tmp_path / "run", progress=False).close()  # lock released


def test_an_early_stopped_run_stays_stopped(tmp_path, monkeypatch):
    monkeypatch.setattr(Trainer, "validate", lambda self: {"valid_nll": 1.0})  # never improves after the first
    config = tiny(train={"patience": 1})
    train(config, tmp_path / "run", progress=False)
    events = read_metrics(tmp_path / "run")
    assert events[-1]["event"] == "early_stop" and events[-1]["update"] == 10
    train(config, tmp_path / "run", progress=False)  # "resumed": nothing more to do
    assert read_metrics(tmp_path / "run") == events
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["update"] == 10


# ------------------------------------------------------------------------------ NaN / inf guard

def test_injected_nan_batches_are_skipped_counted_and_logged(tmp_path, monkeypatch, capsys):
    poison_batches(monkeypatch, {3, 4})
    train(tiny(), tmp_path / "run", progress=False)
    events = read_metrics(tmp_path / "run")
    skipped = [e for e in events if e["event"] == "skipped_update"]
    assert [(e["update"], e["reason"], e["skipped_in_a_row"], e["skipped_total"]) for e in skipped] == [
        (2, "loss", 1, 1), (2, "loss", 2, 2)]
    assert all(set(e["tasks"].split(",")) <= {"de-en", "sw-en"} and e["tasks"] for e in skipped)
    assert "non-finite loss" in capsys.readouterr().err
    trains = [e for e in events if e["event"] == "train"]
    assert [e["update"] for e in trains] == [3, 6, 9, 12]
    assert all(e["train_nll"] is not None and math.isfinite(e["train_nll"]) for e in trains)  # NaN kept out of the averages
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert state["update"] == 12 and state["skipped_total"] == 2
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_too_many_non_finite_updates_in_a_row_stop_with_the_last_good_state(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_module, "MAX_SKIPPED_IN_A_ROW", 3)
    with pytest.MonkeyPatch.context() as nan, pytest.raises(PolycatsError) as caught:
        poison_batches(nan, {4, 5, 6})
        train(tiny(), tmp_path / "run", progress=False)
    message = one_line(caught.value)
    assert "3 updates in a row" in message and "update 3" in message and "last.pt" in message
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    train(tiny(train={"max_updates": 3}), tmp_path / "three", progress=False)
    three = torch.load(tmp_path / "three" / "checkpoints" / "last.pt", weights_only=True)
    same(three["model"], saved["model"])  # the skipped batches changed nothing
    same(three["optimizer"], saved["optimizer"])
    assert saved["update"] == 3 and saved["skipped_in_a_row"] == 3
    # The bad batches are behind it (and no longer poisoned): the same command continues.
    train(tiny(), tmp_path / "run", progress=False)
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["update"] == 12


BALANCERS = [{"name": "cats", "warmup_steps": 0}, {"name": "cats", "warmup_steps": 0, "objective": "loss"},
             {"name": "dro", "rho": 0.5}, {"name": "gradvac"}, {"name": "upgrad"}, {"name": "pcgrad"}]


@pytest.mark.parametrize("balancer", BALANCERS, ids=lambda b: "-".join(map(str, b.values())))
def test_balancers_keep_finite_weights_through_nan_batches(tmp_path, monkeypatch, balancer):
    poison_batches(monkeypatch, {2, 3, 5})
    trainer = Trainer(tiny(balancer=balancer, train={"max_updates": 5, "log_every": 1}), tmp_path / "run", progress=False)
    trainer.fit()
    assert trainer.state.update == 5 and trainer.state.skipped_total == 3
    assert bool(torch.isfinite(trainer.balancer.loss_weights()).all())
    for name, parameter in trainer.model.named_parameters():
        assert bool(torch.isfinite(parameter).all()), name
    for event in read_metrics(tmp_path / "run"):
        for key, value in event.items():
            if key.startswith(("alpha/", "weight/", "dro/q/")) or key == "lambda":
                assert value is not None and math.isfinite(value), (event["update"], key, value)


finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)
odd = st.sampled_from([math.nan, math.inf, -math.inf, 1e38, -1e38, 0.0])


@st.composite
def task_stats(draw, k: int = 3, p: int = 5):
    tokens = draw(st.lists(st.sampled_from([0.0, 1.0, 7.0, 40.0]), min_size=k, max_size=k))
    losses = draw(st.lists(st.one_of(finite.map(abs), odd), min_size=k, max_size=k))
    grads = draw(st.lists(st.one_of(finite, finite, finite, odd), min_size=k * p, max_size=k * p))
    grads = torch.tensor(grads, dtype=torch.float32).reshape(k, p) * torch.tensor(tokens).clamp(max=1).unsqueeze(1)
    return TaskStats(torch.tensor(losses, dtype=torch.float32) * torch.tensor(tokens).clamp(max=1), torch.tensor(tokens), grads)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(balancer=st.sampled_from(BALANCERS), steps=st.lists(task_stats(), min_size=1, max_size=5))
def test_balancer_weights_stay_finite_whatever_the_statistics(balancer, steps):
    """CATS and the peers on per-task statistics with NaN/±inf/huge entries, absent tasks: the
    weights they apply and log stay finite, and finite statistics give a finite direction."""
    config = tiny(balancer=balancer)
    instance = build_balancer(config, ["de-en", "sw-en", "fr-en"], torch.tensor([0.5, 0.3, 0.2]).numpy())
    for stats in steps:
        if instance.plan(0).task_gradients:
            direction = instance.combine(stats)
            inputs_finite = bool(torch.isfinite(stats.grads).all() and torch.isfinite(stats.losses).all())
            if inputs_finite and stats.grads.abs().max() < 1e30:
                assert bool(torch.isfinite(direction).all())
        else:
            instance.observe_losses(stats.losses, stats.tokens)
        assert bool(torch.isfinite(instance.loss_weights()).all())
        for key, value in instance.log_values().items():
            if key.startswith(("alpha/", "weight/")) or key == "lambda":
                assert math.isfinite(value), (key, value)


# ------------------------------------------------------------------------------ fuzzing: readers

# Text that has broken line-oriented tools: combining marks, RTL/bidi controls, zero-width
# characters, C0/C1 controls, Unicode line separators, BOMs, noncharacters, surrogate-free astral.
ODD_CHARACTERS = (
    "a b\u0301\u0308\u20dd\u05d0\u0627\u202e\u202c\u200f\u2067\u2069\u200b\u200c\u200d\u2060\ufeff"
    "\x00\x01\x07\x0b\x0c\x1b\x1f\x7f\x85\x9f\u2028\u2029\ufffe\uffff\ue000\U0001f469\u200d\U0001f467"
    "\t\r<>/\\"
)
odd_text = st.text(alphabet=st.sampled_from(ODD_CHARACTERS), max_size=40) | st.text(max_size=40)
line = odd_text | st.builds(lambda c, n: c * n, st.sampled_from(["x", "\u0301", "ab "]), st.integers(2000, 9000))
file_bytes = st.one_of(
    st.lists(line, max_size=6).map(lambda lines: "\n".join(lines).encode("utf-8")),
    st.binary(max_size=60),
)


def text_corpus(root: Path, files: dict[str, bytes]) -> None:
    for split in ("train", "valid", "test"):
        for side in ("de", "en"):
            (root / f"{split}.de-en.{side}").write_bytes(files[f"{split}.{side}"])


corpus_files = st.fixed_dictionaries({f"{split}.{side}": file_bytes for split in ("train", "valid", "test")
                                      for side in ("de", "en")})


@st.composite
def aligned_corpus_files(draw):
    """Line-aligned files whose lines mostly have some text: fuzz that gets past the reader."""
    files = {}
    for split in ("train", "valid", "test"):
        count = draw(st.integers(1, 4))
        for side in ("de", "en"):
            lines = draw(st.lists(line | line.map(lambda text: "w " + text), min_size=count, max_size=count))
            files[f"{split}.{side}"] = "\n".join(lines).encode("utf-8")
    return files


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=corpus_files | aligned_corpus_files(), wanted=st.integers(1, 4))
def test_text_reader_on_any_bytes_returns_clean_pairs_or_one_clear_error(tmp_path_factory, files, wanted):
    root = tmp_path_factory.mktemp("fuzz")
    text_corpus(root, files)
    try:
        corpus = read_corpus(DataConfig(source="text", path=root, languages={"de": wanted}, valid_per_lang=3, test_per_lang=3))
    except PolycatsError as error:
        event(f"error: {one_line(error).replace(str(root), 'DIR')[:45]}")
        return
    event("read")
    assert isinstance(corpus, ParallelCorpus)
    for split in corpus.pairs.values():
        for src, tgt in split["de"]:
            for side in (src, tgt):
                assert side and side == side.strip() and "\n" not in side and "\x00" not in side and "\u200b" not in side


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(files=aligned_corpus_files())
def test_prepare_on_odd_text_gives_data_or_one_clear_error(tmp_path_factory, files):
    """The whole prepare (SentencePiece included) on fuzzed corpora."""
    from polycats.data.prepare import prepare

    root = tmp_path_factory.mktemp("fuzz")
    text_corpus(root, files)
    config = DataConfig(source="text", path=root, languages={"de": 1}, valid_per_lang=3, test_per_lang=3,
                        vocab_size=40, max_len=4096, tokenizer_sentences=50)
    try:
        data = prepare(config, root=root / "prepared")
    except PolycatsError as error:
        event(f"error: {one_line(error).replace(str(root), 'DIR')[:45]}")
        return
    event("prepared")
    assert len(data.split("train")["de-en"]) == 1
    for arrays in data.split("test").values():
        assert all(len(ids) <= 1026 for ids in arrays.src)  # tag + 1024 pieces + eos, whatever the line length


def test_prepare_on_only_very_long_lines_is_a_clear_error(tmp_path):
    from polycats.data.prepare import prepare

    files = {f"{split}.{side}": ("x" * 9000 + "\n").encode() * 3 for split in ("train", "valid", "test") for side in ("de", "en")}
    text_corpus(tmp_path, files)
    with pytest.raises(PolycatsError, match="longer than 4192 bytes"):
        prepare(DataConfig(source="text", path=tmp_path, languages={"de": 2}, valid_per_lang=3, test_per_lang=3,
                           max_len=10**6), root=tmp_path / "prepared")


# ------------------------------------------------------------------------------ fuzzing: configs and --set

SECTIONS = {
    "data": ["source", "path", "direction", "pivot", "languages", "valid_per_lang", "vocab_size", "max_len", "groups"],
    "sampling": ["temperature", "weights"],
    "balancer": ["name", "weights", "lr_alpha", "warmup_steps", "rho"],
    "model": ["d_model", "heads", "dropout", "encoder_layers"],
    "train": ["max_updates", "lr", "adam_betas", "clip_norm", "seed", "threads"],
    "eval": ["beam", "checkpoint"],
}
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10, 10**12), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8), st.sampled_from(["cats", "scalar", "upgrad", "synthetic", "text", "m2o", "en", "de", "best"]),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.sampled_from(["de", "sw", "en", "x", "lores_below", "hires_from", "name", "", "pt-BR", "1"]), inner, max_size=3),
    max_leaves=8)
section_trees = st.fixed_dictionaries(
    {}, optional={section: st.dictionaries(st.sampled_from([*fields, "bogus"]), values, max_size=4) | values
                  for section, fields in SECTIONS.items()} | {"name": values, "extra": values})


@settings(max_examples=200, deadline=None)
@given(tree=section_trees)
def test_any_config_tree_validates_or_fails_with_one_line(tree):
    try:
        config = config_from_dict(tree, "fuzz.yaml")
    except PolycatsError as error:
        assert one_line(error).startswith("invalid config fuzz.yaml")
        return
    for language in [*config.data.languages, config.data.pivot]:  # what files, tags and task names are made of
        assert language and "-" not in language and "/" not in language
    assert math.isfinite(config.train.lr) and all(0 <= b < 1 for b in config.train.adam_betas)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.sampled_from("ab :-{}[]&*!|>'\"\n\t#%@`?,.0123456789\x00\u0085\ufeff"), max_size=80)
       | st.text(max_size=80) | st.binary(max_size=80).map(lambda b: b.decode("latin-1")))
def test_any_config_file_loads_or_fails_with_one_line(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("cfg") / "fuzz.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        load_config(path)
    except PolycatsError as error:
        one_line(error)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(overrides=st.lists(st.text(max_size=30) | st.builds(
    lambda key, value: f"{key}={value}",
    st.sampled_from(["train.lr", "data.languages", "data.languages.de", "balancer", "balancer.name", "model", "a.b.c", "",
                     "train.adam_betas", "data.pivot", "..", "train"]),
    st.text(alphabet=string.printable, max_size=20)), max_size=3))
def test_any_set_override_applies_or_fails_with_one_line(tmp_path_factory, overrides):
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(tiny().to_yaml(), encoding="utf-8")
    try:
        load_config(path, overrides)
    except PolycatsError as error:
        one_line(error)


@pytest.mark.parametrize("text, fragment", [
    ("x: " + "[" * 1200 + "]" * 1200 + "\n", "nested too deeply"),
    ("data: {source: synthetic, languages: {de: 10}}\ntrain: {lr: .inf}\n", "field 'train.lr': must be a finite number"),
    ("data: {source: synthetic, languages: {de: 10}}\nbalancer: {name: cats, lr_alpha: .nan}\n", "balancer.lr_alpha"),
    ("data: {source: synthetic, languages: {pt-BR: 10}}\n", "not a language code"),
    ("data: {source: synthetic, languages: {de: 10}, pivot: ''}\n", "not a language code"),
    ("data: {source: synthetic, languages: {de: 10}}\ntrain: {adam_betas: [2, -1]}\n", "Adam betas"),
])
def test_config_inputs_that_used_to_crash_or_pass_silently(tmp_path, text, fragment):
    """Found by the fuzzers above: a RecursionError traceback, inf/NaN settings accepted (NaN
    training), '-' in language codes (a ValueError deep in prepare), invalid Adam betas (torch's
    ValueError at the first update)."""
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(PolycatsError) as caught:
        load_config(path)
    assert fragment in one_line(caught.value)


# ------------------------------------------------------------------------------ fuzzing: translate (CLI)

@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("translate") / "run"
    train(tiny(train={"max_updates": 2}), run, progress=False)
    return run


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stdin=file_bytes | st.lists(line, max_size=4).map(lambda lines: "\n".join(lines).encode()),
       src=st.sampled_from(["sw", "sw", "sw", "de", "en", "xx", "", "sw\n", "-"]))
def test_translate_any_input_gives_one_line_per_line_or_one_clear_error(trained, stdin, src):
    process = run_cli(["translate", str(trained), "--src-lang", src, "--tgt-lang", "en"], trained, stdin)
    code, (out, err) = process.returncode, cli_text(process)
    assert "Traceback" not in err
    event("translated" if code == 0 else f"error: {err[:30]}")
    if code == 0:
        lines = stdin.decode("utf-8").split("\n")
        expected = len(lines) - (lines[-1] == "")
        assert out.count("\n") == expected and not err
    else:
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err


# ------------------------------------------------------------------------------ the file system (CLI)

@contextmanager
def read_only(directory: Path) -> Iterator[None]:
    """``directory`` (and what is in it) read-only inside the block. Permission bits bind a normal
    user; root ignores them, so as root: a read-only bind mount (skipped where mounting is not
    allowed)."""
    if os.geteuid() != 0:
        modes = {path: path.stat().st_mode for path in [directory, *directory.rglob("*")]}
        for path, mode in modes.items():
            path.chmod(mode & ~0o222)
        try:
            yield
        finally:
            for path, mode in modes.items():
                path.chmod(mode)
        return
    if subprocess.run(["mount", "--bind", directory, directory], capture_output=True).returncode != 0:
        pytest.skip("no way to make a read-only directory here (root, and mount is not allowed)")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", directory], check=True, capture_output=True)
        yield
    finally:
        subprocess.run(["umount", directory], check=True, capture_output=True)


@contextmanager
def unwritable(kind: str, tmp_path: Path) -> Iterator[Path]:
    """A path that cannot be written: under a file, under /proc, or in a read-only directory."""
    if kind == "file":
        (tmp_path / "a-file").write_text("keep me\n")
        yield tmp_path / "a-file"
        assert (tmp_path / "a-file").read_text() == "keep me\n"
    elif kind == "proc":
        yield Path("/proc/polycats-test")
    else:
        (tmp_path / "ro").mkdir()
        with read_only(tmp_path / "ro"):
            yield tmp_path / "ro" / "out"
        assert not list((tmp_path / "ro").iterdir())  # nothing half-written


KINDS = ["file", "proc", "read-only"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_cache_that_cannot_be_written_is_one_line_naming_POLYCATS_CACHE(tmp_path, kind):
    (tmp_path / "tiny.yaml").write_text(tiny().to_yaml(), encoding="utf-8")
    with unwritable(kind, tmp_path) as cache:
        process = run_cli(["prepare", "tiny.yaml"], tmp_path, env={"POLYCATS_CACHE": str(cache)})
    assert_one_line_error(process, str(cache), "set POLYCATS_CACHE to a writable directory")


def test_an_empty_POLYCATS_CACHE_is_unset(monkeypatch):
    from polycats.config import cache_dir

    monkeypatch.setenv("POLYCATS_CACHE", "")
    assert cache_dir() == Path.home() / ".cache" / "polycats"  # not the current directory


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("command", ["train", "demo", "report"])
def test_an_out_that_cannot_be_written_is_one_line_and_nothing_runs(trained, tmp_path, command, kind):
    (tmp_path / "tiny.yaml").write_text(tiny().to_yaml(), encoding="utf-8")
    with unwritable(kind, tmp_path) as out:
        args = {"train": ["train", "tiny.yaml"], "demo": ["demo"], "report": ["report", str(trained)]}[command]
        process = run_cli([*args, "--out", str(out)], tmp_path)
    assert_one_line_error(process, str(out if kind == "file" else out.parent), "writable")


@pytest.mark.parametrize("command", ["evaluate", "analyze", "train"])
def test_a_read_only_run_directory_is_one_line_naming_it(trained, tmp_path, command):
    """evaluate writes eval/, analyze analysis/, and a resumed train everything: refused at once."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (tmp_path / "tiny.yaml").write_text(tiny(train={"max_updates": 4}).to_yaml(), encoding="utf-8")
    args = {"evaluate": ["evaluate", str(run)], "analyze": ["analyze", str(run), "--checkpoint", "last"],
            "train": ["train", "tiny.yaml", "--out", str(run)]}[command]
    before = sorted(path.relative_to(run) for path in run.rglob("*"))
    with read_only(run):
        process = run_cli(args, tmp_path)
    assert_one_line_error(process, str(run), "make it writable")
    assert sorted(path.relative_to(run) for path in run.rglob("*")) == before


# ------------------------------------------------------------------------------ CLI usage and numbers

@pytest.mark.parametrize("args, fragment", [
    (["train", "tiny.yaml"], "Missing option '--out'"),
    (["analyze", "run", "--sentences", "abc"], "'--sentences'"),
    (["evaluate"], "Missing argument"),
    (["no-such-command"], "No such command"),
])
def test_usage_errors_are_one_line_like_every_other_error(tmp_path, args, fragment):
    """Click's own are a usage line, a hint and a box."""
    assert_one_line_error(run_cli(args, tmp_path), fragment, "--help")


@pytest.mark.parametrize("args, fragment", [
    (["--tol", "nan"], "--tol"), (["--tol", "inf"], "--tol"), (["--tol", "0"], "--tol"), (["--tol", "1"], "--tol"),
    (["--tol", "-1e-4"], "--tol"), (["--sentences", "0"], "--sentences"), (["--max-iter", "0"], "--max-iter"),
    (["--seed", "-1"], "--seed"),
])
def test_numeric_options_out_of_range_are_refused_before_any_work(trained, args, fragment):
    """``analyze --tol nan`` once ran for minutes and wrote NaN into summary.json."""
    assert_one_line_error(run_cli(["analyze", str(trained), *args], trained), fragment)
    assert not (trained / "analysis").exists()


def test_experiment_workers_must_be_positive(tmp_path):
    assert_one_line_error(run_cli(["experiment", "grid.yaml", "--out", "x", "--workers", "0"], tmp_path), "--workers")
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------ config hardening

@pytest.mark.parametrize("text, fragment", [
    ("data: {source: synthetic, languages: {de: true}}\n", "field 'data.languages.de': Input should be a valid integer"),
    ("data: {source: synthetic, languages: {de: '10'}}\n", "field 'data.languages.de'"),
    ("data: {source: synthetic, languages: {de: 10}}\ntrain: {max_updates: false}\n", "field 'train.max_updates'"),
    ("data: {source: synthetic, languages: {de: 10, sw: 5, de: 20}}\n", "line 1: duplicate key 'de'"),
    ("data: {source: synthetic, languages: {de: 10}}\ntrain: {lr: 0.1}\ndata: {source: synthetic, languages: {de: 2}}\n",
     "line 3: duplicate key 'data'"),
    ("base: &b {source: synthetic, languages: {de: 10}}\ndata: *b\n", "line 2: YAML aliases (*b) are not allowed"),
])
def test_config_values_that_were_silently_accepted(tmp_path, text, fragment):
    """``de: true`` was 1 pair, a repeated key or section silently replaced the first."""
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(PolycatsError) as caught:
        load_config(path)
    assert fragment in one_line(caught.value) and "c.yaml" in str(caught.value)


def test_a_yaml_alias_bomb_fails_fast(tmp_path):
    """Nine levels of nine aliases: 477 bytes that expand to 9**9 values (the loader hung)."""
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [{','.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert len(path.read_bytes()) < 500
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("the alias bomb was not refused within 10 s"))
    signal.alarm(10)
    try:
        with pytest.raises(PolycatsError, match=r"line 2: YAML aliases \(\*a0\) are not allowed"):
            load_config(path)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)


def test_yaml_1_2_floats_are_numbers(tmp_path):
    """YAML 1.1 reads 1e-3 as a string, which the strict number fields refuse."""
    path = tmp_path / "c.yaml"
    path.write_text("data: {source: synthetic, languages: {de: 10}}\ntrain: {lr: 1e-3}\n", encoding="utf-8")
    assert load_config(path).train.lr == 1e-3
    assert load_config(path, ["train.lr=2E-4", "train.max_updates=10"]).train.lr == 2e-4


# ------------------------------------------------------------------------------ messages, modes, decoding

@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated", b"not a checkpoint at all", None], ids=["empty", "zip", "text", "unsafe"])
def test_a_corrupt_checkpoint_says_so_in_our_words(tmp_path, content):
    """Not torch's weights_only essay, cut mid-word."""
    path = tmp_path / "x.pt"
    if content is None:
        torch.save({"model": {}, "path": Path("x")}, path)  # an object the safe unpickler refuses
    else:
        path.write_bytes(content)
    with pytest.raises(CorruptCheckpoint) as caught:
        load_checkpoint(path)
    assert one_line(caught.value) == f"{path}: not a polycats checkpoint (or corrupt); delete it or point to another checkpoint"


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_atomic_writes_respect_the_umask(tmp_path, umask):
    from polycats.io import atomic_torch_save, atomic_write_json, atomic_write_text

    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        atomic_write_json(tmp_path / "a.json", {})
        atomic_torch_save({}, tmp_path / "a.pt")
        (tmp_path / "plain").write_text("x")
    finally:
        os.umask(old)
    modes = {path.name: path.stat().st_mode & 0o777 for path in tmp_path.iterdir()}
    assert modes == dict.fromkeys(["a.txt", "a.json", "a.pt", "plain"], 0o666 & ~umask)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_prepared_folders_respect_the_umask(tmp_path, umask):
    """The cache entry and the run's evaluation copy are built in a staging folder and renamed:
    mkdtemp's 0700 hid a shared cache from the other users of a machine."""
    from polycats.config import DataConfig
    from polycats.data.prepare import copy_for_evaluation, prepare

    old = os.umask(umask)
    try:
        data = prepare(DataConfig(source="synthetic", languages={"de": 30, "sw": 10}, valid_per_lang=2, test_per_lang=2,
                                  vocab_size=60), tmp_path / "cache")
        copy_for_evaluation(data, tmp_path / "run-data")
        (tmp_path / "plain").mkdir()
    finally:
        os.umask(old)
    modes = {path.name: path.stat().st_mode & 0o777 for path in (data.root, tmp_path / "run-data", tmp_path / "plain")}
    assert modes == {data.root.name: 0o777 & ~umask, "run-data": 0o777 & ~umask, "plain": 0o777 & ~umask}


def test_a_trained_run_has_no_private_files(straight):
    """config.yaml and the checkpoints were 0600 beside 0644 metrics."""
    mode = lambda path: path.stat().st_mode & 0o777  # noqa: E731
    for path in [straight / "config.yaml", *(straight / "checkpoints").glob("*.pt")]:
        assert mode(path) == mode(straight / "metrics.jsonl"), path


@pytest.mark.parametrize("beam", [1, 3])
def test_decoding_never_emits_tags_or_unk_even_when_the_model_prefers_them(trained, monkeypatch, beam):
    """A barely trained model's hypotheses held <2xx> tags (each source starts with one): here a
    model biased towards tags and unk by +100 in its logits still translates into words."""
    from polycats.data.prepare import UNK, language_tag
    from polycats.evaluate.run import evaluate_run
    from polycats.model.transformer import Transformer

    run = RunDir(trained)
    data = run.prepared()
    preferred = [UNK, *(data.tokenizer.piece_to_id(language_tag(language)) for language in ("de", "sw", "en"))]
    assert len(set(preferred)) == 4
    decode = Transformer.decode
    bias = torch.zeros(data.vocab_size)
    bias[preferred] = 100.0
    monkeypatch.setattr(Transformer, "decode", lambda self, tgt_in, cache: decode(self, tgt_in, cache) + bias)
    config = (trained / "config.yaml").read_text()
    try:
        (trained / "config.yaml").write_text(config.replace("beam: 1", f"beam: {beam}"))
        report = evaluate_run(trained, "test", "last")
        process = run_cli(["translate", str(trained), "--src-lang", "sw", "--tgt-lang", "en"], trained,
                          "\n".join(item["src"] for item in data.references("test")["sw-en"]).encode())
    finally:
        (trained / "config.yaml").write_text(config)
    assert report["decoding"]["beam"] == beam
    hypotheses = [(trained / "eval" / f"test.{task}.hyp").read_text() for task in data.tasks]
    translations = cli_text(process)[0]
    assert process.returncode == 0 and translations.strip()
    for output in [*hypotheses, translations]:
        assert "<2" not in output and "\u2047" not in output, output[:200]  # no tag, no unk (⁇)


def test_the_demo_summary_command_can_be_pasted_into_a_shell():
    """--set values with spaces or braces were written unquoted (and outside the code span)."""
    from polycats.demo import demo_command

    overrides = ["data.languages={de: 10, sw: 5}", "train.max_updates=20", "name=it's"]
    command = demo_command(Path("runs/my demo"), ("T=1", "CATS"), overrides)
    assert shlex.split(command) == ["polycats", "demo", "--out", "runs/my demo", "--methods", "T=1,CATS",
                                    *(word for override in overrides for word in ("--set", override))]


def test_a_run_evaluates_and_translates_after_its_corpus_and_cache_are_gone(tmp_path, monkeypatch):
    """Issue 17 item 8: data.path is stored absolute, and a run keeps its own copy of the
    tokenizer and valid/test data, used (with a warning) when the corpus cannot be read."""
    from polycats.data.prepare import PreparedDataWarning
    from polycats.evaluate.run import evaluate_run, translate_lines
    from test_prepare import text_config, write_text_corpus

    monkeypatch.setenv("POLYCATS_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    write_text_corpus(tmp_path / "corpus")
    config = config_from_dict({
        "data": text_config(Path("corpus")).model_dump(mode="json"),
        "model": {"d_model": 16, "encoder_layers": 1, "decoder_layers": 1, "heads": 2, "ffn_dim": 32},
        "train": {"max_updates": 2, "max_tokens": 200, "warmup_updates": 1, "save_every": 2, "valid_every": 2},
        "eval": {"beam": 1},
    })
    train(config, tmp_path / "run", progress=False)
    before = evaluate_run(tmp_path / "run", "test")
    assert (tmp_path / "run" / "data" / "spm.model").exists()
    (tmp_path / "corpus").rename(tmp_path / "moved")
    monkeypatch.setenv("POLYCATS_CACHE", str(tmp_path / "empty cache"))
    monkeypatch.chdir(tmp_path / "moved")  # another working directory too
    with pytest.warns(PreparedDataWarning, match="using the run's own copy"):
        after = evaluate_run(tmp_path / "run", "test")
    assert after["per_language"] == before["per_language"]
    with pytest.warns(PreparedDataWarning):
        assert len(translate_lines(tmp_path / "run", ["alpha beta"], "de", "en")) == 1
