"""Scores equal sacreBLEU's own CLI; group averages; the eval/<split>.json contract."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console
from rich.table import Table

from polycats.evaluate.scoring import (
    DirectionScore,
    bleu_tokenizer,
    build_eval_report,
    group_averages,
    render_table,
    score_direction,
    score_directions,
    target_language,
)

FIXTURE = {
    "de-en": (
        ["The cat sat on a mat.", "Hello there, world!", "In the beginning God created the heaven."],
        ["The cat sat on the mat.", "Hello, world!", "In the beginning God created the heavens and the earth."],
    ),
    "en-zh": (
        ["起初神创造天地。", "地是空虚混沌，渊面黑暗。", "神说：要有光。"],
        ["起初，神创造天地。", "地是空虚混沌，渊面黑暗；", "神说：“要有光”，就有了光。"],
    ),
    "en-ja": (
        ["はじめに神は天と地とを創造された。", "地は形なく、むなしかった。", "神は光あれと言われた。"],
        ["はじめに神は天と地とを創造された。", "地は形なく、むなしく、やみが淵のおもてにあった。", "神は「光あれ」と言われた。"],
    ),
}


def sacrebleu_cli() -> list[str]:
    script = Path(sys.executable).with_name("sacrebleu")
    if script.exists():
        return [str(script)]
    found = shutil.which("sacrebleu")
    return [found] if found else [sys.executable, "-m", "sacrebleu"]


@pytest.mark.parametrize("direction", sorted(FIXTURE))
def test_scores_equal_the_sacrebleu_cli(direction, tmp_path):
    hyps, refs = FIXTURE[direction]
    (tmp_path / "hyp.txt").write_text("\n".join(hyps) + "\n", encoding="utf-8")
    (tmp_path / "ref.txt").write_text("\n".join(refs) + "\n", encoding="utf-8")
    tokenizer = {"de-en": "13a", "en-zh": "zh", "en-ja": "char"}[direction]
    run = subprocess.run(
        [*sacrebleu_cli(), str(tmp_path / "ref.txt"), "-i", str(tmp_path / "hyp.txt"),
         "-m", "bleu", "chrf", "-tok", tokenizer, "-w", "6"],
        capture_output=True, text=True, check=True,
    )
    cli_bleu, cli_chrf = json.loads(run.stdout)

    score = score_direction(hyps, refs, target_language(direction))
    assert score.tokenizer == tokenizer
    assert score.n == len(hyps)
    assert score.bleu == pytest.approx(cli_bleu["score"], abs=1e-6)
    assert score.chrf == pytest.approx(cli_chrf["score"], abs=1e-6)
    assert score.bleu_signature == cli_bleu["signature"]
    assert score.chrf_signature == cli_chrf["signature"]
    assert 0 < score.bleu < 100 and 0 < score.chrf < 100


def test_tokenizer_by_target_language():
    assert [bleu_tokenizer(x) for x in ("en", "de", "zh", "ja", "ko", "sw")] == ["13a", "13a", "zh", "char", "13a", "13a"]
    assert target_language("sw-en") == "en" and target_language("en-zh") == "zh"
    with pytest.raises(ValueError):
        target_language("swen")


def test_score_direction_rejects_bad_input():
    with pytest.raises(ValueError):
        score_direction(["a"], ["a", "b"], "en")
    with pytest.raises(ValueError):
        score_direction([], [], "en")


def fake(bleu: float, chrf: float, n: int = 10) -> DirectionScore:
    return DirectionScore(bleu=bleu, chrf=chrf, n=n, tokenizer="13a", bleu_signature="sigB", chrf_signature="sigC")


SCORES = {
    "sw-en": fake(10.0, 30.0, n=5),
    "tl-en": fake(20.0, 40.0, n=7),
    "fr-en": fake(25.0, 50.0),
    "de-en": fake(30.0, 55.0),
    "ru-en": fake(35.0, 60.0),
}
GROUPS = {"sw-en": "LoRes", "tl-en": "LoRes", "fr-en": "MidRes", "de-en": "HiRes", "ru-en": "HiRes"}


def test_group_averages_are_unweighted_means():
    averages = group_averages(SCORES, GROUPS)
    assert list(averages) == ["LoRes", "MidRes", "HiRes", "All"]
    assert averages["LoRes"]["bleu"] == pytest.approx(15.0)  # not weighted by n (5 vs 7)
    assert averages["LoRes"]["chrf"] == pytest.approx(35.0)
    assert averages["MidRes"]["bleu"] == pytest.approx(25.0)
    assert averages["HiRes"]["chrf"] == pytest.approx(57.5)
    assert averages["All"]["bleu"] == pytest.approx(24.0)  # mean over directions, not over groups
    assert averages["All"]["chrf"] == pytest.approx(47.0)
    assert averages["LoRes"]["directions"] == ["sw-en", "tl-en"]


def test_empty_group_is_null_and_missing_group_is_an_error():
    two = {d: SCORES[d] for d in ("sw-en", "de-en")}
    averages = group_averages(two, GROUPS)
    assert averages["MidRes"] == {"bleu": None, "chrf": None, "directions": []}
    with pytest.raises(ValueError, match="without a group"):
        group_averages(SCORES, {"sw-en": "LoRes"})


def test_report_follows_the_eval_json_contract():
    scores = score_directions(FIXTURE)
    groups = {"de-en": "HiRes", "en-zh": "MidRes", "en-ja": "LoRes"}
    report = build_eval_report(
        scores, groups, split="test", thresholds={"lores_below": 2000, "hires_at_least": 10000},
        decoding={"beam": 5, "lenpen": 1.0, "max_len_a": 1.2, "max_len_b": 10}, checkpoint="last.pt",
    )
    report = json.loads(json.dumps(report))  # JSON-serialisable, round-trips

    assert {"per_language", "groups", "sacrebleu_signature"} <= set(report)
    assert set(report["per_language"]) == set(FIXTURE)
    for direction, row in report["per_language"].items():
        assert {"bleu", "chrf", "n", "group"} <= set(row)
        assert row["group"] == groups[direction]
        assert row["n"] == 3
        assert isinstance(row["bleu"], float) and isinstance(row["chrf"], float)
    assert list(report["groups"]) == ["LoRes", "MidRes", "HiRes", "All"]
    for averages in report["groups"].values():
        assert isinstance(averages["bleu"], float) and isinstance(averages["chrf"], float)
    assert report["groups"]["HiRes"]["bleu"] == pytest.approx(scores["de-en"].bleu)
    # three target languages, three BLEU tokenizers -> three distinct signatures, all recorded
    assert report["sacrebleu_signature"].count("tok:") == 3
    assert "tok:13a" in report["sacrebleu_signature"] and "tok:char" in report["sacrebleu_signature"]
    assert report["chrf_signature"].startswith("nrefs:1|")
    assert report["split"] == "test" and report["thresholds"]["lores_below"] == 2000
    assert report["decoding"]["beam"] == 5 and report["checkpoint"] == "last.pt"


def test_single_signature_when_all_targets_share_a_tokenizer():
    scores = {d: score_direction(*FIXTURE["de-en"], "en") for d in ("de-en", "fr-en")}
    report = build_eval_report(scores, {"de-en": "HiRes", "fr-en": "LoRes"})
    assert report["sacrebleu_signature"] == scores["de-en"].bleu_signature
    assert " ; " not in report["sacrebleu_signature"]


def test_render_table_groups_directions_then_averages():
    report = build_eval_report(SCORES, GROUPS, split="valid", thresholds={"lores_below": 2000})
    table = render_table(json.loads(json.dumps(report)))
    assert isinstance(table, Table)
    assert [c.header for c in table.columns] == ["Direction", "Group", "BLEU", "chrF", "n"]
    console = Console(width=200, record=True)
    console.print(table)
    text = console.export_text()
    order = [text.index(d) for d in ("sw-en", "tl-en", "fr-en", "de-en", "ru-en")]
    assert order == sorted(order)
    assert text.index("ru-en") < text.index("All")
    assert "24.0" in text and "lores_below=2000" in text and "sigB" in text
