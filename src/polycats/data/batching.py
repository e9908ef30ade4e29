"""Temperature sampling over tasks and token-budget batches that remember each sentence's task.

The stream is a pure function of (seed, chunk index, per-task read positions): chunk ``k`` draws
enough sentences for ~``CHUNK_BATCHES`` batches — each sentence's task from p_i ∝ n_i^(1/T), the
sentence itself from that task's seeded per-epoch permutation — sorts them by length (bucketing:
little padding), cuts them into batches under the token budget and shuffles the batches. Its
state is a handful of integers, so checkpoints resume the exact same batches.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from polycats.data.prepare import BOS, PAD, TaskArrays

CHUNK_BATCHES = 32


@dataclass
class Batch:
    src: Tensor  # [B, S] source ids (tag first), right-padded
    tgt_in: Tensor  # [B, T] bos + target
    tgt_out: Tensor  # [B, T] target + eos
    task: Tensor  # [B] task index of each sentence

    @property
    def target_tokens(self) -> int:
        return int((self.tgt_out != PAD).sum())

    def to(self, device: torch.device | str) -> Batch:
        """The batch on ``device`` (the same tensors where they are there already)."""
        return Batch(self.src.to(device), self.tgt_in.to(device), self.tgt_out.to(device), self.task.to(device))

    def select(self, rows: Tensor) -> Batch:
        """The rows ``rows``, with padding trimmed to the longest selected sentence."""
        src, tgt_in, tgt_out = self.src[rows], self.tgt_in[rows], self.tgt_out[rows]
        src_len = int((src != PAD).sum(1).max())
        tgt_len = int((tgt_out != PAD).sum(1).max())
        return Batch(src[:, :src_len], tgt_in[:, :tgt_len], tgt_out[:, :tgt_len], self.task[rows])

    def by_task(self, num_tasks: int) -> list[Batch | None]:
        """One sub-batch per task (None where the task has no sentence in this batch)."""
        return [
            self.select(rows) if len(rows := (self.task == i).nonzero().squeeze(1)) else None
            for i in range(num_tasks)
        ]


def collate(sources: list[np.ndarray], targets: list[np.ndarray], tasks: list[int]) -> Batch:
    size = len(sources)
    src = torch.full((size, max(len(s) for s in sources)), PAD, dtype=torch.long)
    tgt_len = max(len(t) for t in targets)
    tgt_in = torch.full((size, tgt_len), PAD, dtype=torch.long)
    tgt_out = torch.full((size, tgt_len), PAD, dtype=torch.long)
    for row, (s, t) in enumerate(zip(sources, targets)):
        src[row, : len(s)] = torch.from_numpy(s.astype(np.int64))
        target = torch.from_numpy(t.astype(np.int64))
        tgt_out[row, : len(t)] = target
        tgt_in[row, 0] = BOS
        tgt_in[row, 1 : len(t)] = target[:-1]
    return Batch(src, tgt_in, tgt_out, torch.tensor(tasks, dtype=torch.long))


def sample_batch(arrays: TaskArrays, task_index: int, sentences: int, key: str) -> Batch:
    """A fixed sample of ``sentences`` pairs of one task (all if it has fewer), drawn by a
    ``random.Random(key)`` so the same key always gives the same batch."""
    rows = random.Random(key).sample(range(len(arrays)), min(sentences, len(arrays)))
    return collate([arrays.src[i] for i in rows], [arrays.tgt[i] for i in rows], [task_index] * len(rows))


def fixed_batches(data: dict[str, TaskArrays], max_tokens: int) -> list[Batch]:
    """Every sentence once, in order, length-bucketed per task: for validation and diagnostics."""
    batches = []
    for index, arrays in enumerate(data.values()):
        order = sorted(range(len(arrays)), key=lambda i: max(len(arrays.src[i]), len(arrays.tgt[i])))
        for chunk in cut_by_tokens([(index, i) for i in order], data, max_tokens):
            batches.append(collate([arrays.src[i] for _, i in chunk], [arrays.tgt[i] for _, i in chunk], [index] * len(chunk)))
    return batches


def cut_by_tokens(items: list[tuple[int, int]], data: dict[str, TaskArrays], max_tokens: int) -> list[list[tuple[int, int]]]:
    """Cut length-sorted (task, sentence) items into runs whose padded size fits ``max_tokens``."""
    arrays = list(data.values())
    runs, current, longest = [], [], 0
    for task, sentence in items:
        length = max(len(arrays[task].src[sentence]), len(arrays[task].tgt[sentence]))
        if current and max(longest, length) * (len(current) + 1) > max_tokens:
            runs.append(current)
            current, longest = [], 0
        current.append((task, sentence))
        longest = max(longest, length)
    if current:
        runs.append(current)
    return runs


class BatchStream:
    """Endless, deterministic, resumable stream of training batches."""

    def __init__(self, data: dict[str, TaskArrays], probabilities: np.ndarray, max_tokens: int, seed: int):
        self.data = data
        self.arrays = list(data.values())
        self.probabilities = probabilities
        self.max_tokens = max_tokens
        self.seed = seed
        mean_length = np.mean([max(len(s), len(t)) for a in self.arrays for s, t in zip(a.src[:200], a.tgt[:200])])
        self.chunk_sentences = max(1, int(CHUNK_BATCHES * max_tokens / mean_length))
        self.chunk = 0
        self.position = 0
        self.reads = [0] * len(self.arrays)  # sentences read from each task before the current chunk
        self._batches: list[Batch] | None = None
        self._reads_after: list[int] = []

    def sentence_index(self, task: int, read: int) -> int:
        size = len(self.arrays[task])
        epoch, offset = divmod(read, size)
        if self._permutation_key.get(task) != epoch:
            rng = np.random.default_rng([self.seed, 7919, task, epoch])
            self._permutations[task] = rng.permutation(size)
            self._permutation_key[task] = epoch
        return int(self._permutations[task][offset])

    def build_chunk(self) -> None:
        self._permutations: dict[int, np.ndarray] = {}
        self._permutation_key: dict[int, int] = {}
        rng = np.random.default_rng([self.seed, self.chunk])
        tasks = rng.choice(len(self.arrays), size=self.chunk_sentences, p=self.probabilities)
        reads = list(self.reads)
        items = []
        for task in tasks.tolist():
            items.append((task, self.sentence_index(task, reads[task])))
            reads[task] += 1
        lengths = [max(len(self.arrays[t].src[i]), len(self.arrays[t].tgt[i])) for t, i in items]
        order = np.lexsort((rng.random(len(items)), lengths))  # by length, ties in random order
        runs = cut_by_tokens([items[i] for i in order], self.data, self.max_tokens)
        rng.shuffle(runs)
        self._batches = [
            collate([self.arrays[t].src[i] for t, i in run], [self.arrays[t].tgt[i] for t, i in run], [t for t, _ in run])
            for run in runs
        ]
        self._reads_after = reads

    def next(self) -> Batch:
        if self._batches is None:
            self.build_chunk()
        if self.position >= len(self._batches):
            self.chunk, self.position, self.reads = self.chunk + 1, 0, self._reads_after
            self.build_chunk()
        batch = self._batches[self.position]
        self.position += 1
        return batch

    def set_probabilities(self, probabilities: np.ndarray) -> None:
        """Draw from ``probabilities`` from the next batch on (a sampling schedule's stage change).
        The rest of the current chunk is dropped — its sentences count as read — so the stream
        stays a function of its state."""
        probabilities = np.asarray(probabilities, dtype=float)
        if np.array_equal(probabilities, self.probabilities):
            return
        if self.position:
            if self._batches is None:  # resumed mid-chunk: rebuild it to know what it read
                self.build_chunk()
            self.chunk, self.position, self.reads = self.chunk + 1, 0, self._reads_after
        self.probabilities = probabilities
        self._batches = None

    def state_dict(self) -> dict[str, int | list[int] | list[float]]:
        return {"chunk": self.chunk, "position": self.position, "reads": list(self.reads), "seed": self.seed,
                "probabilities": self.probabilities.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.chunk, self.position, self.reads = int(state["chunk"]), int(state["position"]), list(state["reads"])
        self.seed = int(state["seed"])
        if "probabilities" in state:  # absent in checkpoints from before sampling schedules
            self.probabilities = np.asarray(state["probabilities"], dtype=float)
        self._batches = None
