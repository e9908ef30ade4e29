"""sacreBLEU scores per translation direction, group averages, and the ``eval/<split>.json`` dict.

Every score carries its sacreBLEU signature so a number says how it was produced.

BLEU tokenisation is chosen by the *target* language of a direction (``"sw-en"`` -> ``en``):

- ``zh``: sacreBLEU's ``zh`` tokenizer (splits Chinese characters, 13a elsewhere) — the WMT
  standard for Chinese;
- ``ja``: ``char`` (character-level BLEU). sacreBLEU's ``ja-mecab`` needs the MeCab tokenizer and
  its dictionary (``mecab-python3`` + ``ipadic``), which we cannot assume offline; plain ``13a``
  would treat a whole unspaced Japanese sentence as one or two "words", making BLEU meaningless.
  Character BLEU is not comparable to MeCab BLEU published elsewhere — the signature says
  ``tok:char``;
- every other language: ``13a`` (sacreBLEU's default, mteval-v13a).

chrF (character 6-grams, β = 2, no word n-grams) needs no tokenizer and is the same for all.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sacrebleu
from rich.table import Table
from sacrebleu.metrics import BLEU, CHRF

__all__ = [
    "GROUP_ORDER",
    "DirectionScore",
    "bleu_tokenizer",
    "build_eval_report",
    "group_averages",
    "metric",
    "render_table",
    "score_direction",
    "score_directions",
    "target_language",
]

# Canonical groups, always present in results (with null scores when a group has no direction).
GROUP_ORDER = ("LoRes", "MidRes", "HiRes")
ALL = "All"

_TOKENIZER_BY_LANGUAGE = {"zh": "zh", "ja": "char"}


def target_language(direction: str) -> str:
    """``"sw-en"`` -> ``"en"``: directions are named ``<src>-<tgt>`` with plain language codes."""
    src, sep, tgt = direction.partition("-")
    if not sep or not src or not tgt or "-" in tgt:
        raise ValueError(f"direction must look like 'xx-yy', got {direction!r}")
    return tgt


def bleu_tokenizer(language: str) -> str:
    """sacreBLEU tokenizer for BLEU on text in ``language`` (see the module docstring)."""
    return _TOKENIZER_BY_LANGUAGE.get(language.lower(), "13a")


@dataclass(frozen=True)
class DirectionScore:
    bleu: float
    chrf: float
    n: int  # number of sentences scored
    tokenizer: str
    bleu_signature: str
    chrf_signature: str


def metric(name: str, target_lang: str) -> BLEU | CHRF:
    """The sacreBLEU metric ``name`` (``bleu`` or ``chrf``) configured as polycats scores text in
    ``target_lang``.

    >>> metric("bleu", "ja").tokenizer_signature
    'char'
    """
    if name == "bleu":
        return BLEU(tokenize=bleu_tokenizer(target_lang))
    if name == "chrf":
        return CHRF()
    raise ValueError(f"metric must be bleu or chrf, not {name!r}")


def score_direction(hypotheses: Sequence[str], references: Sequence[str], target_lang: str) -> DirectionScore:
    """Corpus BLEU and chrF of detokenised ``hypotheses`` against one reference each."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if not hypotheses:
        raise ValueError("nothing to score: no hypotheses")
    hypotheses, references = list(hypotheses), list(references)
    bleu, chrf = metric("bleu", target_lang), metric("chrf", target_lang)
    return DirectionScore(
        bleu=bleu.corpus_score(hypotheses, [references]).score,
        chrf=chrf.corpus_score(hypotheses, [references]).score,
        n=len(hypotheses),
        tokenizer=bleu_tokenizer(target_lang),
        bleu_signature=str(bleu.get_signature()),
        chrf_signature=str(chrf.get_signature()),
    )


def score_directions(outputs: Mapping[str, tuple[Sequence[str], Sequence[str]]]) -> dict[str, DirectionScore]:
    """``{direction: (hypotheses, references)}`` -> ``{direction: DirectionScore}``."""
    return {
        direction: score_direction(hyps, refs, target_language(direction))
        for direction, (hyps, refs) in outputs.items()
    }


def _group_names(groups: Mapping[str, str]) -> list[str]:
    extra = [g for g in dict.fromkeys(groups.values()) if g not in GROUP_ORDER and g != ALL]
    return [*GROUP_ORDER, *extra]


