"""polycats.integrations.hf: a tiny Marian from a config trains with CATS and logs α, the scalar
balancer and the per-task path equal a plain Seq2SeqTrainer on the same batches, the sampler
follows the temperature, metrics are per language, bad input is one clear error."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from datasets import Dataset, disable_progress_bars  # noqa: E402
from transformers import (  # noqa: E402
    EvalPrediction, MarianConfig, MarianMTModel, Seq2SeqTrainer, Seq2SeqTrainingArguments, TrainerCallback,
)
from transformers.utils import logging as hf_logging  # noqa: E402

import polycats.integrations.hf as hf  # noqa: E402
from polycats.balance import CATS, ScalarBalancer, TorchJDBalancer  # noqa: E402
from polycats.balancer_config import PCGradConfig  # noqa: E402
from polycats.data.sampling import SamplingSchedule  # noqa: E402
from polycats.errors import PolycatsError  # noqa: E402
from polycats.integrations.hf import BalancedSeq2SeqTrainer, TemperatureSampler, TokenIdCollator  # noqa: E402

PAD, BOS, EOS, VOCAB = 0, 2, 3, 24
TASKS = ["de-en", "sw-en"]
hf_logging.set_verbosity_error()
disable_progress_bars()


def tiny_marian(dropout: float = 0.0) -> MarianMTModel:
    torch.manual_seed(0)
    return MarianMTModel(MarianConfig(
        vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, dropout=dropout, max_position_embeddings=32,
        pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=BOS, forced_eos_token_id=None,
    ))


def copy_task_data(rows: dict[str, int], seed: int = 0) -> Dataset:
    """Reverse-copy tasks: de-en reverses ids 4..13, sw-en ids 14..23 (lengths 2-6)."""
    rng = np.random.default_rng(seed)
    columns: dict[str, list] = {"input_ids": [], "labels": [], "task": []}
    for task, count in rows.items():
        low = 4 if task == "de-en" else 14
        for _ in range(count):
            ids = rng.integers(low, low + 10, size=int(rng.integers(2, 7))).tolist()
            columns["input_ids"].append([*ids, EOS])
            columns["labels"].append([*reversed(ids), EOS])
            columns["task"].append(task)
    return Dataset.from_dict(columns)


def arguments(tmp_path, steps: int = 3, **extra) -> Seq2SeqTrainingArguments:
    return Seq2SeqTrainingArguments(
        str(tmp_path / "out"), max_steps=steps, per_device_train_batch_size=8, learning_rate=1e-2,
        label_smoothing_factor=0.1, logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, seed=3,
        **{"save_strategy": "no", **extra})


def trainer(tmp_path, balancer, data=None, model=None, **kwargs) -> BalancedSeq2SeqTrainer:
    return BalancedSeq2SeqTrainer(
        model=model or tiny_marian(), args=kwargs.pop("args", None) or arguments(tmp_path),
        train_dataset=copy_task_data({"de-en": 24, "sw-en": 8}) if data is None else data, balancer=balancer,
        data_collator=TokenIdCollator(PAD, BOS), **kwargs)


def parameters(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def plain_run(tmp_path, dropout: float) -> torch.Tensor:
    """A plain Seq2SeqTrainer (its LabelSmoother, its loss) on the batches the integration draws at T=1."""
    data = copy_task_data({"de-en": 24, "sw-en": 8})
    tasks = [TASKS.index(t) for t in data["task"]]
    schedule = SamplingSchedule(np.array([24 / 32, 8 / 32]))

    class SameBatches(Seq2SeqTrainer):
        def _get_train_sampler(self, train_dataset=None):
            return TemperatureSampler(tasks, schedule, self.args.per_device_train_batch_size, self.args.seed)

    model = tiny_marian(dropout)
    SameBatches(model=model, args=arguments(tmp_path / "plain"), train_dataset=data.remove_columns("task"),
                data_collator=TokenIdCollator(PAD, BOS)).train()
    return parameters(model)


def test_the_scalar_balancer_at_t1_equals_a_plain_seq2seq_trainer(tmp_path):
    """One backward pass of Σ S_i / N with the Trainer's label smoothing is the Trainer's own loss;
    with dropout on, the dropout masks match too (one forward pass per step in both)."""
    model = tiny_marian(dropout=0.1)
    trainer(tmp_path, ScalarBalancer(TASKS), model=model).train()
    expected = plain_run(tmp_path, dropout=0.1)
    assert not torch.equal(expected, parameters(tiny_marian(dropout=0.1)))  # it trained
    torch.testing.assert_close(parameters(model), expected, rtol=1e-5, atol=1e-6)


def test_sw_en_weighted_twice_is_not_the_plain_trainer(tmp_path):
    """The comparison above can fail: a different loss weight gives different parameters."""
    model = tiny_marian(dropout=0.1)
    trainer(tmp_path, ScalarBalancer(TASKS, {"sw-en": 2.0}), model=model).train()
    assert not torch.allclose(parameters(model), plain_run(tmp_path, dropout=0.1), atol=1e-4)


def test_per_task_gradients_sum_to_the_plain_gradient(tmp_path):
    """CATS in warm-up (α = 1) takes one backward pass per task and applies Σ_i g_i with
    g_i = ∇(S_i / N): the plain Trainer's update, up to float summation order."""
    model = tiny_marian()
    cats = CATS(TASKS, warmup_steps=100)
    trainer(tmp_path, cats, model=model).train()
    assert cats.steps == 3
    torch.testing.assert_close(parameters(model), plain_run(tmp_path, dropout=0.0), rtol=1e-4, atol=1e-5)


