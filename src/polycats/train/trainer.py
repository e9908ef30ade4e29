"""The training loop: sampler → batches → model → balancer → optimiser, with per-task loss
accounting, validation, checkpoints (last + best + snapshots), metrics.jsonl and TensorBoard. The
loop never special-cases a method: each step it follows the balancer's
:class:`~polycats.balance.base.StepPlan` (``polycats.balance.base`` has the contract).

Reliability (docs/reliability.md): one trainer per run directory (a lock); ``last.pt`` holds the
whole state (model, Adam, balancer, sampler, every RNG, counters, the logging window, the
metrics.jsonl offset), so a run killed at any point resumes bit-identically; a corrupt ``last.pt``
falls back to ``last.prev.pt``, and a run directory with neither usable is refused, never started
over unless asked (``restart``); nothing is made in it until training can start; SIGINT/SIGTERM
finish the update, save and stop; a non-finite loss or gradient skips the update, and too many in
a row save the last good state and stop.
"""

from __future__ import annotations

import json
import math
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
# Imported here, not lazily: rich draws from Python's global RNG on import, which must happen
# before the trainer seeds it (or the saved RNG state would depend on import order).
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import Tensor

from polycats.balance.base import BalancerContext
from polycats.config import Config
from polycats.data.batching import Batch, BatchStream, fixed_batches, sample_batch
from polycats.data.prepare import PAD, PreparedData, copy_for_evaluation, prepare
from polycats.data.sampling import SamplingSchedule
from polycats.diagnostics.model_summary import combined_weights, training_diagnostics
from polycats.errors import CannotResume, Interrupted, PolycatsError
from polycats.io import atomic_write_text, remove_stale_temp_files
from polycats.model.transformer import Transformer
from polycats.ops.hessian import hessian_operator
from polycats.ops.task_gradients import (
    CurvatureProbe, TaskLoss, TaskStats, accumulate_into_grad, gradient_dtype, per_task_gradients,
)
from polycats.ops.task_split import TaskSplit
from polycats.run.build import build_balancer, build_model, resolve_device, set_threads
from polycats.run.checkpoint import (
    NoUsableCheckpoint, load_checkpoint, load_latest, previous_path, save_checkpoint, save_rotating,
)
from polycats.run.directory import OUTPUTS, RunDir, RunLock, config_differences, summarise, with_current_defaults
from polycats.train.distributed import World
from polycats.train.metrics import DiscardedMetrics, MetricsLog
from polycats.train.state import TrainState, rng_state, set_rng_state, set_torch_rng_state, torch_rng_state
from polycats.version import __version__

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

    def merge(self, other: TaskTotals) -> None:
        self.nll += other.nll
        self.tokens += other.tokens

    def state_dict(self) -> dict[str, Tensor]:
        return {"nll": self.nll.clone(), "tokens": self.tokens.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.nll, self.tokens = state["nll"].double().clone(), state["tokens"].double().clone()

    def add(self, task: int | Tensor, nll: Tensor, tokens: Tensor) -> None:
        if isinstance(task, int):
            self.nll[task] += float(nll)
            self.tokens[task] += float(tokens)
        else:  # the totals stay on the CPU, whatever device the batch is on
            self.nll.index_add_(0, task.cpu(), nll.double().cpu())
            self.tokens.index_add_(0, task.cpu(), tokens.double().cpu())

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


@dataclass
class StepSums:
    """An update's per-task training-loss sums ``S_i`` and target tokens ``n_i`` ``[K]`` over its
    micro-batches, and whether every micro-batch's loss was finite."""

    sums: Tensor | None = None
    tokens: Tensor | None = None
    finite: bool = True

    def add(self, sums: Tensor, tokens: Tensor, finite: bool) -> None:
        self.sums = sums if self.sums is None else self.sums + sums
        self.tokens = tokens if self.tokens is None else self.tokens + tokens
        self.finite = self.finite and finite

    def add_task(self, index: int, task_sum: Tensor, tokens: int, num_tasks: int) -> None:
        if self.sums is None:
            self.sums, self.tokens = task_sum.new_zeros(num_tasks), task_sum.new_zeros(num_tasks)
        self.sums[index] += task_sum
        self.tokens[index] += tokens

    def means(self) -> tuple[Tensor, Tensor]:
        """``(L_i, n_i)``: mean token loss per task (0 where absent) and tokens."""
        return self.sums / self.tokens.clamp_min(1), self.tokens


class Trainer:
    """Trains ``config`` into ``run_dir``, resuming from its last checkpoint.

    Holds the run directory's lock from construction until :meth:`fit` returns (or :meth:`close`):
    a second trainer on the same directory gets a clear error.
    """

    def __init__(self, config: Config, run_dir: str | Path, data: PreparedData | None = None, progress: bool | None = None,
                 restart: bool = False):
        """``restart``: start over in a run directory that holds a run, removing its metrics,
        checkpoints, TensorBoard events, evaluations and analyses (else it is resumed)."""
        self.config = config
        self.device = resolve_device(config.train.device)  # before anything is written: cuda may be missing
        self.world = World.from_environment(self.device.type)
        if self.device.type == "cuda" and self.world.size > 1:
            self.device = torch.device("cuda", self.world.local_rank)
        self.run = RunDir(run_dir)
        self.run.check_compatible(config)  # before preparing data; again under the lock
        # Everything training needs is built before the run directory is touched: a config whose
        # data cannot be prepared leaves nothing behind (a config.yaml left there would refuse the
        # corrected config as "a different config"). Rank 0 prepares first: the others then read
        # its cache instead of racing to write it.
        self.world.main_first(lambda: self.setup(data, progress))
        # Rank 0 owns the run directory (lock, config.yaml, what to resume from); the other ranks
        # load the checkpoint it chose.
        self.lock = RunLock(self.run.lock_path)
        resume_path = self.world.main_first(partial(self.claim, restart), on_others=lambda path: path)
        if not self.world.is_main and resume_path is not None:
            self.resume_from = (load_checkpoint(resume_path), resume_path)
        elif not self.world.is_main:
            self.resume_from = None

    def claim(self, restart: bool) -> Path | None:
        """Lock the run directory and make it this run's: clean up, check, clear it (``restart``)
        or find the checkpoint to resume from (returns its path), and only then write config.yaml
        (a refused run changes nothing and releases the lock)."""
        self.run.path.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()
        try:
            return self.claim_locked(restart)
        except BaseException:
            self.lock.release()
            raise

    def claim_locked(self, restart: bool) -> Path | None:
        # Left by writes a kill interrupted; we hold the lock. (The run directory may be shared
        # with the user's files: only our own names there.)
        remove_stale_temp_files(self.run.checkpoints)
        remove_stale_temp_files(self.run.path, self.run.config_path.name)
        self.run.check_compatible(self.config)
        if restart and (removed := self.run.clear_outputs()):
            print(f"restarting: removed {', '.join(removed)} of the earlier run in {self.run.path}", flush=True)
        self.resume_from = self.resume_state()  # restored by fit
        atomic_write_text(self.run.config_path, self.config.to_yaml())
        copy_for_evaluation(self.data, self.run.data_copy)  # evaluate/translate outlive the corpus
        return None if self.resume_from is None else self.resume_from[1]

    def setup(self, data: PreparedData | None, progress: bool | None) -> None:
        config = self.config
        set_threads(config.train.threads)
        self.data = data or prepare(config.data)
        self.tasks = self.data.tasks
        self.groups = self.data.meta["groups"]
        # Every global RNG from the seed: a run is a function of its config, whatever ran before it.
        torch.manual_seed(config.train.seed)
        random.seed(config.train.seed)
        np.random.seed(config.train.seed)
        # Initialised on the CPU (the same weights on every device), then moved.
        self.model: Transformer = build_model(config, self.data.vocab_size).to(self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # Per-task gradients in one pass over the batch when the model allows (it does: ours).
        self.task_split = TaskSplit(self.model, self.params) if TaskSplit.supports(self.model, self.params) else None
        self.row_buffers: list[Tensor] = []  # [K, P] each, filled by task_split on per-task steps
        t = config.train
        self.optimizer = torch.optim.Adam(self.params, lr=t.lr, betas=t.adam_betas, weight_decay=t.weight_decay)
        # fp16's small range needs the loss scaled (bf16 has fp32's range and does not).
        self.scaler = torch.amp.GradScaler(self.device.type) if t.precision == "fp16" else None
        if self.world.size > 1:  # each rank's own dropout masks; init above was the same everywhere
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                torch.manual_seed(t.seed * 1_000_003 + self.world.rank)
                self.rank_rng = torch_rng_state(self.device)
        self.agreed_stop = False  # under torchrun: some rank was asked to stop (SIGINT/SIGTERM)
        train = self.data.split("train")
        self.sampling = SamplingSchedule.from_config(config.sampling, self.data.task_table)
        self.balancer = build_balancer(config, self.tasks, self.sampling.probabilities)
        self.balancer.bind(BalancerContext([(name, p) for name, p in self.model.named_parameters() if p.requires_grad]))
        self.stream = BatchStream(train, self.sampling.at(0), t.max_tokens, t.seed)
        self.valid_batches = [batch.to(self.device) for batch in fixed_batches(self.data.split("valid"), t.max_tokens)]
        self.valid_sample: list[Batch] | None = None  # CATS source=valid: built on first use
        self.state = TrainState()
        self.saved_at = -1  # batches drawn (updates + skipped) when last.pt was last written or read
        self.stop_signal: int | None = None
        self.show_progress = (sys.stdout.isatty() if progress is None else progress) and self.world.is_main
        self.totals = TaskTotals(len(self.tasks))

    def close(self) -> None:
        """Release the run directory (fit does this when it returns)."""
        self.lock.release()

    # ------------------------------------------------------------------ checkpoints
    @property
    def last_path(self) -> Path:
        return self.run.checkpoints / "last.pt"

    def checkpoint(self, metrics_offset: int) -> dict:
        """Everything ``last.pt`` holds."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "balancer": self.balancer.state_dict(),
            **({"scaler": self.scaler.state_dict()} if self.scaler is not None else {}),
            "sampler": self.stream.state_dict(),
            "rng": rng_state(self.device),
            **({"world_size": self.world.size} if self.world.size > 1 else {}),
            **self.state.state_dict(),
            "totals": self.totals.state_dict(),  # the logging window: train_nll since the last log
            "metrics_offset": metrics_offset,
            "tasks": self.tasks,
            "config": json.dumps(self.config.model_dump(mode="json"), sort_keys=True),
            "polycats_version": __version__,
        }

    def restore(self, state: dict, path: Path) -> None:
        """Load a ``last.pt`` (format 1 checkpoints, without the newer fields, load too)."""
        if state.get("tasks") != self.tasks:
            raise PolycatsError(f"checkpoint {path} was trained on tasks {state.get('tasks')}, not {self.tasks}")
        if int(state.get("world_size", 1)) != self.world.size:
            raise PolycatsError(
                f"checkpoint {path} was trained by {state.get('world_size', 1)} process(es), this run has {self.world.size}: "
                "an update's batch is update_freq × processes micro-batches, so resume with the same torchrun --nproc-per-node"
            )
        if "config" in state:
            differences = config_differences(with_current_defaults(json.loads(state["config"])), self.config.model_dump(mode="json"))
            if differences:
                raise PolycatsError(
                    f"checkpoint {path} was written by a run of a different config ({summarise(differences)}); "
                    "was it copied from another run? Use that run's config or a new --out directory"
                )
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.balancer.load_state_dict(state["balancer"])
            self.stream.load_state_dict(state["sampler"])
            if self.scaler is not None:
                self.scaler.load_state_dict(state["scaler"])
            if "rng" in state:
                set_rng_state(state["rng"], self.device)
            else:
                torch.set_rng_state(state["torch_rng"])
            if "rank_rng" in state:
                self.rank_rng = state["rank_rng"][self.world.rank]
            if "totals" in state:
                self.totals.load_state_dict(state["totals"])
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as error:
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise PolycatsError(
                f"checkpoint {path} does not fit this run ({first_line[:160]}); was it copied from another run?"
            ) from None
        self.state = TrainState.from_state_dict(state)
        self.saved_at = self.state.batches_drawn

    def save(self, metrics: MetricsLog, snapshot: bool = True) -> None:
        """Write the update's snapshot (if kept), then last.pt (the previous one becomes
        last.prev.pt). In that order: a kill between the two must not leave a last.pt whose
        snapshot is missing, as a resume would never write it."""
        rank_rngs = self.world.gather(self.rank_rng) if self.world.size > 1 else None  # every rank saves together
        if not self.world.is_main:
            self.saved_at = self.state.batches_drawn
            return
        state = self.checkpoint(metrics.offset())
        if rank_rngs is not None:
            state["rank_rng"] = rank_rngs
        if snapshot and self.config.train.keep_snapshots:
            snapshot_state = {"model": state["model"], "balancer": state["balancer"], "update": self.state.update}
            save_checkpoint(snapshot_state, self.run.snapshot_path(self.state.update))
        save_rotating(state, self.last_path)
        self.saved_at = self.state.batches_drawn

    def resume_state(self) -> tuple[dict, Path] | None:
        """The newest usable full checkpoint and its path (None: a fresh start). A run directory
        that holds a run but no usable full checkpoint is refused: starting over would overwrite
        its history."""
        metrics = self.run.path / "metrics.jsonl"
        size = metrics.stat().st_size if metrics.exists() else 0

        def check(state: dict) -> str | None:
            offset = int(state.get("metrics_offset", 0))
            return None if offset <= size else f"expects {offset} bytes of {metrics}, which has {size}"

        try:
            found = load_latest(self.last_path, check)
        except NoUsableCheckpoint as error:
            raise self.cannot_resume("; ".join(error.problems)) from None
        if found is None and self.run.history():
            raise self.cannot_resume(f"neither {self.last_path.name} nor {previous_path(self.last_path).name} exists")
        return found

    def cannot_resume(self, why: str) -> CannotResume:
        # Snapshots hold the model and balancer only: a run continued from one would differ from
        # the run it continues (fresh Adam moments, sampler and random state), so none is offered.
        snapshots = self.run.snapshots()
        newest = f"the newest snapshot, {snapshots[-1][1].name}, holds" if snapshots else "snapshots hold"
        return CannotResume(
            f"{self.run.path} holds a run ({'; '.join(self.run.history())}) but no usable checkpoint to resume from "
            f"({why}); {newest} only the model and balancer, not the optimizer and random state, so the run "
            f"cannot continue exactly: rerun with --restart to start over (removes {', '.join(OUTPUTS)}) "
            "or train into a new --out directory"
        )

    # ------------------------------------------------------------------ steps
    def batch_loss(self, batch: Batch, total_tokens: int | None = None) -> Tensor:
        """A batch's training loss, its token-loss sum over its own tokens or, as a share of an
        update, over the update's ``total_tokens`` (all its micro-batches, on every process)."""
        loss, _ = self.model.losses(batch.src, batch.tgt_in, batch.tgt_out, self.config.train.label_smoothing)
        return loss.sum() / (batch.target_tokens if total_tokens is None else total_tokens)

    def curvature_probe(self, losses: list[Callable[[], Tensor]], across_ranks: bool) -> CurvatureProbe:
        """``d -> dᵀHd/‖d‖²`` of the sum of ``losses`` (one Hessian-vector product each, evaluated
        when probed, in fp32); ``across_ranks``: the losses are this rank's share of the sum."""
        def probe(direction: Tensor) -> float:
            quadratic = None
            for loss in losses:
                term = direction @ hessian_operator(self.model, loss).matvec(direction)
                quadratic = term if quadratic is None else quadratic + term
            if across_ranks:
                self.world.all_reduce(quadratic)
            return float(quadratic / (direction @ direction).clamp_min(1e-30))
        return probe

    def validation_sample(self) -> list[Batch]:
        """CATS ``source=valid``: ``balancer.valid_sentences`` validation pairs per task, drawn
        once with the run's seed (one batch per task)."""
        if self.valid_sample is None:
            count = self.config.balancer.valid_sentences
            self.valid_sample = [
                sample_batch(arrays, index, count, f"{self.config.train.seed}/{task}/cats-valid").to(self.device)
                for index, (task, arrays) in enumerate(self.data.split("valid").items())
            ]
        return self.valid_sample

    def validation_stats(self, curvature: bool) -> TaskStats:
        """Per-task losses and gradients on the validation sample (eval mode): ``S_i / N`` with
        ``N`` the sample's target tokens, as on a training batch; with ``curvature``, the probe
        on the same sample. Under torchrun each rank does every ``size``-th task and the rows
        are summed."""
        sample = self.validation_sample()
        total = sum(b.target_tokens for b in sample)
        mine = [index % self.world.size == self.world.rank for index in range(len(sample))]

        def closure(batch: Batch):
            def run() -> TaskLoss:
                task_sum = self.batch_loss(batch) * batch.target_tokens
                return TaskLoss(task_sum / total, mean=float(task_sum.detach()) / batch.target_tokens, tokens=batch.target_tokens)
            return run

        self.model.eval()
        stats = per_task_gradients(self.params, [closure(batch) if own else None for batch, own in zip(sample, mine)])
        if self.world.size > 1:
            for tensor in (stats.grads, stats.losses, stats.tokens):
                tensor.copy_(self.reduced(tensor))
        if curvature:
            own = [batch for batch, keep in zip(sample, mine) if keep]
            stats.curvature = self.curvature_probe(
                [lambda: sum(self.batch_loss(b) * b.target_tokens for b in own) / total] if own else [], across_ranks=True)
        return stats

    def reduced(self, tensor: Tensor) -> Tensor:
        """``tensor`` summed over the ranks (through the training device: nccl reduces CUDA tensors only)."""
        if self.world.size == 1:
            return tensor
        return self.world.all_reduce(tensor.to(self.device)).to(tensor.device)

    def forward_context(self):
        """Autocast of the forward passes (``train.precision``) and, under torchrun, this rank's
        own dropout random state (the shared one stays for the balancer, so that its random
        choices agree on every rank)."""
        stack = ExitStack()
        precision = self.config.train.precision
        if precision != "fp32":
            stack.enter_context(torch.autocast(self.device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[precision]))
        if self.world.size > 1:
            stack.enter_context(self.rank_random_state())
        return stack

    @contextmanager
    def rank_random_state(self) -> Iterator[None]:
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            set_torch_rng_state(self.rank_rng, self.device)
            yield
            self.rank_rng = torch_rng_state(self.device)

    def task_losses(self, batch: Batch, step_totals: TaskTotals) -> tuple[Tensor, Tensor]:
        """Forward pass of the whole batch: each task's training-loss sum ``S_i`` (with graph) and
        target tokens ``n_i``, both ``[K]``; the NLL goes into ``step_totals``."""
        loss, nll = self.model.losses(batch.src, batch.tgt_in, batch.tgt_out, self.config.train.label_smoothing)
        row_tokens = (batch.tgt_out != PAD).sum(dim=1)
        step_totals.add(batch.task, nll.sum(dim=1).detach(), row_tokens)
        num_tasks = len(self.tasks)
        task_tokens = loss.new_zeros(num_tasks).index_add(0, batch.task, row_tokens.to(loss.dtype))
        return loss.new_zeros(num_tasks).index_add(0, batch.task, loss.sum(dim=1)), task_tokens

    def scaled(self, loss: Tensor) -> Tensor:
        """``loss`` times fp16's loss scale (``loss`` itself in fp32 and bf16)."""
        return loss if self.scaler is None else self.scaler.scale(loss)

    def weighted_backward(self, batches: list[Batch], total_tokens: int, step_totals: TaskTotals) -> StepSums:
        """Backward pass of ``Σ_i w_i S_i / N`` (the balancer's loss weights) over this rank's
        micro-batches; a micro-batch whose loss is not finite is not backpropagated."""
        weights = self.balancer.loss_weights()
        sums = StepSums()
        for batch in batches:
            with self.forward_context():
                task_sums, task_tokens = self.task_losses(batch, step_totals)
                total = (weights.to(task_sums) * task_sums).sum() / total_tokens
            finite = bool(torch.isfinite(total))
            if finite:
                self.scaled(total).backward()
            sums.add(task_sums.detach(), task_tokens, finite)
        return sums

    def per_task_backward(self, batches: list[Batch], total_tokens: int, step_totals: TaskTotals) -> tuple[StepSums, Tensor]:
        """Per-task gradients ``[K, P]`` of this rank's micro-batches, each row ``∇ S_i / N``
        (times fp16's loss scale).

        One forward and backward pass per micro-batch with :class:`TaskSplit` (rows sorted by
        task); for a model it does not support, one pass per task sub-batch."""
        num_tasks, sums, grads = len(self.tasks), StepSums(), None
        for batch in batches:
            if self.task_split is None:
                def closure(sub: Batch, index: int):
                    def run() -> TaskLoss:
                        with self.forward_context():
                            task_sums, task_tokens = self.task_losses(sub, step_totals)
                        task_sum, tokens = task_sums[index], int(task_tokens[index])
                        sums.add_task(index, task_sum.detach(), tokens, num_tasks)
                        return TaskLoss(self.scaled(task_sum / total_tokens), mean=float(task_sum.detach()) / tokens, tokens=tokens)
                    return run

                part = per_task_gradients(self.params, [sub and closure(sub, i) for i, sub in enumerate(batch.by_task(num_tasks))]).grads
            else:
                batch = batch.select(torch.argsort(batch.task, stable=True))
                # TaskSplit writes its rows into one reused buffer (keeping its views); a second
                # micro-batch's rows go to a scratch buffer and are added.
                part = self.row_buffer(0 if grads is None else 1)
                with self.task_split.collect(batch.task, (batch.tgt_out != PAD).sum(dim=1), num_tasks, part):
                    with self.forward_context():
                        task_sums, task_tokens = self.task_losses(batch, step_totals)
                    self.scaled(task_sums.sum() / total_tokens).backward()
                sums.add(task_sums.detach(), task_tokens, True)
            grads = part if grads is None else grads.add_(part)
        return sums, grads

    def row_buffer(self, index: int) -> Tensor:
        """Reused ``[K, P]`` buffers for TaskSplit's rows (it keeps views of the one it is given)."""
        if len(self.row_buffers) <= index:
            self.row_buffers.append(torch.empty(len(self.tasks), self.task_split.size, dtype=gradient_dtype(self.params),
                                                device=self.params[0].device))
        return self.row_buffers[index]

    def next_batches(self) -> list[Batch]:
        """An update's micro-batches: ``processes × update_freq`` from the stream. Every rank
        draws them all (and trains on its share), so the stream is in the same state everywhere
        and one process with ``update_freq × processes`` trains on the same batches."""
        return [self.stream.next() for _ in range(self.world.size * self.config.train.update_freq)]

    def train_step(self, drawn: list[Batch]) -> dict[str, float]:
        """One update on the micro-batches ``drawn`` (this rank trains on every ``size``-th).
        If its loss or gradient is not finite (on any rank), nothing is stepped and nothing is
        added to the logged totals: ``{"skipped": 1.0, "reason": "loss" | "gradient"}``."""
        total_tokens = sum(batch.target_tokens for batch in drawn)
        batches = [batch.to(self.device) for batch in drawn[self.world.rank :: self.world.size]]
        plan = self.balancer.plan(self.state.update)
        if plan.validation:
            self.balancer.observe_validation(self.validation_stats(plan.curvature))
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        step_totals = TaskTotals(len(self.tasks))
        if plan.task_gradients:
            sums, grads = self.per_task_backward(batches, total_tokens, step_totals)
            # The balancer sees the true rows; its direction is scaled back so that the scaler
            # unscales and checks it like any gradient (the scale is a power of two: exact).
            scale = self.scaler.get_scale() if self.scaler is not None else 1.0
            if scale != 1.0:
                grads.mul_(1 / scale)
            self.synchronise(sums, step_totals, grads)
            losses, tokens = sums.means()
            probe = None
            if plan.curvature:
                probe = self.curvature_probe([partial(self.batch_loss, batch, total_tokens) for batch in batches], across_ranks=True)
            direction = self.balancer.combine(TaskStats(losses=losses, tokens=tokens, grads=grads, curvature=probe))
            accumulate_into_grad(self.params, direction * scale if scale != 1 else direction)
            loss_finite = bool(torch.isfinite(losses).all())
        else:
            sums = self.weighted_backward(batches, total_tokens, step_totals)
            self.synchronise(sums, step_totals, None)
            loss_finite = sums.finite
        if not loss_finite:
            self.optimizer.zero_grad(set_to_none=True)
            return {"skipped": 1.0, "reason": "loss"}
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        clip = self.config.train.clip_norm
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip if clip > 0 else math.inf)
        if not torch.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.update()  # an overflow: the scale backs off
            return {"skipped": 1.0, "reason": "gradient"}
        # Told only of steps actually taken: its schedule (CATS) counts the trainer's updates.
        if not plan.task_gradients:
            self.balancer.observe_losses(*sums.means())
        self.totals.merge(step_totals)
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.train.lr * inverse_sqrt_schedule(self.state.update + 1, self.config.train.warmup_updates)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        return {"grad_norm": float(grad_norm), "tokens": total_tokens}

    def synchronise(self, sums: StepSums, step_totals: TaskTotals, grads: Tensor | None) -> None:
        """Under torchrun, sum over the ranks, in one all-reduce, what the step's decisions read
        (task loss sums and tokens, whether every loss was finite, whether a rank was asked to
        stop, the logged NLL), then the gradient: the rows ``[K, P]`` for the per-task
        balancers, else the flat ``.grad`` ``[P]``. Every rank then decides alike."""
        if self.world.size == 1:
            return
        k = len(self.tasks)
        flags = torch.tensor([0.0 if sums.finite else 1.0, 0.0 if self.stop_signal is None else 1.0], dtype=torch.float64)
        packed = self.reduced(torch.cat([sums.sums.cpu(), sums.tokens.cpu(), step_totals.nll, step_totals.tokens, flags]))
        sums.sums.copy_(packed[:k]), sums.tokens.copy_(packed[k : 2 * k])
        step_totals.nll, step_totals.tokens = packed[2 * k : 3 * k].clone(), packed[3 * k : 4 * k].clone()
        sums.finite = bool(packed[-2] == 0)
        self.agreed_stop = bool(packed[-1] > 0)
        if grads is not None:
            self.world.all_reduce(grads)
            return
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in self.params])
        self.world.all_reduce(flat)
        for param, piece in zip(self.params, flat.split([p.numel() for p in self.params])):
            param.grad = piece.view_as(param)

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Validation NLL per task and group; under torchrun each rank scores every ``size``-th batch."""
        self.model.eval()
        totals = TaskTotals(len(self.tasks))
        for batch in self.valid_batches[self.world.rank :: self.world.size]:
            _, nll = self.model.losses(batch.src, batch.tgt_in, batch.tgt_out)
            totals.add(batch.task, nll.sum(dim=1), (batch.tgt_out != PAD).sum(dim=1))
        if self.world.size > 1:
            totals.nll, totals.tokens = self.reduced(totals.nll), self.reduced(totals.tokens)
        return totals.summary("valid_nll", self.tasks, self.groups)

    def diagnostics(self) -> dict[str, float]:
        """HiRes/LoRes gradient cosine and top Hessian eigenvalues (groups, combined loss) on fixed
        training batches; the random state is untouched, so logging them does not change training."""
        weights = combined_weights(self.tasks, self.sampling.at(self.state.update).tolist(), self.balancer.loss_weights().tolist())
        return training_diagnostics(self.model, self.data, weights)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict[str, float]:
        """Train to ``train.max_updates`` (or early stop); returns the last validation.

        Raises :class:`~polycats.errors.Interrupted` after saving when SIGINT/SIGTERM asked it
        to stop, and :class:`PolycatsError` after saving when too many updates in a row were not
        finite. Releases the run directory when it returns or raises.
        """
        if self.world.is_main:
            self.lock.acquire()
        try:
            with self.stop_on_signals():
                metrics = self.open_metrics()
                try:
                    return self.loop(metrics)
                finally:
                    metrics.close()
        finally:
            self.close()

    def open_metrics(self) -> MetricsLog:
        found, self.resume_from = self.resume_from, None
        if found is not None:
            state, path = found
            self.restore(state, path)
            if not self.world.is_main:
                return DiscardedMetrics()
            print(f"resumed from update {self.state.update} (checkpoint {path})", flush=True)
            return MetricsLog(self.run.path, int(state["metrics_offset"]), self.state.update)
        if not self.world.is_main:
            self.save(DiscardedMetrics(), snapshot=False)  # rank 0 saves here: gathers every rank's state
            return DiscardedMetrics()
        metrics = MetricsLog(self.run.path)
        sizes = self.data.meta["sizes"]
        metrics.log("start", 0, {
            **{f"sampling_p/{task}": float(p) for task, p in zip(self.tasks, self.sampling.probabilities)},
            **({f"first_stage_p/{task}": float(p) for task, p in zip(self.tasks, self.sampling.first_stage)}
               if self.sampling.first_stage is not None else {}),
            **{f"train_pairs/{task}": sizes[task]["train"] for task in self.tasks},
            "parameters": sum(p.numel() for p in self.params),
            "device": str(self.device),  # resolved (train.device auto is the same config on every machine)
            **({"processes": self.world.size} if self.world.size > 1 else {}),
            **({"device_name": torch.cuda.get_device_name(self.device)} if self.device.type == "cuda" else {}),
        })
        # A run has a last checkpoint from its first event on: anything more in a run directory
        # without one is history a fresh start would overwrite (RunDir.history).
        self.save(metrics, snapshot=False)
        return metrics

    def loop(self, metrics: MetricsLog) -> dict[str, float]:
        t = self.config.train
        window_tokens, window_start = 0, time.perf_counter()
        stopped_early = t.patience > 0 and self.state.bad_validations >= t.patience  # a resumed run that had stopped
        with self.progress_bar() as progress:
            task_id = progress.add_task("train", total=t.max_updates, completed=self.state.update, status="",
                                        valid=self.valid_status())
            while self.state.update < t.max_updates and not stopped_early:
                if self.stop_requested():
                    self.stop_for_signal(metrics)
                self.stream.set_probabilities(self.sampling.at(self.state.update))
                drawn = self.next_batches()
                step = self.train_step(drawn)
                if "skipped" in step:
                    self.skip(drawn, step["reason"], metrics)
                    continue
                self.state.skipped_in_a_row = 0
                self.state.update += 1
                window_tokens += step["tokens"]
                update, last = self.state.update, self.state.update == t.max_updates
                if update % t.log_every == 0 or last:
                    values = self.log_training(metrics, step["grad_norm"], window_tokens, time.perf_counter() - window_start)
                    window_tokens, window_start = 0, time.perf_counter()
                    progress.update(task_id, status=f"nll {values.get('train_nll', float('nan')):.2f} · {values['tokens_per_s']:,.0f} tok/s")
                progress.update(task_id, completed=update)
                if t.diagnostics_every and (update % t.diagnostics_every == 0 or update == 1) and self.world.is_main:
                    metrics.log("diagnostics", update, self.diagnostics())
                if update % t.valid_every == 0 or last:
                    stopped_early = self.validation_round(metrics)
                    progress.update(task_id, valid=self.valid_status())
                if update % t.save_every == 0 or last or stopped_early:
                    self.save(metrics)
        return self.state.last_valid

    def log_training(self, metrics: MetricsLog, grad_norm: float, tokens: int, seconds: float) -> dict[str, float]:
        """Log the window since the last ``train`` event (then start a new one); returns the values."""
        values = {
            **self.totals.summary("train_nll", self.tasks, self.groups),
            "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": grad_norm,
            "tokens_per_s": tokens / max(seconds, 1e-9),  # wall clock: the one inexact value
            **self.balancer.log_values(),
        }
        metrics.log("train", self.state.update, values)
        self.totals.reset()
        return values

    def validation_round(self, metrics: MetricsLog) -> bool:
        """Validate, keep ``best.pt`` when it improved, log; True when patience has run out."""
        state, t = self.state, self.config.train
        state.last_valid = self.validate()
        if state.last_valid["valid_nll"] < state.best_valid:
            state.best_valid, state.bad_validations = state.last_valid["valid_nll"], 0
            save_checkpoint({"model": self.model.state_dict(), "update": state.update}, self.run.checkpoints / "best.pt")
        else:
            state.bad_validations += 1
        metrics.log("valid", state.update, {**state.last_valid, "best_valid_nll": state.best_valid})
        if not self.show_progress and self.world.is_main:
            print(f"update {state.update}/{t.max_updates}  valid_nll {state.last_valid['valid_nll']:.3f}  "
                  f"best {state.best_valid:.3f}", flush=True)
        stopped_early = t.patience > 0 and state.bad_validations >= t.patience
        if stopped_early:  # logged before the checkpoint, so a resume never logs it twice
            metrics.log("early_stop", state.update, {"bad_validations": state.bad_validations})
        return stopped_early

    def skip(self, drawn: list[Batch], reason: str, metrics: MetricsLog) -> None:
        """Count and log a skipped update; after MAX_SKIPPED_IN_A_ROW, save the last good state and stop."""
        self.state.skipped_in_a_row += 1
        self.state.skipped_total += 1
        tasks = ",".join(sorted({self.tasks[i] for batch in drawn for i in batch.task.tolist()}))
        metrics.log("skipped_update", self.state.update, {
            "reason": reason, "tasks": tasks, "skipped_in_a_row": self.state.skipped_in_a_row, "skipped_total": self.state.skipped_total,
        })
        if self.world.is_main:
            print(f"warning: non-finite {reason} in the batch after update {self.state.update} (tasks {tasks}); "
                  f"update skipped ({self.state.skipped_in_a_row} in a row, {self.state.skipped_total} in all)", file=sys.stderr, flush=True)
        if self.state.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
            self.save(metrics, snapshot=False)  # the model and optimiser are the last good update's
            raise PolycatsError(
                f"{self.state.skipped_in_a_row} updates in a row had a non-finite loss or gradient (last batch: tasks {tasks}); "
                f"the last good state (update {self.state.update}) is saved in {self.last_path}: run the same command to "
                "continue past these batches, or check the data / lower train.lr in a new --out directory"
            )

    def stop_requested(self) -> bool:
        """SIGINT/SIGTERM arrived; under torchrun, on some rank by the last update (all agree)."""
        return self.stop_signal is not None if self.world.size == 1 else self.agreed_stop

    def stop_for_signal(self, metrics: MetricsLog) -> None:
        if self.saved_at != self.state.batches_drawn:
            self.save(metrics, snapshot=False)  # no snapshot: analyze curves keep their regular spacing
        name = signal.Signals(self.stop_signal or signal.SIGTERM).name
        raise Interrupted(
            f"{name} received: stopped after update {self.state.update}/{self.config.train.max_updates} and saved "
            f"{self.last_path}; run the same command to resume", self.stop_signal,
        )

    @contextmanager
    def stop_on_signals(self) -> Iterator[None]:
        """SIGINT/SIGTERM ask the loop to finish the current update, save and stop; a second
        one stops at once (KeyboardInterrupt; atomic writes keep the files whole)."""
        self.stop_signal = None
        if threading.current_thread() is not threading.main_thread():  # handlers only work there
            yield
            return

        def request_stop(signum: int, frame) -> None:
            if self.stop_signal is not None:
                raise KeyboardInterrupt
            self.stop_signal = signum
            print(f"\n{signal.Signals(signum).name}: finishing the current update, then saving and stopping "
                  "(send it again to stop at once)", file=sys.stderr, flush=True)

        previous = {number: signal.signal(number, request_stop) for number in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler if handler is not None else signal.SIG_DFL)

    def valid_status(self) -> str:
        """The progress bar's validation column: the latest validation NLL (a resumed run's too)."""
        last = self.state.last_valid.get("valid_nll")
        return "valid —" if last is None else f"valid {last:.3f}"

    def progress_bar(self) -> Progress:
        return Progress(
            TextColumn(f"[bold]{self.config.name}[/] {self.run.path.name}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"), TextColumn("{task.fields[valid]}"),
            TextColumn("elapsed"), TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(),
            disable=not self.show_progress, transient=False,
        )


def train(config: Config, run_dir: str | Path, progress: bool | None = None, restart: bool = False) -> dict[str, float]:
    """Train ``config`` into ``run_dir`` (resumed when it holds a run); under ``torchrun``, as one
    of its processes."""
    trainer = Trainer(config, run_dir, progress=progress, restart=restart)
    try:
        return trainer.fit()
    finally:
        trainer.world.close()
