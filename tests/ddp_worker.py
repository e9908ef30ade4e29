"""A ``torchrun`` worker for tests/test_distributed.py: ``torchrun --nproc-per-node 2 ddp_worker.py SPEC``.

SPEC is a JSON file ``{"runs": [{"config": {...}, "out": DIR, "poison": {"rank": R, "batches": [B]}},
...], "signal": {"rank": R, "at": U, "name": "SIGKILL"}}``: each run is trained in turn in the same process group, then
every rank saves its balancer's state as ``DIR/balancer.rank<R>.pt`` (so a test can compare the
ranks). With ``poison``, the losses of those steps (counted from 1, skipped ones included) are
NaN on that rank only (tests/nan_injection.py). With ``signal``, that rank sends itself the signal
when it is about to take update ``at``: SIGKILL as the kernel would kill a crashed process,
SIGTERM as a scheduler would stop a job; the product has no such hook.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

from polycats.config import config_from_dict
from polycats.train.trainer import Trainer

from nan_injection import poison_batches


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    for run in spec["runs"]:
        trainer = Trainer(config_from_dict(run["config"]), run["out"], progress=False)
        patch = pytest.MonkeyPatch()
        if run.get("poison", {}).get("rank") == trainer.world.rank:
            poison_batches(patch, run["poison"]["batches"])
        sent = spec.get("signal", {})
        if trainer.world.rank == sent.get("rank"):
            step = trainer.train_step

            def train_step(drawn, step=step, trainer=trainer):
                if trainer.state.update == sent["at"]:
                    os.kill(os.getpid(), signal.Signals[sent["name"]])
                return step(drawn)

            trainer.train_step = train_step
        trainer.fit()
        patch.undo()
        torch.save(trainer.balancer.state_dict(), Path(run["out"]) / f"balancer.rank{trainer.world.rank}.pt")
    trainer.world.close()


if __name__ == "__main__":
    main(sys.argv[1])
