"""The README's "CATS in your own PyTorch loop", runnable, with any polycats balancer in place of
CATS: ``--method cats|scalar|pcgrad|upgrad|nashmtl|mgda|cagrad|graddrop|imtlg|alignedmtl|gradvac``
(the torchjd aggregators among them). Two regression tasks of very different sizes share one MLP.

    python examples/plain_loop.py --method upgrad --steps 100

Each step follows the balancer's plan (``polycats.balance.base``): per-task gradients and
``combine`` when it asks for them, else one backward pass of the loss-weighted sum.
"""

from __future__ import annotations

import argparse

import torch
from pydantic import TypeAdapter

from polycats.balance import BalancerContext, TaskLoss, backward_per_task, balancer_from_config
from polycats.balancer_config import BALANCER_NAMES, BalancerConfig

# DRO needs the sampler's probabilities, which a loop without a sampler does not have.
METHODS = [name for name in BALANCER_NAMES if name != "dro"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=METHODS, default="cats")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10, help="CATS warm-up steps (α = 1 until then)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a model this small only waits on a second thread

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    data = {"de-en": (torch.randn(64, 8), torch.randn(64, 1)),   # a high-resource task
            "sw-en": (torch.randn(8, 8), torch.randn(8, 1))}     # a low-resource task
    total = sum(len(x) for x, _ in data.values())
    options = {"name": args.method, **({"warmup_steps": args.warmup} if args.method == "cats" else {})}
    balancer = balancer_from_config(TypeAdapter(BalancerConfig).validate_python(options), list(data), ["de", "sw"])
    balancer.bind(BalancerContext([(name, p) for name, p in model.named_parameters()]))

    def task_loss(x, y):
        """Task i's contribution S_i / N to the usual loss, its mean loss and its size."""
        def run() -> TaskLoss:
            loss_sum = torch.nn.functional.mse_loss(model(x), y, reduction="sum")
            return TaskLoss(loss_sum / total, mean=float(loss_sum.detach()) / len(x), tokens=len(x))
        return run

    def errors() -> dict[str, float]:
        with torch.no_grad():
            return {task: round(float(torch.nn.functional.mse_loss(model(x), y)), 4) for task, (x, y) in data.items()}

    before = errors()
    for step in range(args.steps):
        optimizer.zero_grad()
        plan = balancer.plan(step)
        if plan.task_gradients:
            backward_per_task(model.parameters(), [task_loss(x, y) for x, y in data.values()], balancer)
        else:
            losses = [task_loss(x, y)() for x, y in data.values()]
            (balancer.loss_weights() @ torch.stack([t.loss for t in losses])).backward()
            balancer.observe_losses(torch.tensor([t.mean for t in losses]), torch.tensor([float(t.tokens) for t in losses]))
        optimizer.step()

    print(f"{args.method}: mean squared error before {before}, after {args.steps} steps {errors()}")
    logged = {k: round(v, 3) for k, v in balancer.log_values().items() if k.startswith(("alpha", "lambda"))}
    if logged:
        print(logged)


if __name__ == "__main__":
    main()
