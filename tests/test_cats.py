"""CATS (docs/cats.md): known answers on toy quadratics, invariants as properties, the gradient it
leaves in ``.grad``, the sketch's documented error, state round-trips and the collapse warning."""

from __future__ import annotations

import doctest
import io
import itertools
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from torch import nn

import polycats.balance.cats as cats_module
from polycats.balance import Balancer, TaskStats, backward_per_task
from polycats.balance.cats import (
    CATS,
    CatsBudgetWarning,
    CatsCollapseWarning,
    CatsOscillationWarning,
    CurvatureProbeMissing,
    least_energy_weights,
    project_onto_floor_simplex,
    sketch_error_bound,
)
from polycats.balancer_config import CatsConfig
from polycats.ops.task_gradients import GRAM_CHUNK, TaskLoss, gram_matrix, per_task_gradients, weighted_sum


def assert_in_alpha_set(alpha: torch.Tensor, alpha_min: float) -> None:
    assert bool(torch.isfinite(alpha).all())
    assert float(alpha.min()) >= alpha_min - 1e-9
    assert abs(float(alpha.mean()) - 1.0) <= 1e-9


# ---------------------------------------------------------------------------- config


def test_config_defaults_follow_the_spec():
    config = CatsConfig()
    assert config.name == "cats"
    assert (config.objective, config.constraint, config.source, config.parametrisation) == (
        "lookahead",
        "combined",
        "train",
        "projected",
    )
    assert (config.lr_alpha, config.lr_lambda, config.inner_steps) == (0.01, 0.1, 5)
    assert (config.rho, config.epsilon, config.alpha_min) == (0.5, None, 0.05)
    assert (config.update_every, config.warmup_steps, config.ema_decay, config.gram_decay) == (1, 200, 0.9, 0.9)
    assert (config.oscillation_warn, config.valid_sentences) == (0.2, 64)
    assert config.sketch_dim is None


@pytest.mark.parametrize(
    "field, value",
    [
        ("rho", 0.0),
        ("rho", 1.5),
        ("gram_decay", 1.0),
        ("oscillation_warn", 0.0),
        ("valid_sentences", 0),
        ("epsilon", -1.0),
        ("alpha_min", 1.0),
        ("alpha_min", -0.1),
        ("lr_alpha", 0.0),
        ("lr_lambda", -1.0),
        ("inner_steps", 0),
        ("update_every", 0),
        ("ema_decay", 1.0),
        ("sketch_dim", 0),
        ("objective", "sharpness"),
        ("no_such_option", 1),
    ],
)
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValidationError, match=field):
        CatsConfig(**{field: value})
    with pytest.raises(ValidationError, match=field):
        CATS(["a", "b"], **{field: value})


def test_overrides_are_applied_on_top_of_a_config():
    cats = CATS(["a", "b"], CatsConfig(rho=0.3, objective="loss"), warmup_steps=0)
    assert (cats.config.rho, cats.config.objective, cats.config.warmup_steps) == (0.3, "loss", 0)
    assert isinstance(cats, Balancer)


# ---------------------------------------------------------------------------- projection


def brute_force_projection(v: np.ndarray, floor: float, total: float) -> np.ndarray:
    """Enumerate which coordinates sit on the floor; keep the closest feasible candidate."""
    k = v.size
    best, best_distance = None, math.inf
    for free in itertools.product([False, True], repeat=k):
        free = np.array(free)
        if not free.any():
            candidate = np.full(k, floor)
            if abs(candidate.sum() - total) > 1e-9:
                continue
        else:
            shift = (v[free].sum() - (total - floor * (~free).sum())) / free.sum()
            candidate = np.where(free, v - shift, floor)
            if (candidate < floor - 1e-12).any():
                continue
        distance = float(((candidate - v) ** 2).sum())
        if distance < best_distance:
            best, best_distance = candidate, distance
    assert best is not None
    return best


@settings(max_examples=150, deadline=None)
@given(
    values=st.lists(st.floats(-5, 5), min_size=1, max_size=7),
    floor=st.floats(0.0, 0.95),
    slack=st.floats(0.0, 3.0),
)
def test_projection_is_the_exact_euclidean_projection(values, floor, slack):
    v = np.array(values)
    total = v.size * floor + slack
    x = project_onto_floor_simplex(torch.tensor(v), floor, total).numpy()
    assert x.min() >= floor - 1e-12 and abs(x.sum() - total) < 1e-9
    # Compared by distance: with a tiny slack two candidates can tie to rounding (v = [1, 1],
    # total 1e-8: [5e-9, 5e-9] and [0, 1e-8] are 5e-17 apart in squared distance), and the brute
    # force may keep either; the KKT conditions below pin down the point itself.
    best = brute_force_projection(v, floor, total)
    assert ((x - v) ** 2).sum() <= ((best - v) ** 2).sum() + 1e-9
    # KKT: a common shift on the free coordinates, and floor coordinates wanted to go lower.
    free = x > floor + 1e-9
    if free.any():
        shift = v[free] - x[free]
        np.testing.assert_allclose(shift, shift[0], atol=1e-9)
        assert (v[~free] - floor <= shift[0] + 1e-9).all()


def test_projection_differs_from_clamp_then_renormalise():
    v = torch.tensor([2.5, 0.5, 0.0], dtype=torch.float64)
    exact = project_onto_floor_simplex(v, 0.05, 3.0)
    clamped = v.clamp(min=0.05)
    heuristic = clamped / clamped.mean()  # leaves the third entry below the floor, too
    torch.testing.assert_close(exact, torch.tensor([2.475, 0.475, 0.05], dtype=torch.float64))
    assert not torch.allclose(exact, heuristic, atol=1e-3)
    assert float(((exact - v) ** 2).sum()) < float(((heuristic - v) ** 2).sum())


