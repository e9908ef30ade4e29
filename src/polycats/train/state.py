"""What a training run is besides its model, optimiser, balancer and sampler: the loop's counters
(:class:`TrainState`) and every random state training may touch; ``last.pt`` holds them all, so a
killed run resumes bit-identically (docs/reliability.md).

>>> state = TrainState(update=3, skipped_total=1)
>>> TrainState.from_state_dict(state.state_dict()) == state, state.batches_drawn
(True, 4)
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class TrainState:
    """The training loop's counters.

    update: updates taken; skipped_total / skipped_in_a_row: batches skipped for a non-finite loss
    or gradient; best_valid, bad_validations: early stopping; last_valid: the last validation.
    """

    update: int = 0
    best_valid: float = math.inf
    bad_validations: int = 0
    skipped_total: int = 0
    skipped_in_a_row: int = 0
    last_valid: dict[str, float] = field(default_factory=dict)

    @property
    def batches_drawn(self) -> int:
        """Batches taken from the stream: updates and skipped ones (the stream's position)."""
        return self.update + self.skipped_total

    def state_dict(self) -> dict[str, Any]:
        return {
            "update": self.update,
            "best_valid": self.best_valid,
            "bad_validations": self.bad_validations,
            "skipped_total": self.skipped_total,
            "skipped_in_a_row": self.skipped_in_a_row,
            "last_valid": dict(self.last_valid),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> TrainState:
        """From a ``last.pt`` (format 1 checkpoints, without the newer fields, load too)."""
        return cls(
            update=int(state["update"]),
            best_valid=float(state["best_valid"]),
            bad_validations=int(state["bad_validations"]),
            skipped_total=int(state["skipped_total"]),
            skipped_in_a_row=int(state.get("skipped_in_a_row", 0)),
            last_valid=dict(state.get("last_valid", {})),
        )


def torch_rng_state(device: torch.device | None = None) -> dict:
    """torch's random state (dropout's): the CPU generator's and, on a CUDA ``device``, that
    device's."""
    state = {"torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_torch_rng_state(state: dict, device: torch.device | None = None) -> None:
    """Restore :func:`torch_rng_state`; a CUDA state only when training on CUDA (a run moved to
    another device resumes, though not bit-identically)."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def rng_state(device: torch.device | None = None) -> dict:
    """Every random state training may touch: torch (dropout, GradVac's order), Python, NumPy,
    and on a CUDA ``device`` that device's generator (dropout and GradDrop draw there)."""
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        **torch_rng_state(device),
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
    }
    return state


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    """Restore :func:`rng_state`."""
    set_torch_rng_state(state, device)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy = state["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