class Recorder(TrainerCallback):
    def __init__(self):
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def test_a_tiny_marian_trains_with_cats_alpha_is_logged_and_metrics_are_per_language(tmp_path):
    recorder = Recorder()
    cats = CATS(TASKS, warmup_steps=2, lr_alpha=0.5)
    evaluation = copy_task_data({"de-en": 4, "sw-en": 3}, seed=1)
    args = arguments(tmp_path, steps=6, predict_with_generate=True, generation_max_length=8)
    run = trainer(tmp_path, cats, args=args, eval_dataset=evaluation, callbacks=[recorder],
                  compute_metrics=hf.translation_metrics(evaluation["task"], lambda rows: [" ".join(map(str, r)) for r in rows],
                                                         {"de-en": "HiRes", "sw-en": "LoRes"}))
    run.train()
    train_logs = [log for log in recorder.logs if "loss" in log]
    assert len(train_logs) == 6  # every step's log went through the Trainer's callbacks (TensorBoard is one)
    assert all({"alpha/de-en", "alpha/sw-en", "lambda", "train_loss/de-en", "train_loss/sw-en"} <= log.keys()
               for log in train_logs)
    assert train_logs[0]["alpha/sw-en"] == 1.0  # warm-up
    assert train_logs[-1]["alpha/sw-en"] != 1.0  # updated from the Gram matrix after it
    assert sum(train_logs[-1][f"alpha/{t}"] for t in TASKS) == pytest.approx(2.0)  # α stays on its simplex
    assert train_logs[-1]["loss"] < train_logs[0]["loss"]
    metrics = run.evaluate()
    for key in ("eval_bleu/de-en", "eval_chrf/sw-en", "eval_bleu/LoRes", "eval_chrf/HiRes", "eval_bleu/All", "eval_loss"):
        assert key in metrics and np.isfinite(metrics[key]), key


def test_a_peer_trains_through_the_integration(tmp_path):
    model = tiny_marian()
    before = parameters(model)
    trainer(tmp_path, TorchJDBalancer(TASKS, PCGradConfig()), model=model).train()
    assert torch.isfinite(parameters(model)).all() and not torch.equal(parameters(model), before)


def test_translation_metrics_score_each_language_against_its_references():
    decode = lambda rows: [" ".join(f"w{t}" for t in row) for row in rows]  # noqa: E731
    labels = np.array([[5, 6, 7, 8, 3], [9, 10, 11, 12, 3], [4, 5, 6, 7, 3]])
    wrong_sw = labels.copy()
    wrong_sw[2] = [13, 14, 15, -100, -100]
    metrics = hf.translation_metrics(["de-en", "de-en", "sw-en"], decode)(EvalPrediction(wrong_sw, labels))
    assert metrics["bleu/de-en"] == pytest.approx(100.0) and metrics["chrf/de-en"] == pytest.approx(100.0)
    assert metrics["bleu/sw-en"] == 0.0 and metrics["chrf/sw-en"] < 50
    with pytest.raises(PolycatsError, match="3 evaluated rows but 2 tasks"):
        hf.translation_metrics(["de-en", "sw-en"], decode)(EvalPrediction(labels, labels))


