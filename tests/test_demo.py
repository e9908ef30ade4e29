"""``polycats demo`` at a tiny synthetic size: per method the group table and two examples per
language beside the reference, then the summary and the report of its runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from cli_runner import assert_one_line_error, run_cli, text

TINY = [
    "data.source=synthetic", "data.languages={de: 200, fr: 200, sw: 40}", "data.vocab_size=50", "data.valid_per_lang=10",
    "data.test_per_lang=8", "data.groups={lores_below: 100, hires_from: 150}", "model.d_model=16", "model.encoder_layers=1",
    "model.decoder_layers=1", "model.heads=2", "model.ffn_dim=32", "train.max_updates=4", "train.max_tokens=200",
    "train.warmup_updates=2", "train.valid_every=2", "train.save_every=2", "eval.beam=1",
]
SETS = [word for override in TINY for word in ("--set", override)]


def test_the_demo_prints_tables_and_examples_and_builds_its_report(tmp_path):
    process = run_cli(["demo", "--out", "d", "--jobs", "2", *SETS], cwd=tmp_path,
                      env={"POLYCATS_CACHE": str(tmp_path / "cache"), "COLUMNS": "200"})
    out, err = text(process)
    assert process.returncode == 0, out + err
    assert "training T=1, T=5, CATS: 2 at a time" in out
    assert out.count("  reference:  ") == 3 * 3 * 2  # methods × languages × two examples
    for method in ("T=1", "T=5", "CATS"):
        assert f"{method}: test split" in out
    report = tmp_path / "d" / "report" / "report.md"
    assert "report: d/report/report.md and d/report/report.html" in out
    page = report.read_text()
    assert "## Grid `d`" in page and "| CATS | 1 |" in page and "### Example translations" in page
    assert "`d/report/report.md`" in (tmp_path / "d" / "summary.md").read_text()


def test_a_run_that_fails_stops_the_demo_with_one_line_naming_its_log(tmp_path):
    (tmp_path / "d" / "t5" / "checkpoints").mkdir(parents=True)
    (tmp_path / "d" / "t5" / "checkpoints" / "last.pt").write_bytes(b"not a checkpoint")
    process = run_cli(["demo", "--out", "d", *SETS], cwd=tmp_path, env={"POLYCATS_CACHE": str(tmp_path / "cache")})
    line = assert_one_line_error(process, "T=5: polycats train exited with 2", "d/logs/t5.log")
    assert "last.pt" in line  # the run's own one-line error, carried over
    assert not (tmp_path / "d" / "summary.md").exists()


def test_ctrl_c_stops_every_run_with_a_checkpoint_and_the_same_command_resumes(tmp_path):
    env = {**os.environ, "POLYCATS_CACHE": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "polycats", "demo", "--out", "d", "--methods", "T=1,CATS", *SETS,
               "--set", "train.save_every=100000"]
    endless = [*command, "--set", "train.max_updates=100000"]
    demo = subprocess.Popen(endless, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = [tmp_path / "d" / run / "metrics.jsonl" for run in ("t1", "cats")]
    while not all(path.exists() and path.read_text().count("\n") >= 3 for path in metrics):
        assert demo.poll() is None, demo.communicate()
        time.sleep(0.2)
    demo.send_signal(signal.SIGINT)
    out, err = demo.communicate(timeout=120)
    assert demo.returncode == 130, out + err
    assert "stopped: SIGINT received" in err and "Traceback" not in out + err
    updates = []
    for run in ("t1", "cats"):
        state = tmp_path / "d" / run / "checkpoints" / "last.pt"
        assert state.is_file()  # saved on the forwarded signal, since save_every is never reached
        updates.append(max(json.loads(line)["update"] for line in (tmp_path / "d" / run / "metrics.jsonl").read_text().splitlines()))
    finish = max(updates) + 2
    resumed = subprocess.run([*command, "--set", f"train.max_updates={finish}"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    for run in ("t1", "cats"):
        assert "resum" in (tmp_path / "d" / "logs" / f"{run}.log").read_text().lower()
        assert (tmp_path / "d" / run / "eval" / "test.json").is_file()
