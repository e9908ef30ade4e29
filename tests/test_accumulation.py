"""Gradient accumulation (``train.update_freq``) and mixed precision (``train.precision``).

Accumulating k micro-batches must give the update of one batch holding all their sentences, for
the scalar balancer (one backward of the weighted loss) and for CATS (per-task gradient rows
summed across micro-batches before it sees them), with the loss normalised by the tokens of the
whole update. bf16 trains, with CATS's state and the per-task rows in fp32; fp16's GradScaler
overflow is a skipped step for CATS too.
"""

from __future__ import annotations

import pytest
import torch

from polycats.config import config_from_dict
from polycats.data.batching import Batch
from polycats.data.prepare import PAD
from polycats.errors import PolycatsError
from polycats.train.metrics import read_metrics
from polycats.train.trainer import Trainer, train

BASE = {
    "name": "accumulation",
    "data": {"source": "synthetic", "languages": {"de": 80, "fr": 60, "sw": 20}, "valid_per_lang": 8, "test_per_lang": 8,
             "vocab_size": 60, "max_len": 40, "synthetic": {"words": 8, "min_words": 2, "max_words": 5}},
    "model": {"d_model": 16, "encoder_layers": 1, "decoder_layers": 1, "heads": 2, "ffn_dim": 32, "dropout": 0.0,
              "attention_dropout": 0.0},
    "train": {"max_updates": 6, "max_tokens": 160, "warmup_updates": 2, "save_every": 100, "valid_every": 100,
              "log_every": 1, "threads": 1, "clip_norm": 0.0},
}
BALANCERS = {"scalar": {"name": "scalar"}, "cats": {"name": "cats", "warmup_steps": 1, "update_every": 1}}


def config(balancer: str, **train):
    return config_from_dict({**BASE, "balancer": BALANCERS[balancer], "train": {**BASE["train"], **train}})


def concatenate(batches: list[Batch]) -> Batch:
    """One batch holding every sentence of ``batches`` (padded to the longest)."""
    def stack(name: str) -> torch.Tensor:
        tensors = [getattr(b, name) for b in batches]
        width = max(t.shape[1] for t in tensors)
        return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]), value=PAD) for t in tensors])
    return Batch(stack("src"), stack("tgt_in"), stack("tgt_out"), torch.cat([b.task for b in batches]))


@pytest.mark.parametrize("balancer", ["scalar", "cats"])
def test_accumulating_micro_batches_equals_one_large_batch(tmp_path, balancer):
    accumulating = Trainer(config(balancer, update_freq=3), tmp_path / "accumulate", progress=False)
    whole = Trainer(config(balancer), tmp_path / "whole", progress=False)
    for _ in range(5):
        drawn = accumulating.next_batches()
        assert len(drawn) == 3 and len({len(b.task) for b in drawn} | {0}) > 1
        assert "skipped" not in accumulating.train_step(drawn)
        assert "skipped" not in whole.train_step([concatenate(drawn)])
        accumulating.state.update += 1
        whole.state.update += 1
    for (name, a), b in zip(accumulating.model.named_parameters(), whole.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    if balancer == "cats":
        alpha_a, alpha_b = accumulating.balancer.state_dict()["alpha"], whole.balancer.state_dict()["alpha"]
        assert not torch.allclose(alpha_a, torch.ones_like(alpha_a))  # CATS moved α, identically
        torch.testing.assert_close(alpha_a, alpha_b, rtol=1e-4, atol=1e-6)
    accumulating.close(), whole.close()


def test_a_run_with_update_freq_draws_that_many_batches_per_update(tmp_path):
    train(config("scalar", max_updates=4, update_freq=2), tmp_path / "run", progress=False)
    reference = Trainer(config("scalar"), tmp_path / "reference", progress=False)
    for _ in range(8):
        reference.stream.next()
    reference.close()
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert state["update"] == 4 and state["sampler"] == reference.stream.state_dict()
    assert len([e for e in read_metrics(tmp_path / "run") if e["event"] == "train"]) == 4


def test_bf16_trains_and_keeps_the_balancer_math_in_fp32(tmp_path):
    run = tmp_path / "bf16"
    trainer = Trainer(config("cats", max_updates=30, precision="bf16", lr=0.01), run, progress=False)
    trainer.fit()
    losses = [e["train_nll"] for e in read_metrics(run) if e["event"] == "train"]
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert trainer.row_buffers[0].dtype == torch.float32
    state = trainer.balancer.state_dict()
    assert state["alpha"].dtype == torch.float64 and state["gram_ema"].dtype == torch.float64
    assert not torch.allclose(state["alpha"], torch.ones_like(state["alpha"]))


def test_an_fp16_overflow_is_a_skipped_step_for_cats_too(tmp_path):
    trainer = Trainer(config("cats", precision="fp16"), tmp_path / "fp16", progress=False)
    assert trainer.scaler is not None
    assert "skipped" not in trainer.train_step(trainer.next_batches())  # a normal scale steps
    trainer.state.update += 1
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    steps = trainer.balancer.state_dict()["steps"]
    trainer.scaler.update(2.0 ** 120)  # the fp16 backward overflows at this scale
    step = trainer.train_step(trainer.next_batches())
    assert step == {"skipped": 1.0, "reason": "gradient"}
    assert trainer.scaler.get_scale() == 2.0 ** 119  # backed off
    assert trainer.balancer.state_dict()["steps"] == steps  # CATS did not count the step
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    trainer.close()


def test_precision_and_update_freq_are_checked():
    with pytest.raises(PolycatsError, match="'train.update_freq': Input should be greater than or equal to 1"):
        config("scalar", update_freq=0)
    with pytest.raises(PolycatsError, match="'train.precision'.*'fp32', 'bf16' or 'fp16'"):
        config("scalar", precision="fp8")
