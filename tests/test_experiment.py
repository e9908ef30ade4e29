"""``polycats experiment``: grid expansion with stable names, skip/resume of interrupted grids,
commit recording and the mixed-commit refusal, parallel workers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from polycats import experiment
from polycats.errors import CannotResume, PolycatsError
from polycats.experiment import GridSpec, expand, run_grid
from polycats.train.metrics import read_metrics
from polycats.train.trainer import Trainer

BASE = {
    "name": "tiny",
    "data": {
        "source": "synthetic", "languages": {"de": 200, "sw": 50}, "valid_per_lang": 10, "test_per_lang": 8,
        "vocab_size": 50, "synthetic": {"words": 8, "min_words": 3, "max_words": 5},
    },
    "model": {"d_model": 16, "encoder_layers": 1, "decoder_layers": 1, "heads": 2, "ffn_dim": 32, "dropout": 0.0},
    "train": {"max_updates": 6, "max_tokens": 200, "lr": 0.003, "warmup_updates": 2, "valid_every": 3,
              "save_every": 2, "log_every": 2, "keep_snapshots": False},
    "eval": {"beam": 1, "max_len_b": 8, "max_len_a": 0.0},
}


def write_grid(folder: Path, **fields) -> Path:
    (folder / "tiny.yaml").write_text(yaml.safe_dump(BASE))
    grid = {"name": "tiny-grid", "base": "tiny.yaml", "methods": ["T=1", "CATS"], "seeds": [1],
            "define": {"CATS": ["balancer.name=cats", "balancer.warmup_steps=2"]}, **fields}
    path = folder / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def test_expansion_gives_stable_names_and_ordered_overrides():
    spec = GridSpec(name="g", base="demo", methods=["T=5", "CATS", "mine"], seeds=[3, 1], set=["train.max_updates=9"],
                    define={"mine": ["balancer.name=pcgrad"]})
    runs = expand(spec)
    assert [run.name for run in runs] == ["t5-s3", "cats-s3", "mine-s3", "t5-s1", "cats-s1", "mine-s1"]
    assert runs[1].overrides == ("sampling.temperature=1", "balancer.name=cats", "train.max_updates=9", "train.seed=3")
    assert runs[2].overrides[0] == "balancer.name=pcgrad"
    assert expand(spec) == runs  # a pure function of the spec
    with pytest.raises(PolycatsError, match="unknown method T=7"):
        expand(GridSpec(name="g", base="demo", methods=["T=7"]))


def test_a_grid_skips_finished_runs_and_resumes_an_interrupted_one(tmp_path, monkeypatch):
    grid = write_grid(tmp_path)
    out = tmp_path / "exp"
    monkeypatch.setattr(experiment, "source_commit", lambda: "c0ffee")
    save = Trainer.save

    def interrupt_cats(self, metrics, snapshot=True):
        save(self, metrics, snapshot)
        if self.config.balancer.name == "cats" and self.state.update == 2:
            raise KeyboardInterrupt  # a kill between two updates of the second run

    monkeypatch.setattr(Trainer, "save", interrupt_cats)
    with pytest.raises(KeyboardInterrupt):
        run_grid(grid, out, echo=lambda *_: None)
    index = json.loads((out / "index.json").read_text())
    assert index["runs"]["t1-s1"]["status"] == "finished" and index["runs"]["t1-s1"]["commit"] == "c0ffee"
    assert index["runs"]["cats-s1"]["status"] == "interrupted"
    finished_eval = (out / "runs" / "t1-s1" / "eval" / "test.json").stat().st_mtime_ns

    monkeypatch.setattr(Trainer, "save", save)
    index = run_grid(grid, out, echo=lambda *_: None)
    assert {name: record["status"] for name, record in index["runs"].items()} == {"t1-s1": "finished", "cats-s1": "finished"}
    assert (out / "runs" / "t1-s1" / "eval" / "test.json").stat().st_mtime_ns == finished_eval  # not redone
    events = read_metrics(out / "runs" / "cats-s1")
    assert sum(1 for e in events if e["event"] == "start") == 1  # resumed at update 2, not restarted
    assert [e["update"] for e in events if e["event"] == "train"] == [2, 4, 6]
    for split in ("valid", "test"):
        assert (out / "runs" / "cats-s1" / "eval" / f"{split}.json").exists()
    record = index["runs"]["cats-s1"]
    assert record["config"]["balancer"]["name"] == "cats" and record["config"]["train"]["seed"] == 1
    assert record["wall_s"] > 0


def test_mixing_commits_is_refused_unless_allowed(tmp_path, monkeypatch):
    grid = write_grid(tmp_path, methods=["T=1"])
    out = tmp_path / "exp"
    monkeypatch.setattr(experiment, "source_commit", lambda: "a" * 40)
    run_grid(grid, out, echo=lambda *_: None)
    monkeypatch.setattr(experiment, "source_commit", lambda: "b" * 40)
    with pytest.raises(PolycatsError, match="another commit .*aaaaaaaaaaaa: t1-s1.*--allow-mixed-commits"):
        run_grid(grid, out, echo=lambda *_: None)
    index = run_grid(grid, out, allow_mixed_commits=True, echo=lambda *_: None)
    assert index["runs"]["t1-s1"]["commit"] == "a" * 40  # finished: kept, not rerun


def test_a_grid_refuses_runs_it_now_defines_otherwise_than_they_ran(tmp_path, monkeypatch):
    grid = write_grid(tmp_path, methods=["T=1"])
    out = tmp_path / "exp"
    monkeypatch.setattr(experiment, "source_commit", lambda: "c0ffee")
    run_grid(grid, out, echo=lambda *_: None)
    recorded = (out / "runs" / "t1-s1" / "experiment.json").read_bytes()
    edited = write_grid(tmp_path, methods=["T=1"], set=["train.lr=0.002"])  # the finished run trained at 0.003
    with pytest.raises(PolycatsError, match=r"now defines 1 of its runs otherwise .*t1-s1: train\.lr: 0\.003 -> 0\.002.*change the grid file back"):
        run_grid(edited, out, echo=lambda *_: None)
    assert (out / "runs" / "t1-s1" / "experiment.json").read_bytes() == recorded
    # Where it runs is no definition: the same grid continues on other hardware.
    write_grid(tmp_path, methods=["T=1"], set=["train.threads=1"])
    assert run_grid(grid, out, device="cpu", echo=lambda *_: None)["runs"]["t1-s1"]["status"] == "finished"
    assert (out / "runs" / "t1-s1" / "experiment.json").read_bytes() == recorded  # skipped, not rerun


def test_only_refuses_a_grid_whose_other_runs_came_from_another_commit(tmp_path, monkeypatch):
    grid = write_grid(tmp_path)
    out = tmp_path / "exp"
    monkeypatch.setattr(experiment, "source_commit", lambda: "a" * 40)
    run_grid(grid, out, only=["t1-s1"], echo=lambda *_: None)
    monkeypatch.setattr(experiment, "source_commit", lambda: "b" * 40)
    with pytest.raises(PolycatsError, match="another commit .*aaaaaaaaaaaa: t1-s1"):
        run_grid(grid, out, only=["cats-s1"], echo=lambda *_: None)  # cats-s1 has not started, t1-s1 has
    assert not (out / "runs" / "cats-s1").exists()


def test_restart_starts_the_named_runs_over_and_leaves_the_rest(tmp_path, monkeypatch):
    grid = write_grid(tmp_path)
    out = tmp_path / "exp"
    monkeypatch.setattr(experiment, "source_commit", lambda: "a" * 40)
    run_grid(grid, out, echo=lambda *_: None)
    with pytest.raises(PolycatsError, match="--restart .* name them with --only"):
        run_grid(grid, out, restart=True, echo=lambda *_: None)
    kept = ((out / "runs" / "t1-s1" / "eval" / "test.json").read_bytes(),
            (out / "runs" / "t1-s1" / "experiment.json").read_bytes())

    # A run whose checkpoints are gone (a grid copied without them) cannot resume; the error names the way on.
    for checkpoint in (out / "runs" / "cats-s1" / "checkpoints").glob("*.pt"):
        checkpoint.unlink()
    record = json.loads((out / "runs" / "cats-s1" / "experiment.json").read_text())
    record.update(status="interrupted", wall_s=1e6)
    (out / "runs" / "cats-s1" / "experiment.json").write_text(json.dumps(record))
    with pytest.raises(CannotResume, match=r"no usable checkpoint .*\(in this grid: --only cats-s1 --restart\)"):
        run_grid(grid, out, echo=lambda *_: None)

    # Started over at another commit: only the restarted run takes it; the grid's other run is untouched.
    monkeypatch.setattr(experiment, "source_commit", lambda: "b" * 40)
    with pytest.raises(PolycatsError, match="another commit .*aaaaaaaaaaaa: t1-s1"):
        run_grid(grid, out, only=["cats-s1"], restart=True, echo=lambda *_: None)
    index = run_grid(grid, out, only=["cats-s1"], restart=True, allow_mixed_commits=True, echo=lambda *_: None)
    restarted = index["runs"]["cats-s1"]
    assert restarted["status"] == "finished" and restarted["commit"] == "b" * 40
    assert restarted["wall_s"] < 1e6  # counted afresh, not added to the earlier run's
    events = read_metrics(out / "runs" / "cats-s1")
    assert sum(1 for e in events if e["event"] == "start") == 1 and events[-1]["update"] == 6
    assert ((out / "runs" / "t1-s1" / "eval" / "test.json").read_bytes(),
            (out / "runs" / "t1-s1" / "experiment.json").read_bytes()) == kept
    # A finished run restarted is trained again, not skipped.
    before = (out / "runs" / "t1-s1" / "metrics.jsonl").stat().st_mtime_ns
    run_grid(grid, out, only=["t1-s1"], restart=True, allow_mixed_commits=True, echo=lambda *_: None)
    assert (out / "runs" / "t1-s1" / "metrics.jsonl").stat().st_mtime_ns != before
    assert json.loads((out / "runs" / "t1-s1" / "experiment.json").read_text())["commit"] == "b" * 40


def test_the_commit_is_read_from_the_source_checkout_or_stated_outside_one(tmp_path, monkeypatch):
    commit = experiment.source_commit()
    assert commit == "unknown" or len(commit.removesuffix("+dirty")) == 40
    copy = tmp_path / "copy" / "polycats"  # a tree without .git, as on a machine the code was copied to
    copy.mkdir(parents=True)
    monkeypatch.setattr(experiment, "__file__", str(copy / "experiment.py"))
    monkeypatch.delenv("POLYCATS_COMMIT", raising=False)
    assert experiment.source_commit() == "unknown"
    monkeypatch.setenv("POLYCATS_COMMIT", "1234abcd")
    assert experiment.source_commit() == "1234abcd"


def test_bad_grid_files_are_one_line_errors(tmp_path):
    with pytest.raises(PolycatsError, match="grid file .* does not exist"):
        run_grid(tmp_path / "missing.yaml", tmp_path / "exp")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nbase: demo\nmethods: []\n")
    with pytest.raises(PolycatsError, match="field 'methods'"):
        run_grid(bad, tmp_path / "exp")
    bad.write_text("name: x\nname: y\nbase: demo\nmethods: [T=1]\n")  # the hardened loader, as for configs
    with pytest.raises(PolycatsError, match="grid file .* line 2: .*duplicate"):
        run_grid(bad, tmp_path / "exp")
    grid = write_grid(tmp_path, set=["train.max_updatez=3"])
    with pytest.raises(PolycatsError, match="max_updatez"):
        run_grid(grid, tmp_path / "exp")
    assert not (tmp_path / "exp").exists()  # nothing made before every config was valid


def test_workers_run_each_run_in_its_own_process(tmp_path):
    grid = write_grid(tmp_path)
    out = tmp_path / "exp"
    result = subprocess.run([sys.executable, "-m", "polycats", "experiment", str(grid), "--out", str(out), "--workers", "2"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    index = json.loads((out / "index.json").read_text())
    assert {record["status"] for record in index["runs"].values()} == {"finished"}
    assert (out / "runs" / "cats-s1.log").exists()
    assert "2/2 runs finished" in result.stdout
