"""CATS on problems whose tasks carry similar gradient energy: does λ stay bounded, does α settle?

Four seeded cases drive ``CATS`` through its public API with the default options (warm-up 0):

* ``diag(4,1)``: a fixed Gram matrix diag(4, 1), equal losses, 6,000 updates;
* ``equal noisy``: two tasks of equal size, g_i = e_i + noise (P = 32), 8,000 updates;
* ``T=5 shares``: K = 4 tasks with T=5-like token shares (.316/.316/.184/.184) of noisy
  gradients, 8,000 updates;
* ``quadratic SGD``: SGD on two quadratic tasks (a sharp and a flat one) with gradient noise
  whose covariance is proportional to each task's Hessian (as the Fisher of per-example gradients),
  6,000 steps; also the top eigenvalue of the α-weighted Hessian ``Σ α_i H_i`` (mean over the
  last 1,000 steps) against α = 1.

Prints one markdown row per case: final and largest λ, the mean of ``max_i |Δα_i|`` per update
over the last 1,000 updates, the final α. Run: ``python benchmarks/cats_budget.py``
(``--gram-decay 0`` for α updates from each batch's own Gram matrix).
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
import torch

from polycats.balance import TaskStats
from polycats.balance.cats import CATS

OPTIONS: dict[str, float] = {}  # CATS options from the command line


def trajectory(cats: CATS, next_stats, updates: int) -> dict[str, object]:
    lams, alphas = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(updates):
            cats.combine(next_stats(step, cats.alpha))
            lams.append(cats.lam)
            alphas.append(cats.alpha.numpy())
    alphas = np.array(alphas)
    moves = np.abs(np.diff(alphas, axis=0)).max(axis=1)
    return {"lambda": lams[-1], "lambda_max": max(lams), "move": float(moves[-1000:].mean()), "alpha": alphas[-1]}


def noisy_rows(means: np.ndarray, noise: float, seed: int):
    generator = np.random.default_rng(seed)

    def stats(step: int, alpha) -> TaskStats:
        grads = means + noise * generator.standard_normal(means.shape)
        return TaskStats(torch.ones(len(means)), torch.ones(len(means)), torch.tensor(grads))

    return stats


def fixed_gram() -> dict[str, object]:
    rows = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)  # Gram diag(4, 1)
    stats = TaskStats(torch.ones(2), torch.ones(2), rows)
    return trajectory(CATS(["hi", "lo"], warmup_steps=0, **OPTIONS), lambda step, alpha: stats, 6000)


def equal_noisy() -> dict[str, object]:
    means = np.eye(2, 32)
    return trajectory(CATS(["a", "b"], warmup_steps=0, **OPTIONS), noisy_rows(means, 0.3, 1), 8000)


def temperature_five_shares() -> dict[str, object]:
    shares = np.array([0.316, 0.316, 0.184, 0.184])
    directions = np.random.default_rng(2).standard_normal((4, 64))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    means = shares[:, None] * directions
    generator = np.random.default_rng(3)

    def stats(step: int, alpha) -> TaskStats:
        grads = shares[:, None] * (directions + 0.3 * generator.standard_normal(means.shape))
        return TaskStats(torch.ones(4), torch.tensor(shares), torch.tensor(grads))

    return trajectory(CATS(["h1", "h2", "l1", "l2"], warmup_steps=0, **OPTIONS), stats, 8000)


SHARP = np.diag([9.0, 1.0])
FLAT = np.diag([1.0, 1.5])
FLAT_CENTRE = np.array([1.0, 1.0])


def top_eigenvalue(alpha: np.ndarray) -> float:
    return float(np.linalg.eigvalsh(alpha[0] * SHARP + alpha[1] * FLAT).max())


def quadratic_sgd(lr: float = 0.02, steps: int = 6000) -> dict[str, object]:
    generator = np.random.default_rng(4)
    theta = np.array([2.0, -1.0])
    cats = CATS(["sharp", "flat"], warmup_steps=0, **OPTIONS)
    lams, alphas = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(steps):
            # Gradient noise with covariance ∝ the task's Hessian (the Fisher, as for per-example gradients).
            noise = 0.3 * np.stack([np.sqrt(np.diag(SHARP)), np.sqrt(np.diag(FLAT))]) * generator.standard_normal((2, 2))
            grads = np.stack([SHARP @ theta, FLAT @ (theta - FLAT_CENTRE)]) + noise
            losses = torch.tensor([0.5 * theta @ SHARP @ theta, 0.5 * (theta - FLAT_CENTRE) @ FLAT @ (theta - FLAT_CENTRE)])
            direction = cats.combine(TaskStats(losses, torch.ones(2), torch.tensor(grads)))
            theta = theta - lr * direction.numpy()
            lams.append(cats.lam)
            alphas.append(cats.alpha.numpy())
    alphas = np.array(alphas)
    moves = np.abs(np.diff(alphas, axis=0)).max(axis=1)
    return {
        "lambda": lams[-1], "lambda_max": max(lams), "move": float(moves[-1000:].mean()), "alpha": alphas[-1],
        "top_eigenvalue": float(np.mean([top_eigenvalue(a) for a in alphas[-1000:]])),
        "top_eigenvalue_alpha_1": top_eigenvalue(np.ones(2)),
    }


CASES = {"diag(4,1)": fixed_gram, "equal noisy": equal_noisy, "T=5 shares": temperature_five_shares,
         "quadratic SGD": quadratic_sgd}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gram-decay", type=float, default=None, help="cats.gram_decay (default: CATS's default)")
    args = parser.parse_args()
    if args.gram_decay is not None:
        OPTIONS["gram_decay"] = args.gram_decay
    print("| case | λ final | λ max | mean max|Δα| per update (last 1,000) | α final | top eigenvalue of Σα_iH_i, last 1,000 (α = 1) |")
    print("|---|---|---|---|---|---|")
    for name, case in CASES.items():
        result = case()
        alpha = " / ".join(f"{a:.3f}" for a in result["alpha"])
        eigen = f"{result['top_eigenvalue']:.2f} ({result['top_eigenvalue_alpha_1']:.2f})" if "top_eigenvalue" in result else ""
        print(f"| {name} | {result['lambda']:.3g} | {result['lambda_max']:.3g} | {result['move']:.3g} | {alpha} | {eigen} |")


if __name__ == "__main__":
    main()