# ---------------------------------------------------------------------------- toy quadratics


def quadratic_stats(theta: torch.Tensor) -> TaskStats:
    """Two quadratic tasks on overlapping coordinates of θ ∈ R^3: "hi" is sharp (Hessian 10,
    large gradient, low loss), "lo" is flat (Hessian 0.5, small gradient, higher loss)."""
    theta = theta.detach().requires_grad_(True)
    centre_hi = torch.tensor([0.0, 0.0])
    centre_lo = torch.tensor([-2.0, -2.0])

    def task(loss_fn):
        return lambda: TaskLoss(loss_fn(theta), tokens=1)

    closures = [
        task(lambda t: 0.5 * 10.0 * (t[0:2] - centre_hi).pow(2).sum()),
        task(lambda t: 0.5 * 0.5 * (t[1:3] - centre_lo).pow(2).sum()),
    ]
    return per_task_gradients([theta], closures)


THETA = torch.tensor([0.3, 0.3, 0.0])


def segment(stats: TaskStats, alpha_min: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The set A for two tasks, α = (x, 2 − x) on a fine grid, with M̃ = M / ‖Σ g‖² (the EMA
    equals it when the gradients do not change) and c(α) = αᵀM̃α at each point."""
    gram = (stats.grads @ stats.grads.T).double()
    scaled = gram / gram.sum()
    x = torch.linspace(alpha_min, 2 - alpha_min, 400_001, dtype=torch.float64)
    alpha = torch.stack([x, 2 - x], 1)
    return alpha, scaled, torch.einsum("ni,ij,nj->n", alpha, scaled, alpha)


def relative_budget(stats: TaskStats, rho: float, alpha_min: float) -> tuple[float, float]:
    """Brute force ``c_min`` over the segment and the budget ``c_min + ρ (c(1) − c_min)``."""
    _, scaled, energy = segment(stats, alpha_min)
    least = float(energy.min())
    return least, least + rho * (float(scaled.sum()) - least)


def constrained_optimum(stats: TaskStats, objective: str, epsilon: float, alpha_min: float):
    """Brute force over the segment: the objective's minimiser subject to αᵀM̃α <= ε."""
    alpha, scaled, energy = segment(stats, alpha_min)
    if objective == "lookahead":
        value = -(alpha @ scaled.sum(1))
    else:
        value = alpha @ (stats.losses.double() / stats.losses.double().mean())
    value[energy > epsilon] = math.inf
    return alpha[int(torch.argmin(value))]


@pytest.mark.parametrize(
    "objective, parametrisation, lr_alpha, updates",
    [
        ("lookahead", "projected", 0.01, 1000),  # the defaults
        ("lookahead", "softmax", 0.05, 600),
        ("loss", "projected", 0.05, 600),
        ("loss", "softmax", 0.05, 600),
    ],
)
def test_tight_budget_binds_and_moves_weight_from_the_sharp_task(objective, parametrisation, lr_alpha, updates):
    stats = quadratic_stats(THETA)
    energy = float(stats.grads.sum(0).pow(2).sum())
    assert float(stats.losses[0]) < float(stats.losses[1])  # the sharp task has the lower loss
    cats = CATS(
        ["hi", "lo"], objective=objective, parametrisation=parametrisation, lr_alpha=lr_alpha, warmup_steps=0
    )
    for _ in range(updates):
        cats.combine(stats)
    alpha = cats.alpha
    logged = cats.log_values()
    least, epsilon = relative_budget(stats, 0.5, 0.05)
    assert least < epsilon < 1.0  # reachable, and below the unscaled energy c(1) = 1
    assert logged["cats/least_energy"] == pytest.approx(least, abs=1e-9)
    assert logged["cats/uniform_energy"] == pytest.approx(1.0, abs=1e-12)
    assert logged["cats/epsilon"] == pytest.approx(epsilon, abs=1e-9)
    assert logged["cats/constraint"] == pytest.approx(epsilon, abs=1e-4)  # αᵀM̃α ≈ ε̃
    assert cats.lam > 0 and logged["cats/active"] == 1.0
    assert float(alpha[0]) < 1.0 < float(alpha[1])
    expected = constrained_optimum(stats, objective, epsilon, 0.05)
    torch.testing.assert_close(alpha, expected, atol=2e-4, rtol=0)


def test_absolute_epsilon_gives_the_same_optimum_as_the_equivalent_rho():
    stats = quadratic_stats(THETA)
    energy = float(stats.grads.sum(0).pow(2).sum())
    _, epsilon = relative_budget(stats, 0.5, 0.05)
    by_rho = CATS(["hi", "lo"], warmup_steps=0, lr_alpha=0.05)
    by_epsilon = CATS(["hi", "lo"], warmup_steps=0, lr_alpha=0.05, epsilon=epsilon * energy)
    for _ in range(300):
        by_rho.combine(stats)
        by_epsilon.combine(stats)
    torch.testing.assert_close(by_rho.alpha, by_epsilon.alpha, atol=1e-6, rtol=0)
    assert by_epsilon.log_values()["cats/epsilon"] == pytest.approx(epsilon, rel=1e-6)


@pytest.mark.parametrize("objective", ["lookahead", "loss"])
def test_huge_budget_leaves_lambda_at_zero_and_alpha_follows_the_objective(objective):
    stats = quadratic_stats(THETA)
    energy = float(stats.grads.sum(0).pow(2).sum())
    cats = CATS(["hi", "lo"], objective=objective, epsilon=1e6 * energy, warmup_steps=0)
    with pytest.warns(CatsCollapseWarning):  # sitting on a vertex of A for long is reported
        for _ in range(300):
            cats.combine(stats)
    assert cats.lam == 0.0 and cats.log_values()["cats/active"] == 0.0
    # Unconstrained, the linear objective is minimised at a vertex of A: for lookahead the task
    # with the larger (M1)_i, for loss the task with the lower L_i — here both are "hi".
    expected = constrained_optimum(stats, objective, math.inf, 0.05)
    torch.testing.assert_close(expected, torch.tensor([1.95, 0.05], dtype=torch.float64))
    torch.testing.assert_close(cats.alpha, expected, atol=1e-9, rtol=0)


# ---------------------------------------------------------------------------- a budget it can meet


def least_energy_by_active_sets(matrix: np.ndarray, floor: float, total: float) -> float:
    """Brute force: for every set of coordinates held at the floor, the equality-constrained
    minimum of αᵀCα on the others (a KKT solve); the least energy over the feasible ones."""
    k = matrix.shape[0]
    best = math.inf
    for held in itertools.product([False, True], repeat=k):
        free = [i for i in range(k) if not held[i]]
        if not free:
            continue
        alpha = np.full(k, floor)
        rest = total - floor * (k - len(free))
        n = len(free)
        kkt = np.zeros((n + 1, n + 1))
        kkt[:n, :n] = 2 * matrix[np.ix_(free, free)]
        kkt[:n, n] = kkt[n, :n] = 1.0
        rhs = np.append(-2 * matrix[np.ix_(free, [i for i in range(k) if held[i]])].sum(1) * floor, rest)
        alpha[free] = np.linalg.lstsq(kkt, rhs, rcond=None)[0][:n]
        if alpha.min() >= floor - 1e-9:
            best = min(best, float(alpha @ matrix @ alpha))
    return best


@settings(max_examples=150, deadline=None)
@given(
    st.integers(1, 5).flatmap(
        lambda k: st.tuples(
            st.lists(st.floats(-3, 3), min_size=k * 3, max_size=k * 3).map(lambda v: np.array(v).reshape(k, 3)),
            st.floats(0.0, 0.9),
        )
    )
)
def test_least_energy_weights_are_the_minimum_over_the_alpha_set(problem):
    rows, floor = problem
    k = rows.shape[0]
    matrix = rows @ rows.T  # PSD, often singular (rank <= 3)
    alpha = least_energy_weights(matrix, floor, float(k))
    assert alpha.min() >= floor - 1e-12 and alpha.sum() == pytest.approx(k, abs=1e-9)
    value = float(alpha @ matrix @ alpha)
    assert value <= least_energy_by_active_sets(matrix, floor, float(k)) + 1e-9 * (1 + np.abs(matrix).max())
    # Never above what equal weights reach (the starting point of the method).
    assert value <= float(np.ones(k) @ matrix @ np.ones(k)) + 1e-9


def settling(cats: CATS, next_stats, updates: int) -> tuple[float, float]:
    """Run ``updates`` combine steps; the largest λ seen and the mean of max_i |Δα_i| over the
    last 200 updates."""
    lams, alphas = [], []
    for step in range(updates):
        cats.combine(next_stats(step))
        lams.append(cats.lam)
        alphas.append(cats.alpha.numpy())
    moves = np.abs(np.diff(np.array(alphas), axis=0)).max(axis=1)
    return max(lams), float(moves[-200:].mean())


def noisy_stats(means: np.ndarray, noise: float, seed: int, tokens=None):
    generator = np.random.default_rng(seed)
    k = len(means)
    counts = torch.ones(k) if tokens is None else torch.tensor(tokens)

    def stats(step: int) -> TaskStats:
        grads = means + noise * generator.standard_normal(means.shape) * np.linalg.norm(means, axis=1, keepdims=True)
        return TaskStats(torch.ones(k), counts, torch.tensor(grads))

    return stats


# Before the reachable budget (ε̃ = ρ, unreachable when tasks carry similar energy), λ grew
# linearly in all four (to 1.9e3-7.4e3 after 6,000-8,000 updates) and α flipped between the floor
# and its maximum every update (benchmarks/cats_budget.py).
@pytest.mark.parametrize(
    "case",
    ["fixed diag(4,1)", "two equal noisy tasks", "K=4 T=5-like shares", "noisy SGD on quadratics"],
)
def test_lambda_stays_bounded_and_alpha_settles_when_tasks_carry_similar_energy(case):
    if case == "fixed diag(4,1)":
        rows = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
        lam, move = settling(CATS(["hi", "lo"], warmup_steps=0), lambda step: TaskStats(torch.ones(2), torch.ones(2), rows), 2000)
    elif case == "two equal noisy tasks":
        lam, move = settling(CATS(["a", "b"], warmup_steps=0), noisy_stats(np.eye(2, 32), 0.3, 1), 2000)
    elif case == "K=4 T=5-like shares":
        shares = np.array([0.316, 0.316, 0.184, 0.184])
        directions = np.random.default_rng(2).standard_normal((4, 64))
        means = shares[:, None] * directions / np.linalg.norm(directions, axis=1, keepdims=True)
        lam, move = settling(CATS(list("abcd"), warmup_steps=0), noisy_stats(means, 0.3, 3, shares), 2000)
    else:
        sharp, flat, centre = np.diag([9.0, 1.0]), np.diag([1.0, 1.5]), np.array([1.0, 1.0])
        generator = np.random.default_rng(4)
        state = {"theta": np.array([2.0, -1.0])}
        cats = CATS(["sharp", "flat"], warmup_steps=0)

        def stats(step: int) -> TaskStats:
            theta = state["theta"]
            noise = 0.3 * np.sqrt(np.stack([np.diag(sharp), np.diag(flat)])) * generator.standard_normal((2, 2))
            grads = np.stack([sharp @ theta, flat @ (theta - centre)]) + noise
            state["theta"] = theta - 0.02 * (cats.alpha.numpy() @ grads)  # α of this step, as combine returns it
            return TaskStats(torch.ones(2), torch.ones(2), torch.tensor(grads))

        lam, move = settling(cats, stats, 2000)
    assert lam < 5.0
    assert move < 0.01


def test_the_fixed_two_task_budget_meets_its_analytic_optimum():
    """Gram diag(4, 1): M̃ = diag(.8, .2); least energy at α = (.4, 1.6), c_min = .64; ρ = .5 gives
    ε̃ = .82 and lookahead's optimum where 0.8a² + 0.2b² = .82, a + b = 2: b = 1.6 − √.18."""
    rows = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    cats = CATS(["hi", "lo"], warmup_steps=0)
    for _ in range(3000):
        cats.combine(TaskStats(torch.ones(2), torch.ones(2), rows))
    logged = cats.log_values()
    assert logged["cats/least_energy"] == pytest.approx(0.64, abs=1e-12)
    assert logged["cats/epsilon"] == pytest.approx(0.82, abs=1e-12)
    b = (3.2 - math.sqrt(3.2**2 - 4 * 2.38)) / 2
    torch.testing.assert_close(cats.alpha, torch.tensor([2 - b, b], dtype=torch.float64), atol=1e-6, rtol=0)


def test_a_zero_gradient_first_batch_does_not_set_the_energy_scale():
    grads = torch.tensor([[2.0, 0.0, 1.0], [0.0, 1.0, 0.5], [1.0, 1.0, 0.0]], dtype=torch.float64)
    stats = TaskStats(torch.tensor([1.0, 2.0, 1.5]), torch.ones(3), grads)
    zero = TaskStats(torch.tensor([1.0, 2.0, 1.5]), torch.ones(3), torch.zeros(3, 3, dtype=torch.float64))
    after_zero = CATS(list("abc"), warmup_steps=0, lr_alpha=0.05)
    clean = CATS(list("abc"), warmup_steps=0, lr_alpha=0.05)
    after_zero.combine(zero)
    assert after_zero.alpha.tolist() == [1.0, 1.0, 1.0] and after_zero.lam == 0.0
    for _ in range(5):
        after_zero.combine(stats)
        clean.combine(stats)
    torch.testing.assert_close(after_zero.alpha, clean.alpha, atol=1e-12, rtol=0)
    assert after_zero.lam == pytest.approx(clean.lam, abs=1e-12)
    assert after_zero.log_values()["cats/grad_sq_ema"] == pytest.approx(float(grads.sum(0).pow(2).sum()))


def test_oscillation_is_reported():
    rows = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    cats = CATS(["hi", "lo"], warmup_steps=0, lr_alpha=3.0, lr_lambda=20.0, inner_steps=1, floor_warn_steps=1000)
    with pytest.warns(CatsOscillationWarning, match="oscillating"):
        for _ in range(40):
            cats.combine(TaskStats(torch.ones(2), torch.ones(2), rows))
    logged = cats.log_values()
    assert logged["cats/oscillation_warning"] == 1.0 and logged["cats/alpha_move"] > 0.2
    calm = CATS(["hi", "lo"], warmup_steps=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CatsOscillationWarning)
        for _ in range(40):
            calm.combine(TaskStats(torch.ones(2), torch.ones(2), rows))
    assert calm.log_values()["cats/oscillation_warning"] == 0.0


def test_an_absolute_budget_below_the_least_energy_is_reported():
    rows = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)  # energy 5, least 0.64 · 5 = 3.2
    with pytest.warns(CatsBudgetWarning, match="below the least"):
        cats = CATS(["hi", "lo"], warmup_steps=0, epsilon=3.0)
        cats.combine(TaskStats(torch.ones(2), torch.ones(2), rows))
    with warnings.catch_warnings():
        warnings.simplefilter("error", CatsBudgetWarning)
        CATS(["hi", "lo"], warmup_steps=0, epsilon=3.5).combine(TaskStats(torch.ones(2), torch.ones(2), rows))


