"""End to end: prepare → train → evaluate on the synthetic toy task (must learn it) and on a tiny
Bible subset (the real pipeline), and exact resume."""

import json
import pytest
import torch

from polycats.config import config_from_dict
from polycats.data.batching import BatchStream
from polycats.errors import PolycatsError
from polycats.evaluate.run import evaluate_run, translate_lines
from polycats.train.metrics import read_metrics
from polycats.train.trainer import train

SYNTHETIC = {
    "name": "synthetic",
    "data": {
        "source": "synthetic", "languages": {"de": 1500, "sw": 800}, "valid_per_lang": 40, "test_per_lang": 40,
        "vocab_size": 80, "synthetic": {"words": 12, "min_words": 3, "max_words": 6},
    },
    "model": {"d_model": 64, "encoder_layers": 2, "decoder_layers": 2, "heads": 4, "ffn_dim": 128, "dropout": 0.0},
    "train": {"max_updates": 400, "max_tokens": 600, "lr": 0.005, "warmup_updates": 30, "label_smoothing": 0.0,
              "valid_every": 100, "save_every": 200, "log_every": 50},
    "eval": {"beam": 2},
}


def synthetic_config(**train_overrides):
    tree = json.loads(json.dumps(SYNTHETIC))
    tree["train"].update(train_overrides)
    return config_from_dict(tree)


def test_synthetic_task_is_learned_to_near_perfect_bleu(tmp_path):
    run = tmp_path / "run"
    train(synthetic_config(), run, progress=False)
    report = evaluate_run(run, "test")
    for task, scores in report["per_language"].items():
        assert scores["bleu"] > 85, (task, scores)
    assert (run / "eval" / "test.json").exists()
    assert {"per_language", "groups", "sacrebleu_signature"} <= set(report)


def test_resume_gives_the_same_parameters_and_metrics(tmp_path):
    settings = dict(max_updates=6, log_every=1, valid_every=3, save_every=3, keep_snapshots=False)
    straight, split = tmp_path / "straight", tmp_path / "split"
    small = {"max_tokens": 300}
    train(synthetic_config(**settings, **small), straight, progress=False)
    train(synthetic_config(**{**settings, "max_updates": 3}, **small), split, progress=False)
    train(synthetic_config(**settings, **small), split, progress=False)  # resumes at update 3
    a = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(split / "checkpoints" / "last.pt", weights_only=True)
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    timing = ("tokens_per_s",)
    strip = lambda events: [{k: v for k, v in e.items() if k not in timing} for e in events]  # noqa: E731
    assert strip(read_metrics(straight)) == strip(read_metrics(split))


def test_two_stage_sampling_trains_hires_first_and_resumes_across_the_switch(tmp_path, monkeypatch):
    """sampling.first_stage_updates=3: de (HiRes) only for 3 updates, then the T=100 mix; stopping
    before, at and after the switch and resuming ends where the straight run ends."""
    from polycats.train.trainer import Trainer

    two_stage = {"max_tokens": 300, "log_every": 1, "valid_every": 3, "save_every": 1, "keep_snapshots": False}

    def config(max_updates):
        tree = json.loads(json.dumps(SYNTHETIC))
        tree["train"].update(two_stage, max_updates=max_updates)
        tree["data"]["groups"] = {"lores_below": 1000, "hires_from": 1200}
        tree["sampling"] = {"temperature": 100, "first_stage_updates": 3}
        return config_from_dict(tree)

    drawn = []
    next_batch = BatchStream.next
    monkeypatch.setattr(BatchStream, "next", lambda self: drawn.append(set((b := next_batch(self)).task.tolist())) or b)
    straight = tmp_path / "straight"
    trainer = Trainer(config(8), straight, progress=False)
    trainer.fit()
    assert all(tasks == {0} for tasks in drawn[:3]) and {1} <= set().union(*drawn[3:]), drawn
    start = read_metrics(straight)[0]
    assert start["first_stage_p/de-en"] == 1.0 and start["first_stage_p/sw-en"] == 0.0
    for stop in (2, 3, 4):
        split = tmp_path / f"split{stop}"
        train(config(stop), split, progress=False)
        train(config(8), split, progress=False)
        a = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)
        b = torch.load(split / "checkpoints" / "last.pt", weights_only=True)
        for name, tensor in a["model"].items():
            assert torch.equal(tensor, b["model"][name]), (stop, name)


def test_two_stage_sampling_names_unknown_languages(tmp_path):
    tree = json.loads(json.dumps(SYNTHETIC))
    tree["sampling"] = {"first_stage_updates": 3, "first_stage_languages": ["xx"]}
    with pytest.raises(PolycatsError, match="sampling.first_stage_languages: xx not in data.languages"):
        train(config_from_dict(tree), tmp_path / "run", progress=False)


