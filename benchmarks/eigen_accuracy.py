"""How far the reported top Hessian eigenvalue is from the exact one, per solver setting.

Tiny Transformers (d_model 8, 1+1 layers, 2 heads, vocab 20, batch 3 x 5 source and 3 x 5 target
tokens with padding, float64: 1,672 parameters) small enough for the dense Hessian
(``torch.autograd.functional.hessian`` + ``torch.linalg.eigvalsh``), one per seed, each at random
initialisation and after 30 Adam steps (lr 1e-2) on its batch. For every setting: the relative
error of ``largest_algebraic`` (the reported λ_max) against the exact largest eigenvalue, and the
Hessian-vector products used; median and worst over the cases. The settings are ``polycats
analyze``'s and ``train.diagnostics_every``'s, now (``DiagnosticSettings()``, ``TRAINING_SETTINGS``)
and before (power iteration, tol 1e-3 within 100 products per run, and tol 1e-2 within 30).

    python benchmarks/eigen_accuracy.py [--seeds 10]
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from polycats.diagnostics.model_summary import TRAINING_SETTINGS, DiagnosticSettings
from polycats.diagnostics.curvature import top_eigenvalue
from polycats.model.transformer import Transformer, TransformerShape

SETTINGS = {
    "analyze, before: power iteration tol 1e-3, 100/run": {"method": "power_iteration", "tol": 1e-3, "max_iter": 100},
    "training, before: power iteration tol 1e-2, 30/run": {"method": "power_iteration", "tol": 1e-2, "max_iter": 30},
    "analyze, now (DiagnosticSettings())": DiagnosticSettings().solver(),
    "training, now (TRAINING_SETTINGS)": TRAINING_SETTINGS.solver(),
}


def case(seed: int, steps: int):
    """A tiny float64 Transformer, its token-NLL closure and the exact eigenvalues."""
    torch.manual_seed(seed)
    shape = TransformerShape(vocab_size=20, d_model=8, encoder_layers=1, decoder_layers=1, heads=2, ffn_dim=16)
    model = Transformer(shape).double()
    src, tgt = torch.randint(1, 20, (3, 5)), torch.randint(1, 20, (3, 6))
    src[0, -2:], tgt[1, -1] = shape.pad_id, shape.pad_id

    def closure():
        logits = model(src, tgt[:, :-1])
        target = tgt[:, 1:].reshape(-1)
        return F.cross_entropy(logits.reshape(-1, shape.vocab_size), target, ignore_index=shape.pad_id, reduction="sum"), \
            int((target != shape.pad_id).sum())

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        total, tokens = closure()
        (total / tokens).backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    model.eval()
    wrapper = _Closure(model, closure)
    names = [f"model.{name}" for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def loss_of(theta):
        pieces = [piece.view(s) for piece, s in zip(theta.split([s.numel() for s in shapes]), shapes)]
        return torch.func.functional_call(wrapper, dict(zip(names, pieces)), ())

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    with sdpa_kernel(SDPBackend.MATH):
        hessian = torch.autograd.functional.hessian(loss_of, flat, vectorize=True)
    return model, closure, torch.linalg.eigvalsh(hessian)


class _Closure(torch.nn.Module):
    """The closure's mean loss as a module, so ``functional_call`` can swap the model's parameters."""

    def __init__(self, model, closure):
        super().__init__()
        self.model, self.closure = model, closure

    def forward(self):
        total, tokens = self.closure()
        return total / tokens


def run(seeds: int = 10, show_cases: bool = False) -> list[dict[str, object]]:
    errors = {name: [] for name in SETTINGS}
    products = {name: [] for name in SETTINGS}
    negative = 0
    for seed in range(seeds):
        for steps in (0, 30):
            model, closure, eigenvalues = case(seed, steps)
            top, bottom = float(eigenvalues[-1]), float(eigenvalues[0])
            negative += abs(bottom) > abs(top)
            for name, solver in SETTINGS.items():
                result = top_eigenvalue(model, closure, **solver)
                errors[name].append(abs(result.largest_algebraic - top) / abs(top))
                products[name].append(result.matvecs)
            if show_cases:
                print(f"seed {seed}, {steps:2d} steps: lambda_max {top:.4f}, lambda_min {bottom:.4f}; errors "
                      + ", ".join(f"{errors[name][-1]:.1e} ({products[name][-1]})" for name in SETTINGS))
    return [{"setting": name, "cases": f"{len(errors[name])} ({negative} negative-dominated)",
             "median error": statistics.median(errors[name]), "worst error": max(errors[name]),
             "median products": statistics.median(products[name]), "most products": max(products[name])}
            for name in SETTINGS]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--cases", action="store_true", help="also print each case's errors (products)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread")
    rows = run(args.seeds, args.cases)
    print("| setting | cases | median error | worst error | median products | most products |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['setting']} | {row['cases']} | {row['median error']:.1e} | {row['worst error']:.1e} | "
              f"{row['median products']:g} | {row['most products']} |")