def test_non_finite_steps_are_not_counted_by_the_schedule():
    rows = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    good = TaskStats(torch.ones(2), torch.ones(2), rows)
    bad_loss = TaskStats(torch.tensor([1.0, math.nan]), torch.ones(2), rows)
    bad_grad = TaskStats(torch.ones(2), torch.ones(2), rows * math.nan)
    cats = CATS(["a", "b"], warmup_steps=2, update_every=2)
    for stats in [good, bad_loss, good, bad_grad, good]:
        cats.combine(stats)
    cats.observe_losses(torch.tensor([math.inf, 1.0]), torch.ones(2))
    cats.observe_losses(torch.ones(2), torch.ones(2))
    assert cats.steps == 4  # the three finite combine steps and the finite weighted one
    assert cats.log_values()["cats/updates"] == 1.0  # step index 2, the third finite step


# ---------------------------------------------------------------------------- invariants


@st.composite
def cats_problems(draw):
    k = draw(st.integers(1, 6))
    rank = draw(st.integers(1, 4))
    x = np.array(draw(st.lists(st.floats(-5, 5), min_size=k * rank, max_size=k * rank))).reshape(k, rank)
    zero_rows = draw(st.lists(st.booleans(), min_size=k, max_size=k))
    x[np.array(zero_rows)] = 0.0
    if k >= 2 and draw(st.booleans()):
        x[1] = x[0]  # identical tasks
    losses = np.array(draw(st.lists(st.floats(0, 10), min_size=k, max_size=k)))
    present = np.array(draw(st.lists(st.booleans(), min_size=k, max_size=k)))
    config = dict(
        objective=draw(st.sampled_from(["lookahead", "loss"])),
        constraint=draw(st.sampled_from(["combined", "per_task", "hvp"])),
        parametrisation=draw(st.sampled_from(["projected", "softmax"])),
        alpha_min=draw(st.floats(0.0, 0.9)),
        rho=draw(st.floats(0.01, 1)),
        lr_alpha=draw(st.floats(1e-3, 2.0)),
        lr_lambda=draw(st.floats(1e-3, 10.0)),
        inner_steps=draw(st.integers(1, 5)),
        warmup_steps=0,
    )
    curvature = draw(st.floats(-1.0, 10.0))
    updates = draw(st.integers(1, 6))
    return k, x @ x.T, losses, present, config, curvature, updates


