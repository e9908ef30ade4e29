"""Data parallelism with torchrun (2 gloo processes on the CPU).

Two processes with ``update_freq=1`` train on the same micro-batches as one process with
``update_freq=2`` (tests/test_accumulation.py checks that this equals one large batch), so their
parameters must agree within float tolerance, for the scalar balancer and for CATS, and every
rank must hold the same balancer state (α, λ, ...). A rank killed with SIGKILL, then the
documented command (``torchrun ... -m polycats train``), must end bit-identical to the
uninterrupted two-process run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from polycats.config import config_from_dict
from polycats.train.metrics import read_metrics
from polycats.train.trainer import train

from nan_injection import poison_batches
from test_accumulation import BASE
from test_crash_resume import same

WORKER = Path(__file__).with_name("ddp_worker.py")
# The accumulation tests' data and model (dropout off: ranks draw other dropout masks than one process).
CONFIG = {**BASE, "name": "ddp", "train": {"max_updates": 8, "max_tokens": 160, "warmup_updates": 2, "save_every": 3,
                                           "valid_every": 4, "log_every": 2, "threads": 1}}
CATS = {"name": "cats", "warmup_steps": 1, "update_every": 1}
BALANCERS = {
    "scalar": {"name": "scalar"},
    "cats": CATS,
    "cats-hvp": {**CATS, "constraint": "hvp"},  # the curvature probe: a scalar all-reduced per probe
    "cats-valid": {**CATS, "source": "valid", "constraint": "hvp"},  # validation rows computed per rank, summed
    "pcgrad": {"name": "pcgrad"},
    "gradvac": {"name": "gradvac"},  # draws its task order from the random state shared by the ranks
    "dro": {"name": "dro"},
}
POISONED = [4]  # the 4th step's loss is NaN on rank 1 only: every rank must skip it


def config(balancer: str, **train) -> dict:
    return {**CONFIG, "balancer": BALANCERS[balancer], "train": {**CONFIG["train"], **train}}


def torchrun(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parent)}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def launch(tmp_path: Path, name: str, runs: list[dict], check: bool = True, **spec) -> subprocess.CompletedProcess:
    """tests/ddp_worker.py under torchrun on ``runs`` (``{"config", "out"[, "poison"]}`` each)."""
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"runs": [{**run, "out": str(run["out"])} for run in runs], **spec}))
    return torchrun(str(WORKER), str(path), check=check)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Path:
    """A run of each balancer by two processes without interruption."""
    root = tmp_path_factory.mktemp("ddp")
    runs = [{"config": config(balancer), "out": root / balancer} for balancer in BALANCERS]
    runs.append({"config": config("cats"), "out": root / "cats-nan", "poison": {"rank": 1, "batches": POISONED}})
    launch(root, "all", runs)
    return root


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("balancer", list(BALANCERS))
def test_two_processes_equal_one_with_the_same_global_batch(two_processes, tmp_path, balancer):
    train(config_from_dict(config(balancer, update_freq=2)), tmp_path / "one", progress=False)
    one, two = load(tmp_path / "one" / "checkpoints" / "last.pt"), load(two_processes / balancer / "checkpoints" / "last.pt")
    assert two["world_size"] == 2 and two["update"] == one["update"] == 8 and len(two["rank_rng"]) == 2
    for name, tensor in one["model"].items():
        torch.testing.assert_close(two["model"][name], tensor, rtol=1e-4, atol=1e-6, msg=name)
    assert two["sampler"] == one["sampler"]  # the same batches were drawn
    # Every rank ends with the same balancer state, bit for bit (α, λ and the EMAs for CATS).
    same(load(two_processes / balancer / "balancer.rank0.pt"), load(two_processes / balancer / "balancer.rank1.pt"))
    if balancer.startswith("cats"):
        alpha = two["balancer"]["alpha"]
        assert not torch.allclose(alpha, torch.ones_like(alpha))
        torch.testing.assert_close(alpha, one["balancer"]["alpha"], rtol=1e-4, atol=1e-6)
    valid_one = [e["valid_nll"] for e in read_metrics(tmp_path / "one") if e["event"] == "valid"]
    valid_two = [e["valid_nll"] for e in read_metrics(two_processes / balancer) if e["event"] == "valid"]
    assert valid_two == pytest.approx(valid_one, rel=1e-5)


@pytest.mark.parametrize("name, saved", [("SIGKILL", 3), ("SIGTERM", 6)])
def test_a_rank_killed_or_stopped_resumes_to_the_uninterrupted_run(two_processes, tmp_path, name, saved):
    """SIGKILL before update 6: the checkpoint of update 3 is the last. SIGTERM then: both ranks
    finish update 6, save it and stop."""
    run = tmp_path / "cats"
    stopped = launch(tmp_path, "stopped", [{"config": config("cats"), "out": run}], check=False,
                     signal={"rank": 1, "at": 5, "name": name})
    assert stopped.returncode != 0
    assert load(run / "checkpoints" / "last.pt")["update"] == saved
    if name == "SIGTERM":
        assert stopped.stderr.count("SIGTERM received: stopped after update 6/8") == 2, stopped.stderr[-3000:]
    config_file = tmp_path / "cats.yaml"
    config_file.write_text(config_from_dict(config("cats")).to_yaml())
    resumed = torchrun("-m", "polycats", "train", str(config_file), "--out", str(run))
    assert f"resumed from update {saved}" in resumed.stdout and resumed.stdout.count("done: ") == 1  # rank 0 reports
    reference = two_processes / "cats"
    same(load(reference / "checkpoints" / "last.pt"), load(run / "checkpoints" / "last.pt"), "last.pt")
    strip = lambda events: [{k: v for k, v in e.items() if k != "tokens_per_s"} for e in events]  # noqa: E731
    assert strip(read_metrics(reference)) == strip(read_metrics(run))


def test_resuming_with_another_number_of_processes_is_refused(two_processes, tmp_path):
    import shutil

    from polycats.errors import PolycatsError

    shutil.copytree(two_processes / "scalar", tmp_path / "scalar")
    with pytest.raises(PolycatsError, match="trained by 2 process.*--nproc-per-node"):
        train(config_from_dict(config("scalar", max_updates=9)), tmp_path / "scalar", progress=False)


def test_a_loss_that_is_not_finite_on_one_rank_is_skipped_on_every_rank(two_processes, tmp_path, monkeypatch):
    run = two_processes / "cats-nan"
    skipped = [e for e in read_metrics(run) if e["event"] == "skipped_update"]
    assert [(e["update"], e["reason"]) for e in skipped] == [(3, "loss")]
    same(load(run / "balancer.rank0.pt"), load(run / "balancer.rank1.pt"))
    # One process skipping the same step (its 4th: both micro-batches) ends where the two did.
    poison_batches(monkeypatch, POISONED)
    train(config_from_dict(config("cats", update_freq=2)), tmp_path / "one", progress=False)
    one, two = load(tmp_path / "one" / "checkpoints" / "last.pt"), load(run / "checkpoints" / "last.pt")
    assert one["update"] == two["update"] == 8 and one["skipped_total"] == two["skipped_total"] == 1
    for name, tensor in one["model"].items():
        torch.testing.assert_close(two["model"][name], tensor, rtol=1e-4, atol=1e-6, msg=name)


def test_a_run_directory_in_use_stops_every_rank_with_one_message(tmp_path):
    from polycats.run.directory import RunLock

    run = tmp_path / "busy"
    run.mkdir()
    config_file = tmp_path / "scalar.yaml"
    config_file.write_text(config_from_dict(config("scalar")).to_yaml())
    lock = RunLock(run / ".lock").acquire()  # another training run holds it
    try:
        result = torchrun("-m", "polycats", "train", str(config_file), "--out", str(run), check=False)
    finally:
        lock.release()
    assert result.returncode != 0
    # Rank 0 is refused the lock and tells rank 1, which stops with the same message (no hang).
    assert result.stderr.count("is in use by another training run") == 2, result.stderr[-2000:]
    assert not re.search(r'polycats/\S+\.py", line', result.stderr)  # no traceback of ours (torchrun adds its own report)
    assert "exitcode  : 2" in result.stderr
    assert sorted(p.name for p in run.iterdir()) == [".lock"]