def test_the_sampler_follows_the_temperature_and_the_schedule():
    tasks = [0] * 90 + [1] * 10

    def share_of_task_1(schedule, epoch=0) -> float:
        sampler = TemperatureSampler(tasks, schedule, batch_size=10, seed=1)
        sampler.set_epoch(epoch)
        return float(np.mean([tasks[i] for i in sampler]))

    proportional = SamplingSchedule(np.array([0.9, 0.1]))
    uniform = SamplingSchedule(np.array([0.5, 0.5]))
    assert share_of_task_1(proportional) < 0.25 < 0.35 < share_of_task_1(uniform)
    two_stage = SamplingSchedule(np.array([0.5, 0.5]), first_stage=np.array([1.0, 0.0]), first_stage_updates=15)
    second_epoch = TemperatureSampler(tasks, two_stage, batch_size=10, seed=1)
    second_epoch.set_epoch(1)  # updates 10..19: the first stage ends after update 14
    drawn = [tasks[i] for i in second_epoch]
    assert share_of_task_1(two_stage, epoch=0) == 0 and sum(drawn[:50]) == 0 and np.mean(drawn[50:]) > 0.35
    first = TemperatureSampler(tasks, uniform, batch_size=10, seed=1)
    assert list(first) == list(TemperatureSampler(tasks, uniform, batch_size=10, seed=1))
    first.set_epoch(1)
    assert list(first) != list(TemperatureSampler(tasks, uniform, batch_size=10, seed=1))


def test_temperature_upsamples_the_small_task(tmp_path):
    seen = {0: 0, 1: 0}
    run = trainer(tmp_path, ScalarBalancer(TASKS), temperature=100.0)
    for index in run._get_train_sampler():
        seen[run.train_dataset[index]["task"]] += 1
    assert seen[1] > 0.35 * sum(seen.values())  # T=100 ≈ uniform; sw-en is 1/4 of the rows


def test_bad_input_is_one_clear_error_naming_the_field(tmp_path):
    with pytest.raises(PolycatsError, match="train_dataset has no 'task' column"):
        trainer(tmp_path, ScalarBalancer(TASKS), data=copy_task_data({"de-en": 4}).remove_columns("task"))
    with pytest.raises(PolycatsError, match="column 'task' has task fr-en, not one of the balancer's tasks"):
        trainer(tmp_path, ScalarBalancer(TASKS), data=copy_task_data({"de-en": 4, "fr-en": 2}))
    with pytest.raises(PolycatsError, match="gradient_accumulation_steps must be 1"):
        trainer(tmp_path, ScalarBalancer(TASKS), args=arguments(tmp_path, gradient_accumulation_steps=2))
    with pytest.raises(PolycatsError, match="no row of task sw-en"):
        trainer(tmp_path, ScalarBalancer(TASKS), data=copy_task_data({"de-en": 4}),
                schedule=SamplingSchedule(np.array([0.5, 0.5])))
    valid = CATS(TASKS, source="valid", warmup_steps=0)
    with pytest.raises(PolycatsError, match="validation_dataset"):
        trainer(tmp_path, valid).train()


def test_cats_from_validation_statistics_and_a_resumed_balancer(tmp_path):
    """source="valid" reads the fixed validation sample; a checkpoint keeps the balancer's state
    and resuming from it restores α."""
    cats = CATS(TASKS, source="valid", warmup_steps=1, lr_alpha=0.5)
    args = arguments(tmp_path, steps=4, save_strategy="steps", save_steps=4)
    run = trainer(tmp_path, cats, args=args, validation_dataset=copy_task_data({"de-en": 3, "sw-en": 3}, seed=2))
    run.train()
    assert cats.alpha[1] != 1.0
    resumed = CATS(TASKS, source="valid", warmup_steps=1, lr_alpha=0.5)
    again = trainer(tmp_path, resumed, args=arguments(tmp_path, steps=4),
                    validation_dataset=copy_task_data({"de-en": 3, "sw-en": 3}, seed=2))
    again.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-4"))
    torch.testing.assert_close(resumed.alpha, cats.alpha)


def test_docstring_examples_run():
    assert doctest.testmod(hf).failed == 0


def test_the_readme_snippet_runs_and_logs_alpha(tmp_path, monkeypatch):
    import contextlib
    import io
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- snippet: hf-trainer.*?-->\s*```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(block, "README.md", "exec"), namespace)
    logs = [log for log in namespace["trainer"].state.log_history if "loss" in log]
    assert len(logs) == 4 and logs[-1]["alpha/sw-en"] != 1.0 and "lambda" in logs[-1]