@settings(max_examples=200, deadline=None)
@given(cats_problems())
def test_alpha_stays_in_the_set_lambda_nonnegative_and_finite(problem):
    k, gram, losses, present, config, curvature, updates = problem
    cats = CATS([f"t{i}" for i in range(k)], **config)
    before = cats.alpha
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CatsCollapseWarning)
        for _ in range(updates):
            alpha = cats.update(
                torch.tensor(losses), torch.tensor(gram), present=torch.tensor(present), curvature=curvature
            )
            assert_in_alpha_set(alpha, config["alpha_min"])
            assert cats.lam >= 0 and math.isfinite(cats.lam)
            assert all(math.isfinite(v) for v in cats.log_values().values())
    # Absent tasks keep their α; with fewer than two tasks present nothing moves.
    torch.testing.assert_close(cats.alpha[~torch.tensor(present)], before[~torch.tensor(present)])
    if present.sum() < 2:
        torch.testing.assert_close(cats.alpha, before)
    if k == 1:
        assert cats.alpha.tolist() == [1.0]


def test_single_task_keeps_alpha_one_and_returns_its_gradient():
    cats = CATS(["only"], warmup_steps=0)
    grads = torch.randn(1, 7)
    for _ in range(5):
        direction = cats.combine(TaskStats(torch.tensor([2.0]), torch.tensor([3.0]), grads))
    assert cats.alpha.tolist() == [1.0]
    torch.testing.assert_close(direction, grads[0])


