"""The benchmark harness (`make bench`): every registered benchmark runs at its tiny size and
gives a well-formed table; `benchmarks/run.py` writes the Markdown report. Timings are not
asserted (they belong to `make bench` on a quiet machine)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

BENCHMARKS_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


def load_runner():
    spec = importlib.util.spec_from_file_location("benchmarks_run", BENCHMARKS_DIR / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # puts benchmarks/ on sys.path for its siblings
    return module


runner = load_runner()


@pytest.fixture(autouse=True)
def one_thread():
    """Benchmarks set torch's thread count for the whole process: each test starts from one
    thread (quick sizes gain nothing from more on a shared machine) and leaves it as it was."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("name", list(runner.BENCHMARKS))
def test_each_benchmark_gives_a_well_formed_table_at_tiny_size(name):
    title, run = runner.BENCHMARKS[name]
    rows = run(True)
    assert title and rows, name
    columns = list(rows[0])
    for row in rows:
        assert list(row) == columns, (name, row)
        for column, value in row.items():
            assert isinstance(value, (str, int, float)), (name, column, value)
            if isinstance(value, float):
                assert math.isfinite(value) and value >= 0, (name, column, value)
    table = runner.markdown(rows).splitlines()
    assert len(table) == len(rows) + 2 and all(line.count("|") == len(columns) + 1 for line in table)


def test_run_writes_the_report_for_the_chosen_benchmarks(tmp_path, monkeypatch, capsys):
    """--only runs those benchmarks and keeps the other tables of the report it updates."""
    name, other = "hvp", runner.BENCHMARKS["prepare"][0]
    out = tmp_path / "performance.md"
    out.write_text(f"# Performance\n\nold\n\n## {other}\n\n| a |\n|---|\n| 1 |\n\n## Optimisations\n\nx\n")
    monkeypatch.setattr(sys, "argv", ["run.py", "--quick", "--only", name, "--out", str(out)])
    runner.main()
    text = out.read_text()
    assert text.startswith("# Performance") and "--quick" in text and "only `--only hvp`" in text
    assert f"## {runner.BENCHMARKS[name][0]}" in text and "|---|" in text
    assert f"## {other}\n\n| a |\n|---|\n| 1 |\n" in text  # kept
    assert text.count("## Optimisations") == 1  # from benchmarks/optimisations.md, not kept twice
    assert f"written: {out}" in capsys.readouterr().out


def test_an_unknown_benchmark_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["run.py", "--only", "nope", "--out", str(tmp_path / "p.md")])
    with pytest.raises(SystemExit, match="nope"):
        runner.main()
    assert not (tmp_path / "p.md").exists()


def test_the_ratio_interval_brackets_the_median_ratio_and_is_reproducible():
    from cats_overhead import Timings

    constant = Timings({"a": [2.0, 4.0, 6.0], "b": [1.0, 2.0, 3.0]}, {})
    assert constant.ratio("a", "b") == 2.0 and constant.ratio_interval("a", "b") == (2.0, 2.0)
    rounds = [1.0 + 0.01 * (i % 7) for i in range(60)]
    spread = Timings({"a": rounds, "b": [1.0] * 60}, {})
    low, high = spread.ratio_interval("a", "b")
    assert low <= spread.ratio("a", "b") <= high and low < high
    assert (low, high) == spread.ratio_interval("a", "b")
    assert 1.0 <= low and high <= 1.06
