"""How many Hessian-vector products the diagnostics' eigenvalue solves need on a real run: the
numbers behind the default budgets (``DiagnosticSettings().max_iter``, ``TRAINING_SETTINGS.max_iter``).

For every ``update_N.pt`` snapshot of RUN_DIR (newest first), and for a freshly initialised model
of the same config (what ``train.diagnostics_every`` sees at update 1), each setting's group and
combined solves (the combined loss with equal task weights) run with a budget of 400 products;
one line per solve: λ_max, the largest-magnitude eigenvalue, the products used, whether it
converged, seconds. One torch thread.

    polycats train configs/demo.yaml --out runs/demo10 --set train.max_updates=10 \\
        --set train.save_every=5 --set train.valid_every=5
    python benchmarks/eigen_budget.py runs/demo10
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from polycats.diagnostics.model_summary import TRAINING_SETTINGS, DiagnosticSettings, diagnostic_closures, group_members
from polycats.diagnostics import combine_losses, top_eigenvalue
from polycats.run.build import build_model
from polycats.run.checkpoint import load_checkpoint
from polycats.run.directory import RunDir

SETTINGS = {"analyze": DiagnosticSettings(), "training": TRAINING_SETTINGS}


def solves(model, data, settings: DiagnosticSettings) -> dict[str, object]:
    closures = diagnostic_closures(model, data, settings.sentences, settings.seed)
    losses = {f"group {g}": combine_losses({t: closures[t] for t in members})
              for g, members in group_members(data.meta["groups"]).items()}
    losses["combined"] = combine_losses(closures, {t: 1.0 for t in closures})
    return losses


def run(run_dir: str) -> None:
    run = RunDir(run_dir)
    config = run.config()
    data = run.prepared(config)
    model = build_model(config, data.vocab_size)
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters, 1 thread")
    states = [(path.name, load_checkpoint(path)["model"]) for path in sorted(run.checkpoints.glob("update_*.pt"))[::-1]]
    torch.manual_seed(config.train.seed)
    states.append(("initialisation", build_model(config, data.vocab_size).state_dict()))
    for name, state in states:
        model.load_state_dict(state)
        for which, settings in SETTINGS.items():
            solver = dataclasses.replace(settings, max_iter=400).solver()
            for label, loss in solves(model, data, settings).items():
                start = time.perf_counter()
                r = top_eigenvalue(model, loss, **solver)
                print(f"{which:8s} {name:16s} {label:13s} λ_max {r.largest_algebraic:8.4f}  largest magnitude "
                      f"{r.largest_magnitude:8.4f}  products {r.matvecs:3d}  converged {r.converged}  "
                      f"{time.perf_counter() - start:6.1f} s", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    torch.set_num_threads(1)
    run(parser.parse_args().run_dir)