def test_non_finite_statistics_are_skipped_and_counted():
    cats = CATS(["a", "b", "c"], warmup_steps=0, objective="loss")
    good = torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 3.0]])
    cats.update(torch.tensor([1.0, 2.0, 3.0]), good)
    alpha = cats.alpha
    cats.update(torch.tensor([1.0, 2.0, 3.0]), good * float("nan"))
    cats.update(torch.tensor([1.0, float("inf"), 3.0]), good)
    grads = torch.randn(3, 5)
    grads[1, 2] = float("nan")
    cats.combine(TaskStats(torch.ones(3), torch.ones(3), grads))
    torch.testing.assert_close(cats.alpha, alpha)
    assert cats.log_values()["cats/skipped_nonfinite"] == 3.0


def test_absent_task_keeps_alpha_and_does_not_break_the_update():
    cats = CATS(["a", "b", "c"], warmup_steps=0, lr_alpha=0.1)
    grads = torch.randn(3, 6)
    grads[2] = 0.0
    stats = TaskStats(torch.tensor([1.0, 2.0, 0.0]), torch.tensor([5.0, 3.0, 0.0]), grads)
    for _ in range(50):
        cats.combine(stats)
    alpha = cats.alpha
    assert alpha[2] == 1.0 and alpha[0] != 1.0
    assert_in_alpha_set(alpha, 0.05)


# ---------------------------------------------------------------------------- gradients


class TinyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))

    def forward(self, x):
        return self.net(x)


def token_losses(model, inputs, targets):
    return (model(inputs) - targets).pow(2).sum(1)  # one "token" loss per row


def make_batches(sizes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 3, generator=generator), torch.randn(n, 2, generator=generator)) for n in sizes]


def closures_for(model, batches, present):
    total = sum(len(x) for (x, _), here in zip(batches, present) if here)

    def closure(x, y):
        def run():
            per_token = token_losses(model, x, y)
            return TaskLoss(per_token.sum() / total, mean=float(per_token.detach().mean()), tokens=len(x))

        return run

    return [closure(x, y) if here else None for (x, y), here in zip(batches, present)], total


