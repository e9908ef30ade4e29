"""Hugging Face Transformers: train any encoder-decoder with temperature sampling and any polycats
balancer, CATS included (``pip install 'polycats[hf]'``; details and limits: ``docs/hf.md``).

:class:`BalancedSeq2SeqTrainer` is a ``Seq2SeqTrainer`` that reads each row's task from a column
of the training set, draws rows with :class:`TemperatureSampler` and follows the balancer's
:class:`~polycats.balance.base.StepPlan` on every step: one backward pass of ``Σ_i w_i S_i / N``,
or one backward pass per task and the balancer's direction in ``.grad``. ``S_i`` is task ``i``'s
token-loss sum with the Trainer's label smoothing, ``N`` the batch's target tokens. The balancer's
``log_values`` (α, λ) and the per-task training loss join the Trainer's own logs.
:func:`translation_metrics` gives ``compute_metrics`` per-language sacreBLEU BLEU and chrF.

>>> sampler = TemperatureSampler([0, 1, 0, 1, 1], SamplingSchedule(np.array([1.0, 0.0])), batch_size=2, seed=1)
>>> len(sampler), sorted(set(sampler))  # five draws, all of task 0 (rows 0 and 2)
(5, [0, 2])
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from datasets import ClassLabel, Dataset, Value
from torch import Tensor
from torch.nn import functional as F
from transformers import EvalPrediction, Seq2SeqTrainer

from polycats.balance.base import Balancer, BalancerContext
from polycats.data.sampling import SamplingSchedule, sampling_probabilities
from polycats.errors import PolycatsError
from polycats.evaluate.scoring import group_averages, score_directions
from polycats.ops.hessian import hessian_operator
from polycats.ops.task_gradients import TaskLoss, TaskStats, accumulate_into_grad, per_task_gradients

IGNORE = -100  # HF's label padding: positions that carry no loss
BALANCER_FILE = "polycats_balancer.pt"


class TemperatureSampler(torch.utils.data.Sampler[int]):
    """Row indices in the order temperature sampling draws them: each position's task from the
    schedule's probabilities at its update (``position // batch_size``, counted over epochs, so a
    two-stage schedule switches on time), the row from that task's seeded permutation, a new one
    each time the task's rows run out. ``len(row_tasks)`` positions per epoch; a function of
    ``(seed, epoch)``."""

    def __init__(self, row_tasks: Sequence[int], schedule: SamplingSchedule, batch_size: int, seed: int):
        self.row_tasks = np.asarray(row_tasks, dtype=np.int64)
        self.schedule = schedule
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.rows = [np.flatnonzero(self.row_tasks == task) for task in range(len(schedule.probabilities))]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.row_tasks)

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        batches = math.ceil(len(self) / self.batch_size)
        reads = [0] * len(self.rows)
        permutations: dict[tuple[int, int], np.ndarray] = {}
        for batch in range(batches):
            size = min(self.batch_size, len(self) - batch * self.batch_size)
            probabilities = self.schedule.at(self.epoch * batches + batch)
            for task in rng.choice(len(self.rows), size=size, p=probabilities).tolist():
                cycle, offset = divmod(reads[task], len(self.rows[task]))
                if (task, cycle) not in permutations:
                    permutations[task, cycle] = np.random.default_rng([self.seed, self.epoch, task, cycle]).permutation(
                        self.rows[task])
                reads[task] += 1
                yield int(permutations[task, cycle][offset])


class TokenIdCollator:
    """Pads pre-tokenised rows (``input_ids`` and ``labels`` as id lists, e.g. from
    :func:`dataset_from_prepared`) into a batch: ``attention_mask``, ``labels`` padded with -100,
    ``decoder_input_ids`` = ``decoder_start_id`` + labels shifted right; other integer columns
    (the task) pass through as tensors.

    >>> batch = TokenIdCollator(pad_id=0, decoder_start_id=2)([{"input_ids": [5, 3], "labels": [7, 3], "task": 1},
    ...                                                         {"input_ids": [6], "labels": [3], "task": 0}])
    >>> batch["labels"].tolist(), batch["decoder_input_ids"].tolist(), batch["task"].tolist()
    ([[7, 3], [3, -100]], [[2, 7], [2, 0]], [1, 0])
    """

    def __init__(self, pad_id: int, decoder_start_id: int):
        self.pad_id = pad_id
        self.decoder_start_id = decoder_start_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Tensor]:
        def padded(rows: list[list[int]], value: int) -> Tensor:
            out = torch.full((len(rows), max(len(row) for row in rows)), value, dtype=torch.long)
            for i, row in enumerate(rows):
                out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
            return out

        sources = [f["input_ids"] for f in features]
        labels = [f["labels"] for f in features]
        batch = {
            "input_ids": padded(sources, self.pad_id),
            "attention_mask": padded([[1] * len(s) for s in sources], 0),
            "labels": padded(labels, IGNORE),
            "decoder_input_ids": padded([[self.decoder_start_id, *row[:-1]] for row in labels], self.pad_id),
        }
        for key in features[0].keys() - batch.keys():
            batch[key] = torch.tensor([f[key] for f in features])
        return batch


def dataset_from_prepared(data, split: str, per_task: int | None = None) -> Dataset:
    """A ``datasets.Dataset`` of ``polycats prepare``'s ``split`` (``data`` is a
    :class:`~polycats.data.prepare.PreparedData`): ``input_ids`` (tag + source + eos), ``labels``
    (target + eos) and ``task`` (``sw-en``); the first ``per_task`` pairs of each task if given."""
    columns: dict[str, list] = {"input_ids": [], "labels": [], "task": []}
    for task, arrays in data.split(split).items():
        count = len(arrays) if per_task is None else min(per_task, len(arrays))
        columns["input_ids"] += [row.tolist() for row in arrays.src[:count]]
        columns["labels"] += [row.tolist() for row in arrays.tgt[:count]]
        columns["task"] += [task] * count
    return Dataset.from_dict(columns)


def translation_metrics(
    row_tasks: Sequence[str], decode: Callable[[list[list[int]]], list[str]], groups: dict[str, str] | None = None
) -> Callable[[EvalPrediction], dict[str, float]]:
    """``compute_metrics`` for ``Seq2SeqTrainingArguments(predict_with_generate=True)``: sacreBLEU
    ``bleu/<task>`` and ``chrf/<task>`` (``polycats.evaluate.scoring``: tokenizer by target
    language) of the generated ids against the labels, both through ``decode``; with ``groups``
    (task -> LoRes/MidRes/HiRes) also their unweighted means ``bleu/<group>`` and ``bleu/All``.
    ``row_tasks`` is the task of each evaluation row in order (the eval set's ``task`` column):
    the Trainer evaluates rows in order. Tasks are named ``src-tgt``."""
    row_tasks = list(row_tasks)

    def ids(rows) -> list[list[int]]:
        return [[int(t) for t in row if t >= 0] for row in np.asarray(rows)]  # -100: HF's padding

    def compute(prediction: EvalPrediction) -> dict[str, float]:
        predictions = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        if len(predictions) != len(row_tasks):
            raise PolycatsError(f"translation_metrics: {len(predictions)} evaluated rows but {len(row_tasks)} tasks "
                                "given; pass the eval dataset's task column")
        hypotheses, references = decode(ids(predictions)), decode(ids(prediction.label_ids))
        outputs: dict[str, tuple[list[str], list[str]]] = {}
        for task, hypothesis, reference in zip(row_tasks, hypotheses, references):
            hyps, refs = outputs.setdefault(task, ([], []))
            hyps.append(hypothesis)
            refs.append(reference)
        scores = score_directions(outputs)
        metrics = {f"{name}/{task}": value for task, score in scores.items()
                   for name, value in (("bleu", score.bleu), ("chrf", score.chrf))}
        if groups is not None:
            for group, average in group_averages(scores, groups).items():
                metrics.update({f"{metric}/{group}": average[metric] for metric in ("bleu", "chrf")
                                if average[metric] is not None})
        return metrics

    return compute


class BalancedSeq2SeqTrainer(Seq2SeqTrainer):
    """A ``Seq2SeqTrainer`` for multilingual training: rows drawn by temperature sampling over the
    tasks of ``train_dataset[task_column]``, task losses combined by ``balancer`` (its ``tasks``
    fix the task order; every task in the data must be one of them).

    ``temperature``: p_i ∝ n_i^(1/T) over the tasks' row counts; ``schedule`` (a
    :class:`SamplingSchedule`, e.g. ``SamplingSchedule.from_config``) replaces it.
    ``validation_dataset``: the fixed validation sample of CATS ``source="valid"``.
    Other arguments are ``Seq2SeqTrainer``'s (keywords). One process, no gradient accumulation,
    no fp16 loss scaling (bf16 is fine): per-task gradients of a micro-batch are not those of the
    step, and a scaled loss would scale them.

    >>> from transformers import MarianConfig, MarianMTModel, Seq2SeqTrainingArguments
    >>> from polycats.balance import CATS
    >>> model = MarianMTModel(MarianConfig(vocab_size=16, d_model=8, encoder_layers=1, decoder_layers=1,
    ...     encoder_attention_heads=1, decoder_attention_heads=1, encoder_ffn_dim=8, decoder_ffn_dim=8,
    ...     pad_token_id=0, eos_token_id=3, decoder_start_token_id=2))
    >>> data = Dataset.from_dict({"input_ids": [[5, 6, 3], [7, 3]] * 4, "labels": [[8, 3], [9, 9, 3]] * 4,
    ...                           "task": ["de-en", "sw-en"] * 4})
    >>> args = Seq2SeqTrainingArguments("/tmp/polycats-doctest", max_steps=2, per_device_train_batch_size=4,
    ...                                 report_to=[], save_strategy="no", logging_steps=1, use_cpu=True)
    >>> trainer = BalancedSeq2SeqTrainer(model=model, args=args, train_dataset=data, balancer=CATS(["de-en", "sw-en"]),
    ...                                  data_collator=TokenIdCollator(pad_id=0, decoder_start_id=2))
    >>> _ = trainer.train()  # doctest: +ELLIPSIS
    {'loss': ...}
    >>> "alpha/sw-en" in trainer.state.log_history[0]
    True
    """

    def __init__(
        self,
        *,
        balancer: Balancer,
        train_dataset: Dataset,
        eval_dataset: Dataset | dict[str, Dataset] | None = None,
        temperature: float = 1.0,
        schedule: SamplingSchedule | None = None,
        task_column: str = "task",
        validation_dataset: Dataset | None = None,
        **kwargs: Any,
    ):
        self.balancer = balancer
        self.task_column = task_column
        train_dataset = self._encode_tasks(train_dataset, "train_dataset")
        if isinstance(eval_dataset, dict):
            eval_dataset = {name: self._encode_tasks(d, f"eval_dataset[{name!r}]", required=False)
                            for name, d in eval_dataset.items()}
        elif eval_dataset is not None:
            eval_dataset = self._encode_tasks(eval_dataset, "eval_dataset", required=False)
        if validation_dataset is not None:
            validation_dataset = self._encode_tasks(validation_dataset, "validation_dataset")
        self.validation_dataset = validation_dataset
        super().__init__(train_dataset=train_dataset, eval_dataset=eval_dataset, **kwargs)
        if self.args.gradient_accumulation_steps != 1:
            raise PolycatsError("BalancedSeq2SeqTrainer: gradient_accumulation_steps must be 1 (per-task gradients "
                                "of a micro-batch are not those of the step)")
        if self.args.world_size != 1:
            raise PolycatsError("BalancedSeq2SeqTrainer runs in one process (world_size 1)")
        if self.args.fp16:
            raise PolycatsError("BalancedSeq2SeqTrainer: fp16 loss scaling would scale the per-task gradients; use bf16")
        counts = np.bincount(np.asarray(train_dataset[task_column]), minlength=len(balancer.tasks))
        self.schedule = schedule or SamplingSchedule(
            sampling_probabilities(dict(zip(balancer.tasks, counts.tolist())), temperature))
        if (self.schedule.probabilities[counts == 0] > 0).any():
            missing = [t for t, c, p in zip(balancer.tasks, counts, self.schedule.probabilities) if c == 0 and p > 0]
            raise PolycatsError(f"train_dataset: no row of task {', '.join(missing)} in column '{task_column}', "
                                "but the sampler would draw it")
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        balancer.bind(BalancerContext([(name, p) for name, p in self.model.named_parameters() if p.requires_grad]))
        self._window = torch.zeros(2, len(balancer.tasks), dtype=torch.float64)  # S_i and n_i since the last log
        self._validation_batches: list[dict[str, Tensor]] | None = None

    # ------------------------------------------------------------------ data
    def _encode_tasks(self, dataset: Dataset, name: str, required: bool = True) -> Dataset:
        """``dataset`` with the task column as indices into ``balancer.tasks`` (checked)."""
        column = self.task_column
        if column not in dataset.column_names:
            if not required:
                return dataset
            raise PolycatsError(f"{name} has no '{column}' column (the task of each row, e.g. 'sw-en'); "
                                f"its columns: {', '.join(dataset.column_names)}")
        feature = dataset.features[column]
        if isinstance(feature, ClassLabel):  # its own integer coding: back to names, then ours
            dataset = dataset.cast_column(column, Value("string"))
        unknown = sorted(map(str, set(dataset.unique(column)) - set(self.balancer.tasks)))
        if unknown:
            raise PolycatsError(f"{name}: column '{column}' has task {', '.join(unknown)}, not one of the balancer's "
                                f"tasks ({', '.join(self.balancer.tasks)})")
        return dataset.cast_column(column, ClassLabel(names=list(self.balancer.tasks)))

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self.task_column not in self._signature_columns:  # keep it: the Trainer drops what forward does not take
            self._signature_columns.append(self.task_column)

    def _get_train_sampler(self, train_dataset: Dataset | None = None) -> torch.utils.data.Sampler:
        dataset = self.train_dataset if train_dataset is None else train_dataset
        return TemperatureSampler(dataset[self.task_column], self.schedule, self.args.per_device_train_batch_size,
                                  self.args.seed)

    # ------------------------------------------------------------------ losses
    def _task_sums(self, model: torch.nn.Module, inputs: dict[str, Tensor], task: Tensor) -> tuple[Tensor, Tensor]:
        """Each task's token-loss sum ``S_i`` (with graph; the Trainer's label smoothing, as its
        ``LabelSmoother`` computes it) and target tokens ``n_i``, both ``[K]``."""
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        if "decoder_input_ids" not in inputs:
            inputs["decoder_input_ids"] = self.accelerator.unwrap_model(model).prepare_decoder_input_ids_from_labels(
                labels=labels)
        logits = model(**inputs).logits.float()
        token_loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="none",
                                     label_smoothing=self.args.label_smoothing_factor).view_as(labels)
        zeros = logits.new_zeros(len(self.balancer.tasks))
        return (zeros.index_add(0, task, token_loss.sum(1)),
                zeros.index_add(0, task, (labels != IGNORE).sum(1).to(zeros.dtype)))

    def _curvature_probe(self, model: torch.nn.Module, loss: Callable[[], Tensor]):
        def probe(direction: Tensor) -> float:
            operator = hessian_operator(self.accelerator.unwrap_model(model), loss)
            return float(direction @ operator.matvec(direction) / (direction @ direction).clamp_min(1e-30))
        return probe

    def _per_task_stats(self, model: torch.nn.Module, batches: list[tuple[dict[str, Tensor], Tensor]],
                        total: float, curvature: bool) -> TaskStats:
        """Per-task losses and gradients of ``batches`` (inputs, task indices), one backward pass
        per task and batch row subset: task ``i`` contributes ``S_i / total``."""
        def rows(inputs: dict[str, Tensor], task: Tensor, index: int) -> dict[str, Tensor]:
            keep = task == index
            return {key: value[keep] for key, value in inputs.items()}

        def closure(index: int):
            def run() -> TaskLoss:
                task_sum = sum(self._task_sums(model, rows(inputs, task, index), task[task == index])[0][index]
                               for inputs, task in batches if (task == index).any())
                tokens = int(sum(int((inputs["labels"][task == index] != IGNORE).sum()) for inputs, task in batches))
                return TaskLoss(task_sum / total, mean=float(task_sum.detach()) / tokens, tokens=tokens)
            return run

        present = torch.zeros(len(self.balancer.tasks), dtype=torch.bool)
        for _, task in batches:
            present[task.unique().cpu()] = True
        stats = per_task_gradients(self.params, [closure(i) if present[i] else None for i in range(len(present))])
        if curvature:
            stats.curvature = self._curvature_probe(
                model, lambda: sum(self._task_sums(model, inputs, task)[0].sum() for inputs, task in batches) / total)
        return stats

    def _validation_stats(self, model: torch.nn.Module, curvature: bool) -> TaskStats:
        """CATS ``source="valid"``: per-task statistics of ``validation_dataset`` (eval mode),
        ``N`` its target tokens."""
        if self.validation_dataset is None:
            raise PolycatsError("the balancer plans validation statistics (CATS source='valid'): give "
                                "BalancedSeq2SeqTrainer a validation_dataset")
        if self._validation_batches is None:
            dataset = self._remove_unused_columns(self.validation_dataset, "validation")
            self._validation_batches = [self._prepare_inputs(self.data_collator(list(dataset)))]
        batches = [(dict(b), b[self.task_column]) for b in self._validation_batches]
        for inputs, _ in batches:
            inputs.pop(self.task_column)
        total = float(sum(int((inputs["labels"] != IGNORE).sum()) for inputs, _ in batches))
        model.eval()
        try:
            return self._per_task_stats(model, batches, total, curvature)
        finally:
            model.train()

    # ------------------------------------------------------------------ the step
    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> Tensor:
        """One step as the balancer plans it; returns the usual (unweighted) loss ``Σ_i S_i / N``
        for the Trainer's ``loss`` log."""
        inputs = self._prepare_inputs(dict(inputs))
        task = inputs.pop(self.task_column)
        plan = self.balancer.plan(self.state.global_step)
        if plan.validation:
            self.balancer.observe_validation(self._validation_stats(model, plan.curvature))
        model.train()
        if plan.task_gradients:
            total = float((inputs["labels"] != IGNORE).sum())
            stats = self._per_task_stats(model, [(inputs, task)], total, plan.curvature)
            accumulate_into_grad(self.params, self.balancer.combine(stats))
            sums, tokens = stats.losses * stats.tokens, stats.tokens
        else:
            sums, tokens = self._task_sums(model, inputs, task)
            total = tokens.sum()
            self.accelerator.backward((self.balancer.loss_weights().to(sums) * sums).sum() / total)
            sums, tokens = sums.detach(), tokens.detach()
            # The Trainer steps after every training_step (one process, no accumulation, no loss scaler).
            self.balancer.observe_losses(sums / tokens.clamp_min(1), tokens)
        self._window += torch.stack([sums, tokens]).to(self._window)
        return (sums.sum() / tokens.sum()).to(self.args.device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Evaluation's loss: the Trainer's own, without the task column."""
        inputs = {key: value for key, value in inputs.items() if key != self.task_column}
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None, **kwargs):
        inputs = {key: value for key, value in inputs.items() if key != self.task_column}
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys, **kwargs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Training logs (those with ``loss``) also get the balancer's values and each task's mean
        training loss over the logging window."""
        if "loss" in logs:
            sums, tokens = self._window
            logs.update({f"train_loss/{task}": float(s / n) for task, s, n in zip(self.balancer.tasks, sums, tokens) if n > 0})
            logs.update(self.balancer.log_values())
            self._window.zero_()
        super().log(logs, start_time)

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
        if self.args.should_save and os.path.isdir(folder):
            torch.save(self.balancer.state_dict(), os.path.join(folder, BALANCER_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, BALANCER_FILE)
        if not os.path.exists(path):
            raise PolycatsError(f"{resume_from_checkpoint} has no {BALANCER_FILE}: it was not saved by a "
                                "BalancedSeq2SeqTrainer, so the balancer's state cannot be resumed")
        self.balancer.load_state_dict(torch.load(path, weights_only=True))
