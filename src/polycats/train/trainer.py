"""The training loop: sampler → batches → model → balancer → optimiser, with per-task loss
accounting, validation, checkpoints (last + best + snapshots), exact resume, metrics.jsonl and
TensorBoard. The loop never special-cases a method: it asks the balancer whether it needs
per-task gradients and otherwise only for loss weights."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from polycats.balance.task_gradients import TaskLoss, backward_per_task, per_task_gradients
from polycats.config import Config
from polycats.data.batching import Batch, BatchStream, fixed_batches, sampling_probabilities
from polycats.data.prepare import PAD, PreparedData, prepare
from polycats.diagnostics.curvature import hessian_operator
from polycats.errors import PolycatsError
from polycats.io import atomic_write_text
from polycats.model.transformer import Transformer, token_losses
from polycats.train.checkpoint import load_checkpoint, save_checkpoint
from polycats.train.metrics import MetricsLog
from polycats.train.run_dir import RunDir, build_balancer, build_model, set_threads

MAX_SKIPPED_IN_A_ROW = 20


def inverse_sqrt_schedule(update: int, warmup: int) -> float:
    """Linear warm-up to 1 over ``warmup`` updates, then 1/sqrt decay (Vaswani et al.)."""
    if warmup == 0:
        return 1.0
    update = max(update, 1)
    return min(update / warmup, math.sqrt(warmup / update))


@dataclass
class TaskTotals:
    """Running sums of NLL and tokens per task, for logging averages."""

    num_tasks: int
    nll: Tensor = field(init=False)
    tokens: Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.nll = torch.zeros(self.num_tasks, dtype=torch.float64)
        self.tokens = torch.zeros(self.num_tasks, dtype=torch.float64)

    def add(self, task: int | Tensor, nll: Tensor, tokens: Tensor) -> None:
        if isinstance(task, int):
            self.nll[task] += float(nll)
            self.tokens[task] += float(tokens)
        else:
            self.nll.index_add_(0, task, nll.double())
            self.tokens.index_add_(0, task, tokens.double())

    def summary(self, prefix: str, tasks: list[str], groups: dict[str, str]) -> dict[str, float]:
        values = {}
        for i, task in enumerate(tasks):
            if self.tokens[i] > 0:
                values[f"{prefix}/{task}"] = float(self.nll[i] / self.tokens[i])
        for group in sorted(set(groups.values())):
            members = [i for i, task in enumerate(tasks) if groups[task] == group]
            tokens = self.tokens[members].sum()
            if tokens > 0:
                values[f"{prefix}/{group}"] = float(self.nll[members].sum() / tokens)
        per_task = [values[f"{prefix}/{t}"] for t in tasks if f"{prefix}/{t}" in values]
        if per_task:
            values[prefix] = sum(per_task) / len(per_task)  # unweighted over tasks: every language counts
        return values


class Trainer:
    def __init__(self, config: Config, run_dir: str | Path, data: PreparedData | None = None, progress: bool | None = None):
        self.config = config
        self.run = RunDir(run_dir)
        self.run.check_compatible(config)
        self.run.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.run.config_path, config.to_yaml())
        set_threads(config.train.threads)
        self.data = data or prepare(config.data)
        self.tasks = self.data.tasks
        self.groups = self.data.meta["groups"]
        torch.manual_seed(config.train.seed)
        self.model: Transformer = build_model(config, self.data.vocab_size)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        t = config.train
        self.optimizer = torch.optim.Adam(self.params, lr=t.lr, betas=t.adam_betas, weight_decay=t.weight_decay)
        train = self.data.split("train")
        sizes = {task: len(train[task]) for task in self.tasks}
        self.probabilities = sampling_probabilities(sizes, config.sampling.temperature, self.sampling_weights())
        self.balancer = build_balancer(config, self.tasks, self.probabilities)
        set_parameters = getattr(self.balancer, "set_parameters", None)  # layout of the flat gradient (gradvac)
        if set_parameters is not None:
            set_parameters([(name, p) for name, p in self.model.named_parameters() if p.requires_grad])
        self.stream = BatchStream(train, self.probabilities, t.max_tokens, t.seed)
        self.valid_batches = fixed_batches(self.data.split("valid"), t.max_tokens)
        self.update = 0
        self.best_valid = math.inf
        self.bad_validations = 0
        self.skipped_in_a_row = 0
        self.skipped_total = 0
        self.show_progress = sys.stdout.isatty() if progress is None else progress
        self.totals = TaskTotals(len(self.tasks))

    def sampling_weights(self) -> dict[str, float] | None:
        weights = self.config.sampling.weights
        if not weights:
            return None
        languages = dict(zip(self.tasks, self.config.data.languages))
        missing = [lang for lang in languages.values() if lang not in weights]
        if missing:
            raise PolycatsError(f"sampling.weights has no weight for {', '.join(missing)}; give every language a weight")
        if sum(weights[lang] for lang in languages.values()) <= 0:
            raise PolycatsError("sampling.weights must give a positive weight to at least one language")
        return {task: weights[lang] for task, lang in languages.items()}

    # ------------------------------------------------------------------ checkpoints
    def state(self, metrics_offset: int) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "balancer": self.balancer.state_dict(),
            "sampler": self.stream.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "update": self.update,
            "best_valid": self.best_valid,
            "bad_validations": self.bad_validations,
            "skipped_total": self.skipped_total,
            "metrics_offset": metrics_offset,
            "tasks": self.tasks,
        }

    def restore(self, state: dict) -> None:
        if state.get("tasks") != self.tasks:
            raise PolycatsError(f"checkpoint in {self.run.checkpoints} was trained on tasks {state.get('tasks')}, not {self.tasks}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.balancer.load_state_dict(state["balancer"])
        self.stream.load_state_dict(state["sampler"])
        torch.set_rng_state(state["torch_rng"])
        self.update = int(state["update"])
        self.best_valid = float(state["best_valid"])
        self.bad_validations = int(state["bad_validations"])
        self.skipped_total = int(state["skipped_total"])

    def save(self, metrics: MetricsLog) -> None:
        state = self.state(metrics.offset())
        save_checkpoint(state, self.run.checkpoints / "last.pt")
        if self.config.train.keep_snapshots:
            snapshot = {"model": state["model"], "balancer": state["balancer"], "update": self.update}
            save_checkpoint(snapshot, self.run.checkpoints / f"update_{self.update:06d}.pt")

    # ------------------------------------------------------------------ steps
    def batch_loss(self, batch: Batch) -> Tensor:
        """The usual training loss of a batch (sum of token losses / tokens)."""
        loss, _ = token_losses(self.model(batch.src, batch.tgt_in), batch.tgt_out, PAD, self.config.train.label_smoothing)
        return loss.sum() / batch.target_tokens

    def prepare_balancer(self, batch: Batch) -> None:
        """Feed the optional balancer hooks: statistics from fixed validation batches
        (``wants_valid_stats``/``observe``) and a curvature probe along a direction
        (``curvature_probe``: d -> dᵀHd/‖d‖² on this batch, by one Hessian-vector product)."""
        wants_valid = getattr(self.balancer, "wants_valid_stats", None)
        if wants_valid is not None and wants_valid(self.update):
            self.balancer.observe(self.valid_task_stats())
        if hasattr(self.balancer, "curvature_probe"):
            def probe(direction: Tensor) -> float:
                operator = hessian_operator(self.model, lambda: self.batch_loss(batch))
                return float(direction @ operator.matvec(direction) / (direction @ direction).clamp_min(1e-30))
            self.balancer.curvature_probe = probe

    def valid_task_stats(self):
        """Per-task losses and gradients on one fixed validation batch per task (eval mode)."""
        first = {}
        for batch in self.valid_batches:
            first.setdefault(int(batch.task[0]), batch)
        total = sum(b.target_tokens for b in first.values())

        def closure(batch: Batch):
            def run() -> TaskLoss:
                task_sum = self.batch_loss(batch) * batch.target_tokens
                return TaskLoss(task_sum / total, mean=float(task_sum.detach()) / batch.target_tokens, tokens=batch.target_tokens)
            return run

        self.model.eval()
        return per_task_gradients(self.params, [first.get(i) and closure(first[i]) for i in range(len(self.tasks))])

    def train_step(self, batch: Batch) -> dict[str, float]:
        self.prepare_balancer(batch)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        smoothing = self.config.train.label_smoothing
        total_tokens = batch.target_tokens
        if self.balancer.needs_task_gradients:
            def closure(sub: Batch, index: int):
                def run() -> TaskLoss:
                    loss, nll = token_losses(self.model(sub.src, sub.tgt_in), sub.tgt_out, PAD, smoothing)
                    tokens = sub.target_tokens
                    self.totals.add(index, nll.sum().detach(), torch.tensor(tokens))
                    task_sum = loss.sum()
                    return TaskLoss(task_sum / total_tokens, mean=float(task_sum.detach()) / tokens, tokens=tokens)
                return run

            subs = batch.by_task(len(self.tasks))
            backward_per_task(self.params, [sub and closure(sub, i) for i, sub in enumerate(subs)], self.balancer)
        else:
            loss, nll = token_losses(self.model(batch.src, batch.tgt_in), batch.tgt_out, PAD, smoothing)
            row_tokens = (batch.tgt_out != PAD).sum(dim=1)
            self.totals.add(batch.task, nll.sum(dim=1).detach(), row_tokens)
            task_sums = torch.zeros(len(self.tasks)).index_add(0, batch.task, loss.sum(dim=1))
            ((self.balancer.loss_weights().to(task_sums) * task_sums).sum() / total_tokens).backward()
            observe_losses = getattr(self.balancer, "observe_losses", None)  # loss-driven weights (dro)
            if observe_losses is not None:
                task_tokens = torch.zeros(len(self.tasks)).index_add(0, batch.task, row_tokens.to(torch.float32))
                observe_losses(task_sums.detach() / task_tokens.clamp_min(1), task_tokens)
        clip = self.config.train.clip_norm
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip if clip > 0 else math.inf)
        if not torch.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            return {"skipped": 1.0}
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.train.lr * inverse_sqrt_schedule(self.update + 1, self.config.train.warmup_updates)
        self.optimizer.step()
        return {"grad_norm": float(grad_norm)}

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        self.model.eval()
        totals = TaskTotals(len(self.tasks))
        for batch in self.valid_batches:
            _, nll = token_losses(self.model(batch.src, batch.tgt_in), batch.tgt_out, PAD)
            totals.add(batch.task, nll.sum(dim=1), (batch.tgt_out != PAD).sum(dim=1))
        return totals.summary("valid_nll", self.tasks, self.groups)

    def diagnostics(self) -> dict[str, float]:
        """HiRes/LoRes gradient cosine and top Hessian eigenvalues (groups, combined loss) on fixed
        training batches; the random state is untouched, so logging them does not change training."""
        from polycats.diagnostics.analyze import combined_weights, training_diagnostics

        weights = combined_weights(self.tasks, self.probabilities.tolist(), self.balancer.loss_weights().tolist())
        return training_diagnostics(self.model, self.data, weights)

    # ------------------------------------------------------------------ the loop
    def resume_state(self) -> dict | None:
        last = self.run.checkpoints / "last.pt"
        return load_checkpoint(last) if last.exists() else None

    def fit(self) -> dict[str, float]:
        t = self.config.train
        state = self.resume_state()
        if state is not None:
            self.restore(state)
        metrics = MetricsLog(self.run.path, None if state is None else int(state["metrics_offset"]), self.update)
        if state is None:
            sizes = self.data.meta["sizes"]
            metrics.log("start", 0, {
                **{f"sampling_p/{task}": float(p) for task, p in zip(self.tasks, self.probabilities)},
                **{f"train_pairs/{task}": sizes[task]["train"] for task in self.tasks},
                "parameters": sum(p.numel() for p in self.params),
            })
        last_valid: dict[str, float] = {}
        window_tokens, window_start = 0, time.perf_counter()
        stopped_early = False
        with self.progress_bar() as progress:
            task_id = progress.add_task("train", total=t.max_updates, completed=self.update, status="")
            while self.update < t.max_updates:
                batch = self.stream.next()
                step = self.train_step(batch)
                if "skipped" in step:
                    self.skipped_in_a_row += 1
                    self.skipped_total += 1
                    tasks = sorted({self.tasks[i] for i in batch.task.tolist()})
                    metrics.log("skipped_update", self.update, {"skipped_total": self.skipped_total, "tasks": ",".join(tasks)})
                    if self.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
                        metrics.close()
                        raise PolycatsError(
                            f"{MAX_SKIPPED_IN_A_ROW} updates in a row had a non-finite loss or gradient; the last good "
                            f"state is {self.run.checkpoints / 'last.pt'}; lower train.lr or check the data"
                        )
                    continue
                self.skipped_in_a_row = 0
                self.update += 1
                window_tokens += batch.target_tokens
                if self.update % t.log_every == 0 or self.update == t.max_updates:
                    elapsed = time.perf_counter() - window_start
                    values = {
                        **self.totals.summary("train_nll", self.tasks, self.groups),
                        "lr": self.optimizer.param_groups[0]["lr"],
                        "grad_norm": step["grad_norm"],
                        "tokens_per_s": window_tokens / max(elapsed, 1e-9),
                        **self.balancer.log_values(),
                    }
                    metrics.log("train", self.update, values)
                    self.totals.reset()
                    window_tokens, window_start = 0, time.perf_counter()
                    progress.update(task_id, status=f"nll {values.get('train_nll', float('nan')):.2f} · {values['tokens_per_s']:,.0f} tok/s")
                progress.update(task_id, completed=self.update)
                if t.diagnostics_every and (self.update % t.diagnostics_every == 0 or self.update == 1):
                    metrics.log("diagnostics", self.update, self.diagnostics())
                if self.update % t.valid_every == 0 or self.update == t.max_updates:
                    last_valid = self.validate()
                    improved = last_valid["valid_nll"] < self.best_valid
                    if improved:
                        self.best_valid, self.bad_validations = last_valid["valid_nll"], 0
                        save_checkpoint({"model": self.model.state_dict(), "update": self.update}, self.run.checkpoints / "best.pt")
                    else:
                        self.bad_validations += 1
                    metrics.log("valid", self.update, {**last_valid, "best_valid_nll": self.best_valid})
                    if not self.show_progress:
                        print(f"update {self.update}/{t.max_updates}  valid_nll {last_valid['valid_nll']:.3f}  "
                              f"best {self.best_valid:.3f}", flush=True)
                    stopped_early = t.patience > 0 and self.bad_validations >= t.patience
                if self.update % t.save_every == 0 or self.update == t.max_updates or stopped_early:
                    self.save(metrics)
                if stopped_early:
                    metrics.log("early_stop", self.update, {"bad_validations": self.bad_validations})
                    break
        metrics.close()
        return last_valid

    def progress_bar(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        return Progress(
            TextColumn(f"[bold]{self.config.name}[/] {self.run.path.name}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(),
            disable=not self.show_progress, transient=False,
        )


def train(config: Config, run_dir: str | Path, progress: bool | None = None) -> dict[str, float]:
    return Trainer(config, run_dir, progress=progress).fit()