@pytest.mark.parametrize("present", [(True, True, True), (True, False, True)])
def test_training_gradient_equals_autograd_of_the_alpha_weighted_loss(present):
    torch.manual_seed(0)
    model = TinyModel()
    batches = make_batches([7, 3, 2])
    cats = CATS(["de", "sw", "tl"], warmup_steps=1, lr_alpha=0.5)
    for _ in range(4):  # move α away from 1 first
        model.zero_grad()
        closures, _ = closures_for(model, batches, (True, True, True))
        backward_per_task(model.parameters(), closures, cats)
    model.zero_grad()
    closures, total = closures_for(model, batches, present)
    backward_per_task(model.parameters(), closures, cats)
    alpha = cats.alpha.float()
    assert not torch.allclose(alpha, torch.ones(3))
    got = [p.grad.clone() for p in model.parameters()]

    weighted = sum(
        alpha[i] * token_losses(model, x, y).sum() / total
        for i, ((x, y), here) in enumerate(zip(batches, present))
        if here
    )
    expected = torch.autograd.grad(weighted, list(model.parameters()))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-5)


def test_per_task_gradients_follow_the_parameters_dtype_and_never_go_below_float32():
    theta = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    third = 1 / 3  # not representable in float32: a float32 matrix would round it
    stats = per_task_gradients([theta], [lambda: (theta**2).sum(), None, lambda: third * theta.sum()])
    assert stats.grads.dtype == torch.float64
    torch.testing.assert_close(stats.grads, torch.tensor([[2.0, -4.0], [0.0, 0.0], [third, third]], dtype=torch.float64),
                               atol=0, rtol=0)
    assert theta.grad is None
    # Mixed dtypes: the widest wins and the narrower parameter goes through a copy.
    weight = torch.tensor([0.5], dtype=torch.bfloat16, requires_grad=True)
    mixed = per_task_gradients([theta, weight], [lambda: third * theta.sum() + weight.float().sum() * 2])
    assert mixed.grads.dtype == torch.float64
    torch.testing.assert_close(mixed.grads, torch.tensor([[third, third, 2.0]], dtype=torch.float64), atol=0, rtol=0)
    assert per_task_gradients([weight], [lambda: weight.float().sum()]).grads.dtype == torch.float32


