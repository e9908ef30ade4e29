"""CATS inside the trainer: its schedule counts the trainer's updates (skipped batches included in
neither), a float64 model trains with float64 per-task gradients, and ``source=valid`` uses a
fixed validation sample whose batches the ``hvp`` probe measures too."""

from __future__ import annotations

import json

import pytest
import torch

from polycats.config import config_from_dict
from polycats.ops.hessian import hessian_operator
from polycats.train import trainer as trainer_module
from polycats.train.trainer import Trainer

from nan_injection import poison_batches

TINY = {
    "name": "tiny",
    "data": {
        "source": "synthetic", "languages": {"de": 300, "sw": 60}, "valid_per_lang": 20, "test_per_lang": 10,
        "vocab_size": 60, "synthetic": {"words": 10, "min_words": 3, "max_words": 5},
    },
    "model": {"d_model": 32, "encoder_layers": 1, "decoder_layers": 1, "heads": 2, "ffn_dim": 64, "dropout": 0.0},
    "train": {"max_updates": 8, "max_tokens": 300, "lr": 0.003, "warmup_updates": 4, "label_smoothing": 0.1,
              "valid_every": 4, "save_every": 4, "log_every": 1, "keep_snapshots": False},
    "balancer": {"name": "cats", "warmup_steps": 2, "update_every": 2},
}


def tiny_config(**balancer):
    tree = json.loads(json.dumps(TINY))
    tree["balancer"].update(balancer)
    return config_from_dict(tree)


def test_skipped_batches_do_not_move_the_cats_schedule(tmp_path, monkeypatch):
    # Batch 2 falls on a per-task (warm-up) step, batch 6 on a weighted step between α updates.
    poison_batches(monkeypatch, {2, 6})
    trainer = Trainer(tiny_config(), tmp_path / "run", progress=False)
    trainer.fit()
    assert trainer.state.update == 8 and trainer.state.skipped_total == 2
    assert trainer.balancer.steps == trainer.state.update
    # α updates on updates 2, 4, 6 (0-based: warm-up 2, then every 2nd).
    assert trainer.balancer.log_values()["cats/updates"] == 3.0


def test_a_float64_model_trains_with_float64_task_gradients(tmp_path, monkeypatch):
    build = trainer_module.build_model
    monkeypatch.setattr(trainer_module, "build_model", lambda config, vocab: build(config, vocab).double())
    trainer = Trainer(tiny_config(update_every=1), tmp_path / "run", progress=False)
    trainer.fit()
    assert trainer.state.update == 8 and trainer.state.skipped_total == 0
    assert trainer.row_buffers and trainer.row_buffers[0].dtype == torch.float64
    assert trainer.balancer.log_values()["cats/updates"] == 6.0


def test_valid_source_uses_a_fixed_sample_and_the_probe_measures_the_same_batches(tmp_path):
    config = tiny_config(source="valid", constraint="hvp", valid_sentences=7, warmup_steps=0)
    trainer = Trainer(config, tmp_path / "run", progress=False)
    try:
        sample = trainer.validation_sample()
        assert [len(batch.task) for batch in sample] == [7, 7]
        assert [int(batch.task[0]) for batch in sample] == [0, 1]
        again = Trainer.validation_sample(trainer)  # cached: the same sample every time
        assert again is sample
        other = Trainer(config, tmp_path / "other", progress=False)
        for a, b in zip(sample, other.validation_sample()):
            assert torch.equal(a.src, b.src) and torch.equal(a.tgt_out, b.tgt_out)
        other.close()

        total = sum(batch.target_tokens for batch in sample)
        stats = trainer.validation_stats(curvature=False)
        assert stats.curvature is None
        direction = stats.grads.sum(0)  # α = 1 before the first update
        operator = hessian_operator(
            trainer.model, lambda: sum(trainer.batch_loss(b) * b.target_tokens for b in sample) / total
        )
        expected = float(direction @ operator.matvec(direction) / (direction @ direction))
        assert trainer.balancer.plan(0).validation and trainer.balancer.plan(0).curvature
        trainer.train_step([trainer.stream.next()])  # update 0: validation statistics, α, then the step
        logged = trainer.balancer.log_values()
        assert logged["cats/updates"] == 1.0
        assert logged["cats/curvature"] == pytest.approx(expected, rel=1e-4)
    finally:
        trainer.close()
