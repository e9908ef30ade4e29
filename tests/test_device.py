"""``train.device`` (auto | cpu | cuda) and ``--device``: on the CPU, asking for it explicitly
changes nothing (bit-identical to ``auto``); ``cuda`` without a CUDA device is a one-line error;
checkpoints are written on the CPU. Where a GPU is present, a CUDA smoke test trains, resumes,
evaluates, translates and analyses on it, and loads its checkpoint on the CPU."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from cli_runner import assert_one_line_error, run_cli, text

from polycats.config import config_from_dict
from polycats.errors import PolycatsError
from polycats.run.build import resolve_device
from polycats.run.checkpoint import on_cpu
from polycats.train.metrics import read_metrics
from polycats.train.trainer import train

NO_CUDA = "train.device=cuda but no CUDA device is available; use auto or cpu"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

TINY = {
    "name": "tiny",
    "data": {"source": "synthetic", "languages": {"de": 120, "sw": 40}, "valid_per_lang": 8, "test_per_lang": 8,
             "vocab_size": 60, "max_len": 40, "synthetic": {"words": 8, "min_words": 2, "max_words": 4}},
    "balancer": {"name": "cats", "warmup_steps": 1},  # α updates from the second step on
    "model": {"d_model": 16, "encoder_layers": 1, "decoder_layers": 1, "heads": 2, "ffn_dim": 32, "dropout": 0.1},
    "train": {"max_updates": 4, "max_tokens": 256, "warmup_updates": 1, "save_every": 2, "valid_every": 2,
              "log_every": 1, "threads": 1},
    "eval": {"beam": 2, "batch_size": 16},
}


def tiny(**sections) -> dict:
    tree = json.loads(json.dumps(TINY))
    for section, values in sections.items():
        tree[section] = {**tree.get(section, {}), **values}
    return tree


def start_event(run: Path) -> dict:
    return next(event for event in read_metrics(run) if event["event"] == "start")


def last_state(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)  # no map_location: tensors are on the CPU


def invoke(*args: str, cwd: Path):
    """``polycats ARGS`` in-process from ``cwd`` (stdin: one sentence, for translate)."""
    return run_cli(args, cwd, stdin=b"w1 w2\n")


# ------------------------------------------------------------------------------ config and errors

def test_device_defaults_to_auto_and_rejects_other_names():
    assert config_from_dict(tiny()).train.device == "auto"
    with pytest.raises(PolycatsError) as error:
        config_from_dict(tiny(train={"device": "tpu"}))
    message = str(error.value)
    assert len(message.splitlines()) == 1
    assert "train.device" in message and "'tpu'" in message and "'auto', 'cpu' or 'cuda'" in message


def test_resolve_device(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(PolycatsError, match="^train.device=cuda but no CUDA device is available; use auto or cpu$"):
        resolve_device("cuda")
    with pytest.raises(PolycatsError, match="auto, cpu or cuda"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")  # the current CUDA device, not a hard-coded cuda:0


def test_cuda_without_cuda_is_a_one_line_error_on_every_command(tmp_path, monkeypatch):
    """Exit code 2 and one line, before anything is written (also on a GPU machine: CUDA is hidden)."""
    (tmp_path / "tiny.yaml").write_text(json.dumps(tiny()), encoding="utf-8")  # JSON is YAML
    (tmp_path / "grid.yaml").write_text("name: g\nbase: tiny.yaml\nmethods: [T=1]\n", encoding="utf-8")
    monkeypatch.setenv("POLYCATS_CACHE", str(tmp_path / "cache"))
    trained = invoke("train", "tiny.yaml", "--out", "run", "--device", "cpu", "--set", "train.max_updates=1", cwd=tmp_path)
    assert trained.returncode == 0, text(trained)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for args in (("train", "tiny.yaml", "--out", "never", "--device", "cuda"),
                 ("train", "tiny.yaml", "--out", "never", "--set", "train.device=cuda"),
                 ("evaluate", "run", "--device", "cuda"),
                 ("translate", "run", "--src-lang", "de", "--tgt-lang", "en", "--device", "cuda"),
                 ("analyze", "run", "--checkpoint", "last", "--device", "cuda"),
                 ("experiment", "grid.yaml", "--out", "grid", "--device", "cuda")):
        assert_one_line_error(invoke(*args, cwd=tmp_path), NO_CUDA)
    assert not (tmp_path / "never").exists() and not (tmp_path / "grid").exists()
    assert not (tmp_path / "run" / "analysis").exists()
    assert_one_line_error(invoke("train", "tiny.yaml", "--out", "never", "--device", "tpu", cwd=tmp_path), "train.device", "tpu")
    assert_one_line_error(invoke("evaluate", "run", "--device", "tpu", cwd=tmp_path), "auto, cpu or cuda")


# ------------------------------------------------------------------------------ CPU: nothing changes

@pytest.mark.skipif(torch.cuda.is_available(), reason="auto is cuda on this machine")
def test_explicit_cpu_equals_auto_on_a_cpu_machine(tmp_path):
    train(config_from_dict(tiny()), tmp_path / "auto", progress=False)
    train(config_from_dict(tiny(train={"device": "cpu"})), tmp_path / "cpu", progress=False)
    auto, cpu = last_state(tmp_path / "auto"), last_state(tmp_path / "cpu")
    assert auto["model"].keys() == cpu["model"].keys()
    for name, tensor in auto["model"].items():
        assert torch.equal(tensor, cpu["model"][name]), name
    assert torch.equal(auto["balancer"]["alpha"], cpu["balancer"]["alpha"])
    assert start_event(tmp_path / "auto")["device"] == start_event(tmp_path / "cpu")["device"] == "cpu"
    assert "cuda" not in auto["rng"]
    strip = lambda events: [{k: v for k, v in e.items() if k != "tokens_per_s"} for e in events]  # noqa: E731
    assert strip(read_metrics(tmp_path / "auto")) == strip(read_metrics(tmp_path / "cpu"))
    # train.device may change when a run resumes (here auto -> cpu, the same device).
    train(config_from_dict(tiny(train={"max_updates": 2})), tmp_path / "switch", progress=False)
    train(config_from_dict(tiny(train={"device": "cpu"})), tmp_path / "switch", progress=False)
    switched = last_state(tmp_path / "switch")
    assert all(torch.equal(tensor, switched["model"][name]) for name, tensor in auto["model"].items())


def test_on_cpu_keeps_cpu_state_as_it_is():
    """What a CPU run saves is unchanged: the same objects, a state dict's type and metadata kept."""
    model = torch.nn.Linear(2, 2)
    state = {"model": model.state_dict(), "rng": {"python": (3, (1, 2), None)}, "tasks": ["a-b"], "update": 1}
    assert on_cpu(state) is state
    moved = on_cpu({"model": model.state_dict(), "meta": [torch.zeros(1)]})
    assert isinstance(moved["model"], OrderedDict) and hasattr(moved["model"], "_metadata")