def test_per_task_sub_batch_gradients_sum_to_the_full_batch_gradient():
    torch.manual_seed(1)
    model = TinyModel()
    batches = make_batches([6, 4, 1], seed=3)
    closures, total = closures_for(model, batches, (True, True, True))
    stats = per_task_gradients(list(model.parameters()), closures)
    inputs = torch.cat([x for x, _ in batches])
    targets = torch.cat([y for _, y in batches])
    full = torch.autograd.grad(token_losses(model, inputs, targets).sum() / total, list(model.parameters()))
    torch.testing.assert_close(stats.grads.sum(0), torch.cat([g.reshape(-1) for g in full]), atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------- schedule and sources


def test_alpha_stays_during_warmup_and_between_updates():
    cats = CATS(["a", "b"], warmup_steps=3, update_every=2, lr_alpha=0.1)
    stats = TaskStats(torch.ones(2), torch.ones(2), torch.tensor([[3.0, 0.0], [0.0, 1.0]]))
    trajectory = []
    for _ in range(8):
        cats.combine(stats)
        trajectory.append(cats.alpha.clone())
    assert all(torch.equal(a, torch.ones(2, dtype=torch.float64)) for a in trajectory[:3])
    changed = [not torch.equal(trajectory[i], trajectory[i - 1]) for i in range(1, 8)]
    assert changed == [False, False, True, False, True, False, True]  # steps 3, 5, 7 update
    assert cats.log_values()["cats/updates"] == 3.0 and cats.steps == 8


def test_step_api_follows_the_same_schedule_as_combine():
    grads = torch.tensor([[3.0, 1.0], [0.0, 1.0]])
    by_combine = CATS(["a", "b"], warmup_steps=2, update_every=3)
    by_step = CATS(["a", "b"], warmup_steps=2, update_every=3)
    for _ in range(12):
        by_combine.combine(TaskStats(torch.tensor([1.0, 2.0]), torch.ones(2), grads))
        by_step.step(torch.tensor([1.0, 2.0]), grads @ grads.T)
    torch.testing.assert_close(by_combine.alpha, by_step.alpha, atol=1e-12, rtol=0)


def test_valid_source_updates_only_through_observe_validation():
    cats = CATS(["a", "b"], source="valid", warmup_steps=2, update_every=2, lr_alpha=0.1)
    assert not any(cats.plan(u).task_gradients for u in range(7))
    assert [cats.plan(u).validation for u in range(7)] == [False, False, True, False, True, False, True]
    train = TaskStats(torch.ones(2), torch.ones(2), torch.tensor([[1.0, 0.0], [0.0, 5.0]]))
    cats.combine(train)
    assert cats.alpha.tolist() == [1.0, 1.0]  # combine only applies α
    valid = TaskStats(torch.ones(2), torch.ones(2), torch.tensor([[4.0, 0.0], [0.0, 1.0]]))
    for _ in range(100):
        cats.observe_validation(valid)
    alpha = cats.alpha
    assert float(alpha[0]) < 1.0  # the large-gradient task on the *validation* batch lost weight
    torch.testing.assert_close(cats.loss_weights(), alpha.float())
    torch.testing.assert_close(cats.combine(train), alpha.float() @ train.grads)
    assert not CATS(["a", "b"], warmup_steps=0).plan(0).validation


def test_the_plan_asks_for_task_gradients_in_warm_up_and_on_alpha_updates_and_a_probe_only_then():
    cats = CATS(["a", "b"], warmup_steps=2, update_every=3, constraint="hvp")
    stats = TaskStats(torch.ones(2), torch.ones(2), torch.eye(2), curvature=lambda d: 1.0)
    plans = []
    for _ in range(9):
        plans.append(cats.plan(0))
        if plans[-1].task_gradients:
            cats.combine(stats)
        else:
            cats.observe_losses(torch.ones(2), torch.ones(2))
    assert [p.task_gradients for p in plans] == [True, True, True, False, False, True, False, False, True]
    assert [p.curvature for p in plans] == [False, False, True, False, False, True, False, False, True]
    assert not CATS(["a", "b"], warmup_steps=0).plan(0).curvature


# ---------------------------------------------------------------------------- hvp constraint


def test_hvp_without_a_probe_is_a_clear_error():
    cats = CATS(["a", "b"], constraint="hvp", warmup_steps=0)
    stats = TaskStats(torch.ones(2), torch.ones(2), torch.eye(2))
    with pytest.raises(CurvatureProbeMissing, match="curvature probe"):
        cats.combine(stats)
    with pytest.raises(CurvatureProbeMissing, match="curvature"):
        cats.update(torch.ones(2), torch.eye(2))


def test_hvp_with_constant_curvature_is_the_combined_constraint():
    seen = []

    def probe(direction):
        seen.append(direction.clone())
        return 3.0

    hvp = CATS(["a", "b", "c"], constraint="hvp", warmup_steps=0)
    combined = CATS(["a", "b", "c"], constraint="combined", warmup_steps=0)
    grads = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    stats = TaskStats(torch.tensor([1.0, 2.0, 3.0]), torch.ones(3), grads, curvature=probe)
    for _ in range(20):
        alpha_before = hvp.alpha.float()
        hvp.combine(stats)
        combined.combine(stats)
        torch.testing.assert_close(seen[-1], alpha_before @ grads)  # probed at the current d
    torch.testing.assert_close(hvp.alpha, combined.alpha, atol=1e-12, rtol=0)
    logged = hvp.log_values()
    assert logged["cats/curvature"] == 3.0 and logged["cats/curvature_scale"] == pytest.approx(1.0, abs=1e-12)


def test_hvp_sharper_step_tightens_the_budget():
    gram = torch.tensor([[9.0, 0.0], [0.0, 1.0]])
    flat = CATS(["a", "b"], constraint="hvp", warmup_steps=0, ema_decay=0.99)
    sharp = CATS(["a", "b"], constraint="hvp", warmup_steps=0, ema_decay=0.99)
    for step in range(100):
        flat.update(torch.ones(2), gram, curvature=1.0)
        sharp.update(torch.ones(2), gram, curvature=1.0 if step < 10 else 2.0)
    assert sharp.log_values()["cats/curvature_scale"] > 1.0
    assert float(sharp.alpha[0]) < float(flat.alpha[0])  # even less weight on the sharp task


@pytest.mark.parametrize("columns", [5, 2 * GRAM_CHUNK, 3 * GRAM_CHUNK + 17])
def test_chunked_gram_matrix_and_weighted_sum_match_the_float64_products(columns):
    # Less than a chunk (only the tail), a whole number of chunks (no tail), chunks and a tail;
    # a column slice of a wider matrix (rows strided like TaskSplit's blocks) as well.
    wide = correlated_gradients(k=3, p=columns + 40)
    weights = torch.tensor([0.5, 1.25, -2.0], dtype=torch.float64)
    for rows in (wide[:, :columns].contiguous(), wide[:, 40:]):
        exact = rows.double() @ rows.double().T
        got = gram_matrix(rows)
        assert got.dtype == torch.float64 and got.device.type == "cpu"
        torch.testing.assert_close(got, exact, rtol=1e-6, atol=0)
        direction = weighted_sum(weights, rows)
        assert direction.dtype == rows.dtype and direction.shape == (columns,)
        torch.testing.assert_close(direction.double(), weights @ rows.double(), rtol=1e-5, atol=1e-5)
    assert torch.equal(gram_matrix(torch.zeros(2, columns)), torch.zeros(2, 2, dtype=torch.float64))


# ---------------------------------------------------------------------------- sketch


def correlated_gradients(k=4, p=3000, seed=12345):  # not a sketch seed: R must not be built from g
    generator = torch.Generator().manual_seed(seed)
    shared = torch.randn(p, generator=generator)
    return torch.stack([(i + 1) * shared + 2 * torch.randn(p, generator=generator) for i in range(k)])


def test_sketched_gram_is_within_its_documented_error():
    grads = correlated_gradients()
    exact = (grads @ grads.T).double()
    norms = exact.diagonal().sqrt()
    m = 256
    delta = sketch_error_bound(m, 4, failure_probability=1e-3)
    assert 0 < delta < 0.6
    standardised = []
    for seed in range(10):
        cats = CATS(["a", "b", "c", "d"], sketch_dim=m, sketch_seed=seed)
        sketched = cats.gram(grads)
        error = sketched - exact
        # High-probability bound: |M̂_ij − M_ij| <= δ ‖g_i‖ ‖g_j‖ for every entry.
        assert bool((error.abs() <= delta * torch.outer(norms, norms)).all())
        # Unbiased with variance (M_ij² + M_ii M_jj) / m.
        std = ((exact**2 + torch.outer(exact.diagonal(), exact.diagonal())) / m).sqrt()
        upper = torch.triu_indices(4, 4)
        standardised.append((error / std)[upper[0], upper[1]])
    z = torch.cat(standardised)
    assert abs(float(z.mean())) < 0.35
    assert 0.7 < float(z.pow(2).mean().sqrt()) < 1.3


def test_sketch_is_seeded_linear_and_row_wise():
    grads = correlated_gradients(k=3, p=500)
    cats = CATS(["a", "b", "c"], sketch_dim=32, sketch_seed=7)
    once = cats.sketch(grads)
    torch.testing.assert_close(once, cats.sketch(grads), atol=0, rtol=0)
    close = dict(rtol=1e-5, atol=1e-4)  # float32 matmuls in a different order
    torch.testing.assert_close(cats.sketch(grads[1]), once[1], **close)
    torch.testing.assert_close(cats.sketch(grads[0] + 2 * grads[2]), once[0] + 2 * once[2], **close)
    other = CATS(["a", "b", "c"], sketch_dim=32, sketch_seed=8).sketch(grads)
    assert not torch.allclose(once, other)
    torch.testing.assert_close(cats.gram(grads), once @ once.T)


# ---------------------------------------------------------------------------- state


def random_stats(step, k=3, p=10, curvature=None):
    generator = torch.Generator().manual_seed(step)
    grads = torch.randn(k, p, generator=generator) * torch.tensor([3.0, 1.0, 0.5]).unsqueeze(1)
    tokens = torch.tensor([5.0, 0.0 if step % 4 == 0 else 2.0, 1.0])
    grads[tokens == 0] = 0
    losses = torch.rand(k, generator=generator) * 3 * (tokens > 0)
    return TaskStats(losses, tokens, grads, curvature)


@pytest.mark.parametrize(
    "options",
    [
        dict(objective="loss", warmup_steps=3, update_every=2, floor_warn_steps=3, lr_alpha=0.3),
        dict(parametrisation="softmax", constraint="hvp", warmup_steps=1, sketch_dim=6, sketch_seed=5),
        dict(constraint="per_task", epsilon=2.0, warmup_steps=0, lr_alpha=0.1),
    ],
)
def test_state_round_trip_gives_identical_trajectories(options):
    def probe(direction):
        return float(direction.abs().sum()) + 1.0

    def make():
        return CATS(["a", "b", "c"], **options)

    original = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CatsCollapseWarning)
        for step in range(12):
            original.combine(random_stats(step, curvature=probe))
        buffer = io.BytesIO()
        torch.save(original.state_dict(), buffer)
        buffer.seek(0)
        state = torch.load(buffer, weights_only=True)
        assert all(isinstance(v, (torch.Tensor, float, int)) for v in state.values())
        resumed = make()
        resumed.load_state_dict(state)
        assert resumed.log_values() == original.log_values()
        for step in range(12, 30):
            a = original.combine(random_stats(step, curvature=probe))
            b = resumed.combine(random_stats(step, curvature=probe))
            assert torch.equal(a, b)
            assert torch.equal(original.alpha, resumed.alpha)
            assert original.lam == resumed.lam
    assert original.log_values() == resumed.log_values()
    assert original.log_values()["cats/updates"] > 5