@pytest.fixture(scope="module")
def tiny_bible_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("bible") / "run"
    config = config_from_dict({
        "data": {"source": "bible", "languages": {"de": 60, "sw": 20}, "valid_per_lang": 8, "test_per_lang": 6,
                 "vocab_size": 300, "max_len": 64, "tokenizer_sentences": 2000},
        "model": {"d_model": 32, "encoder_layers": 1, "decoder_layers": 1, "heads": 2, "ffn_dim": 64},
        "train": {"max_updates": 3, "max_tokens": 400, "valid_every": 3, "save_every": 3},
        "eval": {"beam": 2, "max_len_b": 5, "max_len_a": 0.0},
    })
    train(config, run, progress=False)
    return run


def test_bible_pipeline_writes_the_eval_contract(tiny_bible_run):
    report = evaluate_run(tiny_bible_run, "test")
    saved = json.loads((tiny_bible_run / "eval" / "test.json").read_text())
    assert saved["per_language"].keys() == {"de-en", "sw-en"}
    for scores in saved["per_language"].values():
        assert {"bleu", "chrf", "n", "group"} <= set(scores)
        assert scores["n"] == 6
    assert saved["per_language"]["sw-en"]["group"] == "LoRes"
    assert {"LoRes", "MidRes", "HiRes", "All"} <= set(saved["groups"])
    assert saved["sacrebleu_signature"].startswith("nrefs:1")
    assert report["per_language"] == saved["per_language"]
    hypotheses = (tiny_bible_run / "eval" / "test.sw-en.hyp").read_text().splitlines()
    assert len(hypotheses) == 6


def test_translate_keeps_one_output_line_per_input_line(tiny_bible_run):
    outputs = translate_lines(tiny_bible_run, ["Mungu ni upendo.", "", "x" * 5000], "sw", "en")
    assert len(outputs) == 3
    assert outputs[1] == ""


@pytest.mark.parametrize("balancer", ["cats", "pcgrad"])
def test_one_pass_per_task_gradients_train_like_one_pass_per_task(tmp_path, balancer):
    """The trainer's one-pass path (TaskSplit) and the sub-batch path take the same steps
    (no dropout, so both compute the same function)."""
    from polycats.train.trainer import Trainer

    tree = json.loads(json.dumps(SYNTHETIC))
    tree["train"].update(max_tokens=300)
    tree["balancer"] = {"name": balancer, **({"warmup_steps": 0} if balancer == "cats" else {})}
    one_pass = Trainer(config_from_dict(tree), tmp_path / "one", progress=False)
    sub_batches = Trainer(config_from_dict(tree), tmp_path / "sub", progress=False)
    assert one_pass.task_split is not None
    sub_batches.task_split = None
    for _ in range(4):
        batch = one_pass.stream.next()
        assert len(batch.task.unique()) > 1
        one_pass.train_step([batch])
        sub_batches.train_step([batch])
    for a, b in zip(one_pass.params, sub_batches.params):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    if balancer == "cats":
        alphas = {k: v for k, v in one_pass.balancer.log_values().items() if k.startswith("alpha/")}
        assert alphas == pytest.approx({k: sub_batches.balancer.log_values()[k] for k in alphas}, rel=1e-4)
        assert len(set(alphas.values())) > 1  # α moved, so the comparison means something
    torch.testing.assert_close(one_pass.totals.state_dict(), sub_batches.totals.state_dict())


def test_cats_update_every_pays_for_per_task_passes_only_on_alpha_updates(tmp_path, monkeypatch):
    """warmup 2, update_every 3: per-task passes on steps 0, 1 (warm-up) and 2, 5, 8 (α updates);
    the other steps are one weighted backward pass, and α moves only on the update steps."""
    import polycats.train.trainer as trainer_module

    tree = json.loads(json.dumps(SYNTHETIC))
    tree["train"].update(max_updates=9, log_every=1, valid_every=9, save_every=9, max_tokens=300)
    tree["balancer"] = {"name": "cats", "warmup_steps": 2, "update_every": 3}
    trainer = trainer_module.Trainer(config_from_dict(tree), tmp_path / "run", progress=False)
    per_task_steps = []
    real = trainer.per_task_backward
    monkeypatch.setattr(trainer, "per_task_backward",
                        lambda *args, **kwargs: per_task_steps.append(trainer.state.update) or real(*args, **kwargs))
    trainer.fit()
    assert per_task_steps == [0, 1, 2, 5, 8]
    alphas = [e["alpha/sw-en"] for e in read_metrics(tmp_path / "run") if e["event"] == "train"]
    moved = [update for update, (a, b) in enumerate(zip([1.0, *alphas], alphas), start=1) if a != b]
    assert moved == [3, 6, 9], alphas