def group_averages(scores: Mapping[str, DirectionScore], groups: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Unweighted mean BLEU and chrF over the directions of each group, plus ``All``.

    ``groups`` maps direction -> group name (``LoRes``/``MidRes``/``HiRes`` or any other name).
    Every direction scored must have a group. The three canonical groups are always present; a
    group without directions has ``bleu``/``chrf`` None (null in JSON), never a made-up number.
    """
    missing = sorted(set(scores) - set(groups))
    if missing:
        raise ValueError(f"directions without a group: {missing}")
    result: dict[str, dict[str, Any]] = {}
    for name in [*_group_names({d: groups[d] for d in scores}), ALL]:
        members = [d for d in scores if name == ALL or groups[d] == name]
        result[name] = {
            "bleu": statistics.fmean(scores[d].bleu for d in members) if members else None,
            "chrf": statistics.fmean(scores[d].chrf for d in members) if members else None,
            "directions": members,
        }
    return result


def _joined(signatures: Sequence[str]) -> str:
    return " ; ".join(dict.fromkeys(signatures))


def build_eval_report(
    scores: Mapping[str, DirectionScore],
    groups: Mapping[str, str],
    *,
    split: str | None = None,
    thresholds: Mapping[str, Any] | None = None,
    decoding: Mapping[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The ``eval/<split>.json`` dict (JSON-serialisable)::

        {"per_language": {"sw-en": {"bleu", "chrf", "n", "group", "tokenizer",
                                    "bleu_signature", "chrf_signature"}, ...},
         "groups": {"LoRes": {"bleu", "chrf", "directions"}, "MidRes": .., "HiRes": .., "All": ..},
         "sacrebleu_signature": BLEU signature (distinct ones joined by " ; " when target
                                languages need different tokenizers),
         "chrf_signature": ..., "sacrebleu_version": ...,
         "split": ..., "thresholds": ..., "decoding": ..., **extra}

    ``thresholds`` are the group thresholds from the config (e.g. ``{"lores_below": 2000,
    "hires_at_least": 10000}``) and ``decoding`` the search settings (beam, lenpen, max_len_a/b),
    both stored as given. Directions keep the order of ``scores``.
    """
    per_language = {
        direction: {
            "bleu": s.bleu,
            "chrf": s.chrf,
            "n": s.n,
            "group": groups[direction] if direction in groups else None,
            "tokenizer": s.tokenizer,
            "bleu_signature": s.bleu_signature,
            "chrf_signature": s.chrf_signature,
        }
        for direction, s in scores.items()
    }
    report: dict[str, Any] = {
        "per_language": per_language,
        "groups": group_averages(scores, groups),
        "sacrebleu_signature": _joined([s.bleu_signature for s in scores.values()]),
        "chrf_signature": _joined([s.chrf_signature for s in scores.values()]),
        "sacrebleu_version": sacrebleu.__version__,
    }
    if split is not None:
        report["split"] = split
    if thresholds is not None:
        report["thresholds"] = dict(thresholds)
    if decoding is not None:
        report["decoding"] = dict(decoding)
    report.update(extra)
    return report


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def render_table(report: Mapping[str, Any], title: str | None = None) -> Table:
    """A rich table of an ``eval/<split>.json`` dict (fresh or loaded from disk).

    One row per direction, grouped LoRes -> MidRes -> HiRes (others after), then a section with
    one row per group average and ``All``. The caption holds the signatures and thresholds.
    """
    if title is None:
        title = f"Evaluation ({report['split']})" if "split" in report else "Evaluation"
    caption = [f"BLEU: {report['sacrebleu_signature']}"]
    if "chrf_signature" in report:
        caption.append(f"chrF: {report['chrf_signature']}")
    if report.get("thresholds"):
        caption.append("groups: " + ", ".join(f"{k}={v}" for k, v in report["thresholds"].items()))
    if report.get("decoding"):
        caption.append("decoding: " + ", ".join(f"{k}={v}" for k, v in report["decoding"].items()))
    table = Table(title=title, caption="\n".join(caption))
    table.add_column("Direction")
    table.add_column("Group")
    table.add_column("BLEU", justify="right")
    table.add_column("chrF", justify="right")
    table.add_column("n", justify="right")

    per_language: Mapping[str, Mapping[str, Any]] = report["per_language"]
    group_names = [g for g in report["groups"] if g != ALL]
    order = {g: i for i, g in enumerate(group_names)}
    directions = sorted(per_language, key=lambda d: order.get(per_language[d]["group"], len(order)))
    for direction in directions:
        row = per_language[direction]
        table.add_row(direction, str(row["group"]), _fmt(row["bleu"]), _fmt(row["chrf"]), str(row["n"]))
    table.add_section()
    for name, averages in report["groups"].items():
        n_directions = len(averages.get("directions", []))
        table.add_row(
            f"[bold]{name}[/bold]", f"{n_directions} dir.", _fmt(averages["bleu"]), _fmt(averages["chrf"]), "",
        )
    return table