def test_load_state_rejects_a_different_task_count():
    state = CATS(["a", "b"]).state_dict()
    with pytest.raises(ValueError, match="alpha"):
        CATS(["a", "b", "c"]).load_state_dict(state)


# ---------------------------------------------------------------------------- collapse


def train_toy(objective, updates=120):
    """Two tasks ½‖θ − c_i‖²; θ starts nearer c_0, so task 0 has the lower loss."""
    centres = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    theta = torch.tensor([0.8, 0.2])
    cats = CATS(["hi", "lo"], objective=objective, warmup_steps=0, floor_warn_steps=20)
    for _ in range(updates):
        grads = theta - centres  # g_i = θ − c_i (per-task contribution, one token each)
        losses = 0.5 * grads.pow(2).sum(1)
        direction = cats.combine(TaskStats(losses, torch.ones(2), grads))
        theta = theta - 0.1 * direction
    return cats


def test_loss_objective_collapses_to_the_floor_and_warns():
    with pytest.warns(CatsCollapseWarning, match="alpha/lo"):
        cats = train_toy("loss")
    logged = cats.log_values()
    assert logged["alpha/lo"] == pytest.approx(0.05)
    assert logged["cats/floor_warning"] == 1.0 and logged["cats/on_floor"] == 1.0
    assert logged["cats/floor_streak"] >= 20 and logged["cats/floor_updates"] >= 20


# ---------------------------------------------------------------------------- logging and docs


def test_log_values_report_alpha_lambda_and_the_constraint():
    cats = CATS(["de-en", "sw-en"], warmup_steps=0)
    cats.update(torch.ones(2), torch.tensor([[4.0, 1.0], [1.0, 1.0]]))
    logged = cats.log_values()
    for key in [
        "alpha/de-en",
        "alpha/sw-en",
        "lambda",
        "cats/constraint",
        "cats/epsilon",
        "cats/active",
        "cats/on_floor",
        "cats/floor_streak",
        "cats/floor_updates",
        "cats/floor_warning",
        "cats/skipped_nonfinite",
    ]:
        assert isinstance(logged[key], float), key
    assert logged["cats/uniform_energy"] == pytest.approx(1.0)
    assert logged["cats/epsilon"] == pytest.approx(
        logged["cats/least_energy"] + 0.5 * (logged["cats/uniform_energy"] - logged["cats/least_energy"])
    )


def test_module_docstring_examples_run():
    result = doctest.testmod(cats_module)
    assert result.attempted > 0 and result.failed == 0
