"""Data parallelism over processes started by ``torchrun`` (gloo on CPU, nccl on CUDA): who this
process is (:class:`World`) and the few collectives the trainer needs. A single process is a
world of one, where every collective is a no-op, so the trainer has one code path.

Why the trainer reduces by hand instead of wrapping the model in ``DistributedDataParallel``: the
per-task balancers need the ``[K, P]`` per-task gradient rows of the *global* batch (CATS's Gram
matrix ``G Gᵀ`` has cross-rank terms ``g_i^r · g_j^s``, so no per-rank summary of ``G`` gives
it), which DDP's reducer cannot produce, and :class:`~polycats.ops.task_split.TaskSplit` turns
the parameters' ``requires_grad`` off, which DDP's hooks rely on. Each update therefore runs
every local backward pass without communication (what ``no_sync`` does) and then one all-reduce
of either the flat gradient ``[P]`` or the rows ``[K, P]`` (docs/distributed.md).

>>> world = World.single()
>>> world.size, world.rank, world.is_main
(1, 0, True)
>>> import torch
>>> world.all_reduce(torch.tensor([1.0, 2.0])).tolist()
[1.0, 2.0]
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from polycats.errors import PolycatsError


@dataclass(frozen=True)
class World:
    """``size`` processes, this one ``rank`` (``local_rank`` on its machine)."""

    size: int = 1
    rank: int = 0
    local_rank: int = 0

    @classmethod
    def single(cls) -> World:
        return cls()

    @classmethod
    def from_environment(cls, device_type: str) -> World:
        """The world ``torchrun`` describes in the environment (``WORLD_SIZE``, ``RANK``,
        ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``), its process group initialised (gloo on
        the CPU, nccl on CUDA); a world of one without them."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size == 1:
            return cls.single()
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if not dist.is_initialized():
            if device_type == "cuda":
                torch.cuda.set_device(local_rank)
            try:
                dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
            except (RuntimeError, ValueError) as error:
                raise PolycatsError(f"could not join the torchrun process group ({str(error).splitlines()[0][:200]})") from None
        return cls(size, rank, local_rank)

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run directory: metrics, TensorBoard, checkpoints."""
        return self.rank == 0

    def all_reduce(self, tensor: Tensor) -> Tensor:
        """``tensor`` summed over the ranks, in place (returned for chaining)."""
        if self.size > 1:
            dist.all_reduce(tensor)
        return tensor

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (any picklable object)."""
        if self.size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list[Any] | None:
        """Every rank's ``value`` on rank 0 (a list in rank order), None on the others."""
        if self.size == 1:
            return [value]
        values = [None] * self.size if self.is_main else None
        dist.gather_object(value, values, dst=0)
        return values

    def main_first(self, action: Callable[[], Any], on_others: Callable[[Any], Any] | None = None) -> Any:
        """Run ``action`` on rank 0, then on the other ranks (or ``on_others(rank 0's result)``
        there): what rank 0 writes (a data cache, the run directory) the others only read. A
        failure on rank 0 is raised on every rank, so none waits for it forever."""
        if self.size == 1:
            return action()
        if self.is_main:
            try:
                result = action()
            except PolycatsError as error:
                self.broadcast(("error", str(error)))
                raise
            except BaseException:
                self.broadcast(("error", "rank 0 failed; its output says why"))
                raise
            self.broadcast(("ok", result))
            return result
        status, value = self.broadcast(None)
        if status == "error":
            raise PolycatsError(value)
        return action() if on_others is None else on_others(value)

    def close(self) -> None:
        if self.size > 1 and dist.is_initialized():
            dist.destroy_process_group()
