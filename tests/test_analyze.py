"""analyze on a real (tiny) run: files, figures, the HiRes/LoRes summary, solves that run out of
budget reported as such, the progress bar, and periodic training diagnostics that do not change
training."""

import json
import shutil

import pytest
from cli_runner import assert_one_line_error, run_cli

from polycats.config import config_from_dict
from polycats.diagnostics.analyze import analyze_run
from polycats.diagnostics.model_summary import DiagnosticSettings, DiagnosticsNotConvergedWarning
from polycats.train.metrics import read_metrics
from polycats.train.trainer import train


def tiny_config(**train):
    return config_from_dict({
        "data": {"source": "synthetic", "languages": {"de": 300, "sw": 40}, "valid_per_lang": 10, "test_per_lang": 10,
                 "vocab_size": 60, "groups": {"lores_below": 100, "hires_from": 200}},
        "model": {"d_model": 16, "encoder_layers": 1, "decoder_layers": 1, "heads": 2, "ffn_dim": 32, "dropout": 0.0},
        "train": {"max_updates": 4, "max_tokens": 200, "warmup_updates": 2, "save_every": 2, "valid_every": 2,
                  "log_every": 2, **train},
    })


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("analyze") / "run"
    train(tiny_config(), run, progress=False)
    return run


def test_analyze_writes_similarity_curvature_and_figures_for_every_snapshot(tiny_run):
    summary = analyze_run(tiny_run, settings=DiagnosticSettings(sentences=4, tol=1e-2, max_iter=30))
    assert [row["update"] for row in summary["checkpoints"]] == [2, 4]
    for row in summary["checkpoints"]:
        assert -1 <= row["cosine/HiRes-LoRes"] <= 1
        assert 0 <= row["norm_similarity/HiRes-LoRes"] <= 1
        assert {"lambda_max/HiRes", "lambda_max/LoRes", "lambda_max/combined"} <= set(row)
    out = tiny_run / "analysis"
    for name in ("similarity_000002.json", "similarity_000004.csv", "similarity_000004.png", "curves.png", "curvature.json"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "summary.json").read_text())
    assert saved["checkpoints"] == json.loads(json.dumps(summary["checkpoints"]))
    for row in saved["checkpoints"]:
        eigenvalues = {key for key in row if key.startswith("lambda_")}
        assert set(row["converged"]) == set(row["matvecs"]) == eigenvalues
        assert all(row["converged"].values()) and all(0 < n <= 30 for n in row["matvecs"].values())


def test_updates_picks_snapshots_and_a_missing_one_is_one_line_naming_what_there_is(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("analysis"))
    summary = analyze_run(run, settings=DiagnosticSettings(sentences=4, tol=1e-2, max_iter=30), updates=[4])
    assert [row["update"] for row in summary["checkpoints"]] == [4]
    process = run_cli(["analyze", str(run), "--updates", "2,3"], cwd=tmp_path)
    assert_one_line_error(process, "no snapshot of update 3", "it has 2, 4")
    assert_one_line_error(run_cli(["analyze", str(run), "--updates", "2,x"], cwd=tmp_path), "e.g. 500,1500,2500")
    assert_one_line_error(run_cli(["analyze", str(run), "--updates", "2", "--checkpoint", "last"], cwd=tmp_path), "one of them")


def test_a_solve_out_of_budget_is_reported_not_waited_out(tiny_run):
    """Two products cannot reach tol 1e-4: every eigenvalue is marked converged=false in
    summary.json, after exactly its budget, with one warning line per checkpoint."""
    with pytest.warns(DiagnosticsNotConvergedWarning) as caught:
        analyze_run(tiny_run, settings=DiagnosticSettings(sentences=4, max_iter=2))
    assert [str(w.message).split(":")[0] for w in caught] == ["update 2", "update 4"]
    assert "lambda_max/combined" in str(caught[0].message) and "\n" not in str(caught[0].message)
    saved = json.loads((tiny_run / "analysis" / "summary.json").read_text())
    for row in saved["checkpoints"]:
        assert row["converged"] and not any(row["converged"].values())
        assert set(row["matvecs"].values()) == {2}
        assert row["lambda_max/combined"] is not None


def test_progress_bar_names_the_checkpoint_and_each_solve(tiny_run, capsys):
    settings = DiagnosticSettings(sentences=4, tol=1e-2, max_iter=30, include_tasks=False)
    analyze_run(tiny_run, checkpoint="last", settings=settings, progress=True)
    shown = capsys.readouterr().out
    assert "checkpoints" in shown and "λ combined" in shown and "products" in shown
    analyze_run(tiny_run, checkpoint="last", settings=settings)  # stdout is not a terminal: no bar
    assert capsys.readouterr().out == ""


def test_periodic_diagnostics_are_logged_without_changing_training(tmp_path):
    plain, logged = tmp_path / "plain", tmp_path / "logged"
    train(tiny_config(), plain, progress=False)
    train(tiny_config(diagnostics_every=2), logged, progress=False)
    events = [e for e in read_metrics(logged) if e["event"] == "diagnostics"]
    assert [e["update"] for e in events] == [1, 2, 4]
    assert all("cosine/HiRes-LoRes" in e and "lambda_max/combined" in e for e in events)
    strip = lambda run: [{k: v for k, v in e.items() if k != "tokens_per_s"} for e in read_metrics(run) if e["event"] != "diagnostics"]  # noqa: E731
    assert strip(plain) == strip(logged)


def test_one_checkpoint_is_merged_into_a_full_analysis_and_a_rerun_resumes(tiny_run, monkeypatch):
    """Issue 17 item 12: results are keyed by update; `--checkpoint last` replaces one row and
    keeps the rest (and the curves figure); rerunning a finished analysis recomputes nothing."""
    from polycats.diagnostics import analyze

    settings = DiagnosticSettings(sentences=4, tol=1e-2, max_iter=30)
    analyze_run(tiny_run, settings=settings)
    calls = []
    real = analyze.analyze_model
    monkeypatch.setattr(analyze, "analyze_model", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    summary = analyze_run(tiny_run, settings=settings)
    assert calls == [] and [row["update"] for row in summary["checkpoints"]] == [2, 4]
    (tiny_run / "analysis" / "curves.png").unlink()
    summary = analyze_run(tiny_run, "last", settings=DiagnosticSettings(sentences=4, tol=1e-2, max_iter=20))
    assert len(calls) == 1
    assert [(row["update"], row["settings"]["max_iter"]) for row in summary["checkpoints"]] == [(2, 30), (4, 20)]
    assert json.loads((tiny_run / "analysis" / "summary.json").read_text())["checkpoints"] == summary["checkpoints"]
    assert (tiny_run / "analysis" / "curves.png").exists()  # drawn again from both rows


def test_analyze_and_translate_use_the_thread_setting(tiny_run, monkeypatch):
    """Issue 17 item 14: train.threads of the run, or the explicit threads argument (--threads)."""
    import torch

    from polycats.evaluate.run import translate_lines

    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    analyze_run(tiny_run, "last", settings=DiagnosticSettings(sentences=4, tol=1e-2, max_iter=30, include_tasks=False), threads=1)
    translate_lines(tiny_run, ["x"], "de", "en", threads=2)
    assert threads == [1, 2]
