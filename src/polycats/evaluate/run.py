"""evaluate and translate: decode a split of a run with its best (or last) checkpoint, score each
direction with sacreBLEU, write ``RUN_DIR/eval/<split>.json`` and the hypotheses. Decoding runs on
``device`` (auto, cpu, cuda; default: the run's ``train.device``), whatever the run trained on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from polycats.config import Config
from polycats.data.batching import collate
from polycats.data.corpus import normalise
from polycats.data.prepare import BOS, EOS, PAD, UNK, PreparedData, language_tag, task_languages
from polycats.errors import PolycatsError
from polycats.evaluate.beam import search
from polycats.evaluate.scoring import build_eval_report, score_directions
from polycats.io import atomic_write_json, atomic_write_text
from polycats.model.transformer import Transformer
from polycats.run.build import set_threads
from polycats.run.directory import RunDir


def never_generated(data: PreparedData) -> list[int]:
    """Ids a translation never contains: unk and every language tag. A barely trained model
    emits tags (every source starts with one), which detokenise to ``<2xx>`` in the output."""
    languages = {language for task in data.tasks for language in task_languages(task)}
    return sorted({UNK, *(data.tokenizer.piece_to_id(language_tag(language)) for language in languages)})


def translate_ids(model: Transformer, sources: list, config: Config, banned: list[int]) -> list[list[int]]:
    """Decode token-id sources in length-sorted batches (less padding), returned in input order;
    ``banned``: ids never generated (:func:`never_generated`)."""
    e = config.eval
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    outputs: list[list[int]] = [[] for _ in sources]
    device = next(model.parameters()).device
    for start in range(0, len(order), e.batch_size):
        rows = order[start : start + e.batch_size]
        # collate wants targets; a one-token dummy keeps it shared with training batches.
        src = collate([sources[i] for i in rows], [sources[i][:1] for i in rows], [0] * len(rows)).src.to(device)
        hyps = search(model, src, bos_id=BOS, eos_id=EOS, pad_id=PAD, beam=e.beam, lenpen=e.lenpen,
                      max_len_a=e.max_len_a, max_len_b=e.max_len_b, max_len_cap=model.shape.max_positions - 1,
                      banned=banned)
        for row, hyp in zip(rows, hyps):
            outputs[row] = hyp.tokens
    return outputs


def evaluate_run(run_dir: str | Path, split: str = "test", checkpoint: str | None = None,
                 device: str | None = None, threads: int | None = None) -> dict[str, Any]:
    """``threads``: CPU threads (default: the run's ``train.threads``)."""
    run = RunDir(run_dir)
    config = run.config()
    set_threads(config.train.threads if threads is None else threads)
    if split not in ("valid", "test"):
        raise PolycatsError(f"--split must be valid or test, not '{split}'")
    data = run.prepared(config)
    which = checkpoint or config.eval.checkpoint
    model = run.load_model(which, config, data, device)
    references = data.references(split)
    arrays = data.split(split)
    outputs, banned = {}, never_generated(data)
    for task in data.tasks:
        hyps = data.decode(translate_ids(model, arrays[task].src, config, banned))
        outputs[task] = (hyps, [item["ref"] for item in references[task]])
        atomic_write_text(run.path / "eval" / f"{split}.{task}.hyp", "".join(h + "\n" for h in hyps))
    report = build_eval_report(
        score_directions(outputs), data.meta["groups"], split=split,
        thresholds=data.meta["group_thresholds"],
        decoding={"beam": config.eval.beam, "lenpen": config.eval.lenpen, "max_len_a": config.eval.max_len_a,
                  "max_len_b": config.eval.max_len_b},
        checkpoint=which, train_pairs={task: data.meta["sizes"][task]["train"] for task in data.tasks},
    )
    atomic_write_json(run.path / "eval" / f"{split}.json", report)
    return report


def translate_lines(run_dir: str | Path, lines: list[str], src_lang: str, tgt_lang: str, checkpoint: str | None = None,
                    device: str | None = None, threads: int | None = None) -> list[str]:
    run = RunDir(run_dir)
    config = run.config()
    set_threads(config.train.threads if threads is None else threads)
    data: PreparedData = run.prepared(config)
    task = f"{src_lang}-{tgt_lang}"
    if task not in data.tasks:
        raise PolycatsError(f"this run translates {', '.join(data.tasks)}; it was not trained on {task}")
    model = run.load_model(checkpoint or config.eval.checkpoint, config, data, device)
    texts = [normalise(line) for line in lines]
    present = [i for i, text in enumerate(texts) if text]
    limit = model.shape.max_positions
    # Overlong inputs are cut (keeping the final eos) rather than refused: translate serves any text.
    sources = [np.asarray(ids if len(ids) <= limit else [*ids[: limit - 1], EOS], dtype=np.int32)
               for ids in data.encode_source([texts[i] for i in present], tgt_lang)]
    outputs = [""] * len(lines)
    translated = data.decode(translate_ids(model, sources, config, never_generated(data))) if sources else []
    for i, text in zip(present, translated):
        outputs[i] = text
    return outputs