def test_experiment_device_overrides_every_run_after_the_grid_set(tmp_path, monkeypatch):
    from polycats import experiment

    (tmp_path / "tiny.yaml").write_text(json.dumps(tiny()), encoding="utf-8")
    (tmp_path / "grid.yaml").write_text(
        "name: g\nbase: tiny.yaml\nmethods: [T=1, CATS]\nseeds: [1, 2]\nset: [train.device=auto]\n", encoding="utf-8")
    started = []
    monkeypatch.setattr(experiment, "run_one", lambda base, run, runs_dir, commit, restart: started.append(run))
    experiment.run_grid(tmp_path / "grid.yaml", tmp_path / "out", echo=lambda _: None, device="cpu")
    assert len(started) == 4
    for run in started:
        assert run.overrides[-1] == "train.device=cpu"
        assert run.overrides.index("train.device=auto") < len(run.overrides) - 1
    started.clear()
    experiment.run_grid(tmp_path / "grid.yaml", tmp_path / "out2", echo=lambda _: None)
    assert all("train.device=cpu" not in run.overrides for run in started)


# ------------------------------------------------------------------------------ CUDA (skipped without one)

@needs_cuda
def test_cuda_smoke_train_resume_evaluate_and_load_on_the_cpu(tmp_path, monkeypatch):
    from polycats.diagnostics.analyze import DiagnosticSettings, analyze_run
    from polycats.evaluate.run import evaluate_run, translate_lines

    on_cuda = tiny(train={"diagnostics_every": 2})  # device auto: cuda here, cpu on a machine without one
    run = tmp_path / "cuda"
    valid = train(config_from_dict(on_cuda), run, progress=False)
    assert torch.isfinite(torch.tensor(valid["valid_nll"]))
    start = start_event(run)
    assert start["device"] == "cuda" and start["device_name"]
    events = read_metrics(run)
    assert any(e["event"] == "diagnostics" for e in events)
    assert [e["update"] for e in events if e["event"] == "train"] == [1, 2, 3, 4]  # no step skipped
    state = last_state(run)
    tensors = [t for t in state["model"].values()] + [t for s in state["optimizer"]["state"].values() for t in s.values()]
    assert all(t.device.type == "cpu" for t in tensors)
    assert "cuda" in state["rng"] and state["rng"]["cuda"].dtype == torch.uint8
    assert state["balancer"]["updates"] > 0  # CATS updated α from CUDA gradients

    # Resume on the same device: stopped at 2, continued to 4.
    split = tmp_path / "split"
    train(config_from_dict(tiny(train={"device": "cuda", "diagnostics_every": 2, "max_updates": 2})), split, progress=False)
    assert start_event(split)["device"] == "cuda"
    train(config_from_dict(on_cuda), split, progress=False)
    resumed = last_state(split)
    for name, tensor in state["model"].items():
        torch.testing.assert_close(resumed["model"][name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    assert resumed["balancer"]["updates"] == state["balancer"]["updates"]

    # Evaluate, translate and analyse on CUDA (training diagnostics ran there already), then
    # evaluate on the CPU (explicitly, and as a machine without CUDA would: auto).
    report = evaluate_run(run, "test", device="cuda")
    assert set(report["per_language"]) == {"de-en", "sw-en"}
    assert len(translate_lines(run, ["w1 w2", "w3"], "de", "en", device="cuda")) == 2
    summary = analyze_run(run, "last", DiagnosticSettings(sentences=4, max_iter=10), progress=False)  # auto: cuda
    assert summary["checkpoints"][0]["lambda_max/combined"] is not None
    assert set(evaluate_run(run, "test", device="cpu")["per_language"]) == {"de-en", "sw-en"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert set(evaluate_run(run, "valid")["per_language"]) == {"de-en", "sw-en"}


@needs_cuda
def test_a_cpu_checkpoint_evaluates_on_cuda(tmp_path):
    from polycats.evaluate.run import evaluate_run

    run = tmp_path / "cpu"
    train(config_from_dict(tiny(train={"device": "cpu", "max_updates": 2})), run, progress=False)
    assert start_event(run)["device"] == "cpu"
    assert set(evaluate_run(run, "test", device="cuda")["per_language"]) == {"de-en", "sw-en"}


@needs_cuda
@pytest.mark.parametrize("balancer", [
    {"name": "scalar"},
    {"name": "cats", "warmup_steps": 1, "update_every": 2},
    {"name": "cats", "warmup_steps": 1, "constraint": "hvp"},
    {"name": "cats", "warmup_steps": 0, "source": "valid", "valid_sentences": 4},
    {"name": "cats", "warmup_steps": 0, "sketch_dim": 64},
    {"name": "gradvac", "grouping": "per_tensor"},
    {"name": "dro"},
    {"name": "pcgrad"},
    {"name": "mgda"},
    {"name": "graddrop", "leak": 0.1},
    {"name": "imtlg"},
    {"name": "alignedmtl"},
    {"name": "upgrad"},
    {"name": "cagrad"},
    {"name": "nashmtl"},
], ids=lambda b: "-".join(str(v) for v in b.values()))
def test_every_balancer_trains_on_cuda(tmp_path, balancer):
    """Two or three updates each: no tensor of a balancer meets one on another device."""
    if balancer["name"] in ("upgrad", "cagrad", "nashmtl"):
        pytest.importorskip({"upgrad": "quadprog", "cagrad": "cvxpy", "nashmtl": "cvxpy"}[balancer["name"]])
    if balancer["name"] not in ("scalar", "cats", "gradvac", "dro"):
        pytest.importorskip("torchjd")
    config = config_from_dict({**tiny(train={"device": "cuda", "max_updates": 3, "save_every": 3}), "balancer": balancer})
    train(config, tmp_path / "run", progress=False)
    train_events = [e for e in read_metrics(tmp_path / "run") if e["event"] == "train"]
    assert [e["update"] for e in train_events] == [1, 2, 3]
    assert all(e["train_nll"] is not None for e in train_events)
