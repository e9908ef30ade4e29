"""analyze on a real (tiny) run: files, figures, the HiRes/LoRes summary, and periodic training
diagnostics that do not change training."""

import json

import pytest

from polycats.config import config_from_dict
from polycats.diagnostics.analyze import DiagnosticSettings, analyze_run
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


def test_periodic_diagnostics_are_logged_without_changing_training(tmp_path):
    plain, logged = tmp_path / "plain", tmp_path / "logged"
    train(tiny_config(), plain, progress=False)
    train(tiny_config(diagnostics_every=2), logged, progress=False)
    events = [e for e in read_metrics(logged) if e["event"] == "diagnostics"]
    assert [e["update"] for e in events] == [1, 2, 4]
    assert all("cosine/HiRes-LoRes" in e and "lambda_max/combined" in e for e in events)
    strip = lambda run: [{k: v for k, v in e.items() if k != "tokens_per_s"} for e in read_metrics(run) if e["event"] != "diagnostics"]  # noqa: E731
    assert strip(plain) == strip(logged)


def test_report_tables_come_from_the_run_directories(tiny_run, tmp_path):
    from polycats.evaluate.run import evaluate_run
    from polycats.report.report import build_report

    evaluation = evaluate_run(tiny_run, "test")
    analyze_run(tiny_run, settings=DiagnosticSettings(sentences=4, tol=1e-2, max_iter=30))
    path = build_report([tiny_run, tiny_run], tmp_path / "report")
    text = path.read_text()
    all_bleu = f"{evaluation['groups']['All']['bleu']:.1f}"
    assert f"| {tiny_run.name} | " in text and all_bleu in text
    assert evaluation["sacrebleu_signature"] in text
    assert "combined λ_max lower at 0 of 2 checkpoints" in text  # a run never beats itself
    page = (tmp_path / "report" / "report.html").read_text()
    assert "data:image/png;base64," in page and "<table>" in page
