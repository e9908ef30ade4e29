"""``polycats demo`` at a tiny synthetic size: per method the group table and two examples per
language beside the reference, then the summary and the report of its runs."""

from __future__ import annotations

from cli_runner import run_cli, text

TINY = [
    "data.source=synthetic", "data.languages={de: 200, fr: 200, sw: 40}", "data.vocab_size=50", "data.valid_per_lang=10",
    "data.test_per_lang=8", "data.groups={lores_below: 100, hires_from: 150}", "model.d_model=16", "model.encoder_layers=1",
    "model.decoder_layers=1", "model.heads=2", "model.ffn_dim=32", "train.max_updates=4", "train.max_tokens=200",
    "train.warmup_updates=2", "train.valid_every=2", "train.save_every=2", "eval.beam=1",
]


def test_the_demo_prints_tables_and_examples_and_builds_its_report(tmp_path):
    process = run_cli(["demo", "--out", "d", *(word for o in TINY for word in ("--set", o))], cwd=tmp_path,
                      env={"POLYCATS_CACHE": str(tmp_path / "cache"), "COLUMNS": "200"})
    out, err = text(process)
    assert process.returncode == 0, out + err
    assert out.count("  reference:  ") == 3 * 3 * 2  # methods × languages × two examples
    for method in ("T=1", "T=5", "CATS"):
        assert f"{method}: test split" in out
    report = tmp_path / "d" / "report" / "report.md"
    assert "report: d/report/report.md and d/report/report.html" in out
    page = report.read_text()
    assert "## Grid `d`" in page and "| CATS | 1 |" in page and "### Example translations" in page
    assert "`d/report/report.md`" in (tmp_path / "d" / "summary.md").read_text()
