"""Peer balancers: torchjd aggregators (PCGrad, MGDA, CAGrad, NashMTL, UPGrad, GradDrop, IMTL-G,
Aligned-MTL), our GradVac, χ²-DRO. Each is checked on small fixed gradients against a hand
answer or its reference formula, by a short synthetic training run that lowers every task's
loss, and through the config → build_balancer → trainer path."""

from __future__ import annotations

import io
import json
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from scipy.optimize import minimize
from torch import nn

from polycats.balance import Balancer, TaskLoss, TaskStats, backward_per_task
from polycats.balance.dro import ChiSquareDRO, chi2_divergence, chi2_worst_case
from polycats.balance.gradvac import GradVac, vaccinate
from polycats.balance.torchjd_peers import TorchJDBalancer, build_aggregator, pair_statistics
from polycats.balancer_config import (
    PEER_CONFIGS,
    AlignedMTLConfig,
    CAGradConfig,
    DROConfig,
    GradDropConfig,
    GradVacConfig,
    IMTLGConfig,
    MGDAConfig,
    NashMTLConfig,
    PCGradConfig,
    UPGradConfig,
)
from polycats.config import config_from_dict
from polycats.errors import PolycatsError

TASKS3 = ["de-en", "sw-en", "tl-en"]


def stats_for(grads: torch.Tensor, tokens=None) -> TaskStats:
    k = grads.shape[0]
    tokens = torch.ones(k) if tokens is None else torch.as_tensor(tokens, dtype=torch.float32)
    return TaskStats(losses=torch.ones(k), tokens=tokens, grads=grads)


def weights_of(balancer) -> torch.Tensor:
    logged = balancer.log_values()
    return torch.tensor([logged[f"weight/{t}"] for t in balancer.tasks if f"weight/{t}" in logged], dtype=torch.float64)


def random_rows(k: int, p: int, seed: int) -> torch.Tensor:
    return torch.randn(k, p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "name, options",
    [("pcgrad", {}), ("mgda", {"epsilon": 1e-4}), ("cagrad", {"c": 0.2}), ("nashmtl", {"max_norm": 0}),
     ("upgrad", {"preference": {"de": 2}}), ("graddrop", {"leak": 0.5}), ("imtlg", {}),
     ("alignedmtl", {"scale_mode": "rmse"}), ("gradvac", {"grouping": "per_tensor"}), ("dro", {"rho": 0.3})],
)
def test_every_peer_is_one_config_line_away(name, options):
    from polycats.run.build import build_balancer

    config = config_from_dict({
        "data": {"source": "synthetic", "languages": {"de": 100, "sw": 10}},
        "balancer": {"name": name, **options},
    })
    balancer = build_balancer(config, ["de-en", "sw-en"], np.array([0.9, 0.1]))
    assert isinstance(balancer, Balancer)
    assert balancer.plan(0).task_gradients == (name != "dro")
    for key, value in options.items():
        assert getattr(config.balancer, key) == value
    with pytest.raises(PolycatsError, match="unknown field"):
        config_from_dict({"data": {"source": "synthetic", "languages": {"de": 1}}, "balancer": {"name": name, "bogus": 1}})


def test_dro_without_probabilities_and_unknown_preference_are_clear_errors():
    from polycats.run.build import build_balancer

    data = {"source": "synthetic", "languages": {"de": 100, "sw": 10}}
    with pytest.raises(PolycatsError, match="sampling probabilities"):
        build_balancer(config_from_dict({"data": data, "balancer": {"name": "dro"}}), ["de-en", "sw-en"])
    with pytest.raises(PolycatsError, match="xx"):
        build_balancer(config_from_dict({"data": data, "balancer": {"name": "upgrad", "preference": {"xx": 1}}}),
                       ["de-en", "sw-en"])
    with pytest.raises(ValidationError):
        CAGradConfig(c=-1)
    with pytest.raises(ValidationError):
        DROConfig(rho=0)


# ---------------------------------------------------------------------------- torchjd peers: reference answers


def test_pcgrad_removes_the_conflicting_component_by_hand():
    grads = torch.tensor([[1.0, 1.0], [-1.0, 0.0]])  # g1·g2 = -1 < 0
    balancer = TorchJDBalancer(["a", "b"], PCGradConfig())
    direction = balancer.combine(stats_for(grads))
    # g1' = g1 - (g1·g2/|g2|²) g2 = [0, 1];  g2' = g2 - (g2·g1/|g1|²) g1 = [-0.5, 0.5]
    torch.testing.assert_close(direction, torch.tensor([-0.5, 1.5]))
    torch.testing.assert_close(weights_of(balancer), torch.tensor([1.5, 2.0], dtype=torch.float64))
    assert balancer.log_values()["peer/conflicts"] == 1.0


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000))
def test_pcgrad_result_never_conflicts_with_either_task_for_two_tasks(seed):
    grads = random_rows(2, 5, seed)
    direction = TorchJDBalancer(["a", "b"], PCGradConfig()).combine(stats_for(grads))
    assert bool((grads @ direction >= -1e-9).all())
    if float(grads[0] @ grads[1]) >= 0:  # no conflict: plain sum
        torch.testing.assert_close(direction, grads.sum(0))


def test_mgda_returns_the_min_norm_point_of_the_convex_hull():
    two = torch.tensor([[1.0, 0.0], [0.0, 3.0]])  # min over a: a² + 9(1-a)²  ->  a = 0.9
    direction = TorchJDBalancer(["a", "b"], MGDAConfig()).combine(stats_for(two))
    torch.testing.assert_close(direction, torch.tensor([0.9, 0.3]))
    orthogonal = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))  # w_i ∝ 1/|g_i|²
    balancer = TorchJDBalancer(TASKS3, MGDAConfig(epsilon=1e-6, max_iters=5000))
    balancer.combine(stats_for(orthogonal))
    expected = torch.tensor([1.0, 1 / 4, 1 / 9], dtype=torch.float64)
    torch.testing.assert_close(weights_of(balancer), expected / expected.sum(), atol=2e-3, rtol=0)


@pytest.mark.parametrize("seed", [2, 3, 4])
def test_mgda_matches_the_min_norm_quadratic_program(seed):
    grads = random_rows(3, 6, seed)
    gram = (grads @ grads.T).numpy()
    reference = minimize(lambda w: w @ gram @ w, np.ones(3) / 3, jac=lambda w: 2 * gram @ w, method="SLSQP",
                         bounds=[(0, 1)] * 3, constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1}],
                         options={"ftol": 1e-15, "maxiter": 1000})
    # torchjd's MGDA is Frank–Wolfe (no away steps): slow when the optimum lies on an edge (seed 4)
    direction = TorchJDBalancer(TASKS3, MGDAConfig(epsilon=1e-8, max_iters=1000)).combine(stats_for(grads))
    assert float(direction @ direction) == pytest.approx(reference.fun, rel=2e-3)
    # optimality of the min-norm point d of the hull: d·g_i >= |d|² for every row
    assert float((grads @ direction).min()) >= float(direction @ direction) * (1 - 2e-3)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 4))
def test_upgrad_invariants_as_torchjd_states_them(seed, k):
    """Non-conflicting (G d >= 0), in the span of the rows with weights >= the preference's
    projection, equivariant to permutations of the tasks, linear under positive scaling."""
    grads = random_rows(k, 6, seed)
    tasks = [f"t{i}" for i in range(k)]
    direction = TorchJDBalancer(tasks, UPGradConfig()).combine(stats_for(grads))
    scale = float(grads.norm(dim=1).max()) ** 2
    assert bool((grads @ direction >= -1e-6 * scale).all())
    permutation = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
    permuted = TorchJDBalancer(tasks, UPGradConfig()).combine(stats_for(grads[permutation]))
    torch.testing.assert_close(permuted, direction, atol=1e-6, rtol=1e-5)
    scaled = TorchJDBalancer(tasks, UPGradConfig()).combine(stats_for(3.0 * grads))
    torch.testing.assert_close(scaled, 3.0 * direction, atol=1e-6, rtol=1e-5)


def test_upgrad_without_conflict_is_the_mean():
    grads = torch.tensor([[1.0, 0.0, 1.0], [0.0, 2.0, 1.0]], dtype=torch.float64)  # g1·g2 = 1 > 0
    direction = TorchJDBalancer(["a", "b"], UPGradConfig()).combine(stats_for(grads))
    torch.testing.assert_close(direction, grads.mean(0), atol=1e-3, rtol=0)  # quadprog regularisation


def test_cagrad_stays_in_its_ball_and_improves_the_worst_task():
    grads = random_rows(3, 5, 0)
    mean = grads.mean(0)
    zero = TorchJDBalancer(TASKS3, CAGradConfig(c=0.0)).combine(stats_for(grads))
    torch.testing.assert_close(zero, mean)
    direction = TorchJDBalancer(TASKS3, CAGradConfig(c=0.5)).combine(stats_for(grads))
    # CAGrad: max_d min_i g_i·d  s.t. |d - g0| <= c |g0|; the optimum sits on the sphere
    assert float((direction - mean).norm()) == pytest.approx(0.5 * float(mean.norm()), rel=1e-4)
    assert float((grads @ direction).min()) > float((grads @ mean).min())


def test_nashmtl_weights_solve_the_bargaining_equation():
    grads = random_rows(3, 5, 0)
    balancer = TorchJDBalancer(TASKS3, NashMTLConfig(max_norm=0))
    balancer.combine(stats_for(grads))
    alpha = weights_of(balancer)
    # Navon et al.: Gᵀ... the Nash bargaining solution has (G Gᵀ α)_i = 1 / α_i
    torch.testing.assert_close(alpha * (grads @ grads.T @ alpha), torch.ones(3, dtype=torch.float64), atol=1e-3, rtol=0)
    orthogonal = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    balancer = TorchJDBalancer(["a", "b"], NashMTLConfig())  # max_norm 1: |d| clipped to 1
    direction = balancer.combine(stats_for(orthogonal))
    torch.testing.assert_close(direction, torch.tensor([1.0, 1.0]) / math.sqrt(2), atol=1e-4, rtol=0)


def test_nashmtl_on_a_batch_with_one_task_is_its_unit_gradient():
    """torchjd's NashMTL raises on one task; the bargaining solution there is α = 1/‖g‖."""
    grads = torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.0, 0.0]])
    for max_norm, expected in ((0.0, [0.6, 0.8]), (1.0, [0.6, 0.8]), (0.5, [0.3, 0.4])):
        balancer = TorchJDBalancer(TASKS3, NashMTLConfig(max_norm=max_norm))
        direction = balancer.combine(stats_for(grads, tokens=[5, 0, 0]))  # only de-en in the batch
        torch.testing.assert_close(direction, torch.tensor(expected))
        assert weights_of(balancer)[0] == pytest.approx(expected[0] / 3.0)


def test_imtlg_projects_equally_onto_every_task():
    grads = random_rows(3, 5, 1)
    balancer = TorchJDBalancer(TASKS3, IMTLGConfig())
    direction = balancer.combine(stats_for(grads))
    projections = grads @ direction / grads.norm(dim=1)
    torch.testing.assert_close(projections, projections.mean().expand(3))
    assert float(weights_of(balancer).sum()) == pytest.approx(1.0)


def test_alignedmtl_on_orthogonal_rows_by_hand():
    grads = torch.tensor([[1.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    # eigenvalues of GGᵀ: 9, 1; B = sqrt(λ_min) V Σ^-1/2 Vᵀ = diag(1, 1/3); w = B · (1/2, 1/2)
    balancer = TorchJDBalancer(["a", "b"], AlignedMTLConfig())
    direction = balancer.combine(stats_for(grads))
    torch.testing.assert_close(weights_of(balancer), torch.tensor([0.5, 1 / 6], dtype=torch.float64))
    torch.testing.assert_close(direction, torch.tensor([0.5, 0.5], dtype=torch.float64))


def test_graddrop_keeps_agreeing_signs_and_one_sign_per_coordinate():
    agreeing = torch.tensor([[1.0, -2.0, 0.5], [3.0, -1.0, 0.0]])
    balancer = TorchJDBalancer(["a", "b"], GradDropConfig())
    torch.testing.assert_close(balancer.combine(stats_for(agreeing)), agreeing.sum(0))
    assert balancer.log_values()["peer/fit_residual"] < 1e-6
    torch.manual_seed(0)
    mixed = torch.tensor([[1.0, -2.0, 0.5], [-3.0, 1.0, 2.0]])
    direction = TorchJDBalancer(["a", "b"], GradDropConfig()).combine(stats_for(mixed))
    positive, negative = mixed.clamp_min(0).sum(0), mixed.clamp_max(0).sum(0)
    assert bool(((direction == positive) | (direction == negative)).all())


# ---------------------------------------------------------------------------- the generic wrapper


@pytest.mark.parametrize("config", [MGDAConfig(), UPGradConfig(), IMTLGConfig(), AlignedMTLConfig(), CAGradConfig(c=0.4)],
                         ids=lambda c: c.name)
def test_balancer_gives_torchjds_aggregation_of_the_present_rows_only(config):
    grads = random_rows(3, 7, 5)
    tokens = torch.tensor([4.0, 0.0, 2.0])  # the middle task is absent (its row is ignored, not zero-fed)
    grads[1] = 100.0
    balancer = TorchJDBalancer(TASKS3, config)
    direction = balancer.combine(stats_for(grads, tokens))
    expected = build_aggregator(config, 2, None)(grads[[0, 2]])
    torch.testing.assert_close(direction, expected, atol=1e-8, rtol=1e-6)
    assert set(balancer.log_values()) >= {"weight/de-en", "weight/tl-en", "peer/conflicts"}
    assert "weight/sw-en" not in balancer.log_values()
    assert balancer.log_values()["peer/tasks"] == 2.0


def test_pcgrad_matches_torchjd_with_the_same_random_order():
    grads = random_rows(4, 6, 7)
    torch.manual_seed(3)
    direction = TorchJDBalancer(list("abcd"), PCGradConfig()).combine(stats_for(grads))
    torch.manual_seed(3)
    torch.testing.assert_close(direction, build_aggregator(PCGradConfig(), 4, None)(grads))


def test_mean_loss_rows_rescale_each_task_by_its_tokens():
    grads = random_rows(2, 4, 8)
    tokens = torch.tensor([30.0, 10.0])  # N = 40: ∇L_i = (N / n_i) g_i
    balancer = TorchJDBalancer(["a", "b"], MGDAConfig(task_gradient="mean_loss"))
    direction = balancer.combine(stats_for(grads, tokens))
    rescaled = grads * torch.tensor([[40 / 30], [40 / 10]], dtype=torch.float64)
    torch.testing.assert_close(direction, build_aggregator(MGDAConfig(), 2, None)(rescaled))
    torch.testing.assert_close(weights_of(balancer) @ grads, direction)  # logged on the g_i rows


def test_preference_is_renormalised_over_present_tasks():
    grads = torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]], dtype=torch.float64)  # rows 1, 2 orthogonal
    balancer = TorchJDBalancer(TASKS3, UPGradConfig(), preference=[3.0, 1.0, 100.0])
    direction = balancer.combine(stats_for(grads, [1.0, 1.0, 0.0]))
    torch.testing.assert_close(direction, torch.tensor([0.75, 0.25], dtype=torch.float64), atol=1e-3, rtol=0)


def test_non_finite_rows_skip_the_aggregator_and_are_counted():
    grads = torch.tensor([[1.0, float("nan")], [0.0, 1.0]])
    balancer = TorchJDBalancer(["a", "b"], UPGradConfig())
    assert not bool(torch.isfinite(balancer.combine(stats_for(grads))).all())
    assert balancer.log_values()["peer/skipped_nonfinite"] == 1.0
    assert not bool(balancer.combine(stats_for(grads, [0.0, 0.0])).any())  # nobody present: zero


def test_pair_statistics_count_conflicts():
    grads = torch.tensor([[1.0, 0.0], [-1.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    values = pair_statistics(grads @ grads.T)
    assert values["conflicts"] == 1.0 and values["pairs"] == 3.0
    assert values["cos_min"] == pytest.approx(-1 / math.sqrt(2))


def round_trip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_nashmtl_state_round_trip_gives_identical_directions():
    sequence = [random_rows(3, 5, seed).float() for seed in range(5)]
    first = TorchJDBalancer(TASKS3, NashMTLConfig(update_weights_every=2))
    for grads in sequence[:3]:
        first.combine(stats_for(grads))
    first.combine(stats_for(sequence[0], [1.0, 0.0, 1.0]))  # a second subset of tasks
    second = TorchJDBalancer(TASKS3, NashMTLConfig(update_weights_every=2))
    second.load_state_dict(round_trip(first.state_dict()))
    for grads in sequence[3:]:
        for tokens in ([1.0, 1.0, 1.0], [1.0, 0.0, 1.0]):
            torch.testing.assert_close(first.combine(stats_for(grads, tokens)), second.combine(stats_for(grads, tokens)))
    assert first.log_values() == second.log_values()
    with pytest.raises(ValueError, match="not 'pcgrad'"):
        TorchJDBalancer(TASKS3, PCGradConfig()).load_state_dict(first.state_dict())


# ---------------------------------------------------------------------------- GradVac


def test_gradvac_correction_reaches_the_target_similarity_exactly():
    grads = torch.tensor([[1.0, 0.2, 0.0], [0.3, 1.0, 0.5]], dtype=torch.float64)
    cosine = float(grads[0] @ grads[1] / (grads[0].norm() * grads[1].norm()))
    targets = torch.full((2, 2), 0.9, dtype=torch.float64)  # above the current cosine: correct both
    coefficients, corrections = vaccinate(grads @ grads.T, targets, beta=0.25, eps=0.0)
    assert corrections == 2
    vaccinated = coefficients @ grads
    for i, j in ((0, 1), (1, 0)):
        cos = float(vaccinated[i] @ grads[j] / (vaccinated[i].norm() * grads[j].norm()))
        assert cos == pytest.approx(0.9, abs=1e-9)
        # the orthogonal complement of g_j in g_i' is kept at g_i's: only the angle changes
        assert float(targets[i, j]) == pytest.approx(0.75 * 0.9 + 0.25 * cosine)  # EMA with the pre-correction φ
    # the paper's closed form for the coefficient on g_j
    norm_i, norm_j = float(grads[0].norm()), float(grads[1].norm())
    paper = norm_i * (0.9 * math.sqrt(1 - cosine**2) - cosine * math.sqrt(1 - 0.81)) / (norm_j * math.sqrt(1 - 0.81))
    assert float(coefficients[0, 1]) == pytest.approx(paper, rel=1e-7)


def test_gradvac_leaves_pairs_above_their_target_alone():
    grads = torch.tensor([[1.0, 0.5], [0.5, 1.0]])  # cos > 0 = initial targets
    gradvac = GradVac(["a", "b"], beta=0.5)
    torch.testing.assert_close(gradvac.combine(stats_for(grads)), grads.sum(0))
    assert gradvac.log_values()["gradvac/corrections"] == 0.0
    assert gradvac.log_values()["gradvac/target_mean"] == pytest.approx(0.5 * 0.8)


def test_gradvac_agrees_with_torchjds_independent_implementation():
    from torchjd.aggregation import GradVac as TorchJDGradVac

    ours, theirs = GradVac(list("abcd"), beta=0.3), TorchJDGradVac(beta=0.3)
    for seed in range(4):
        grads = random_rows(4, 6, seed) + (0.5 if seed % 2 else -0.3)
        torch.manual_seed(seed)
        mine = ours.combine(stats_for(grads))
        torch.manual_seed(seed)
        torch.testing.assert_close(mine, theirs(grads), atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(ours.targets[0], theirs.gramian_weighting._phi_t.masked_fill(torch.eye(4, dtype=torch.bool), 0))


def test_gradvac_per_tensor_groups_are_independent_problems():
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    sizes = [p.numel() for p in model.parameters()]
    grads = random_rows(2, sum(sizes), 11)
    per_tensor = GradVac(["a", "b"], grouping="per_tensor", beta=0.5)
    with pytest.raises(ValueError, match="set_parameters"):
        per_tensor.combine(stats_for(grads))
    per_tensor.set_parameters(model.named_parameters())
    assert len(per_tensor.groups) == 4
    direction = per_tensor.combine(stats_for(grads))
    offset = 0
    for size in sizes:
        part = slice(offset, offset + size)
        alone = GradVac(["a", "b"], beta=0.5).combine(stats_for(grads[:, part].contiguous()))
        torch.testing.assert_close(direction[part], alone)
        offset += size
    assert per_tensor.targets.shape == (4, 2, 2)
    logged = per_tensor.log_values()
    assert logged["gradvac/groups"] == 4.0 and "peer/fit_residual" in logged


def test_gradvac_absent_task_keeps_its_targets_and_state_round_trips():
    gradvac = GradVac(TASKS3, beta=0.5)
    gradvac.combine(stats_for(random_rows(3, 4, 0)))
    before = gradvac.targets
    gradvac.combine(stats_for(random_rows(3, 4, 1), [1.0, 1.0, 0.0]))
    after = gradvac.targets
    torch.testing.assert_close(after[0, 2], before[0, 2])
    torch.testing.assert_close(after[0, :, 2], before[0, :, 2])
    assert not torch.equal(after[0, 0, 1], before[0, 0, 1])
    restored = GradVac(TASKS3, beta=0.5)
    restored.load_state_dict(round_trip(gradvac.state_dict()))
    grads = random_rows(3, 4, 2)
    torch.manual_seed(0)
    a = gradvac.combine(stats_for(grads))
    torch.manual_seed(0)
    torch.testing.assert_close(restored.combine(stats_for(grads)), a)
    with pytest.raises(ValueError, match="shape"):
        GradVac(["a", "b"]).load_state_dict(gradvac.state_dict())


# ---------------------------------------------------------------------------- χ²-DRO


def scipy_worst_case(losses: np.ndarray, p: np.ndarray, rho: float) -> float:
    best = -math.inf
    for start in (p, np.full_like(p, 1 / p.size)):
        result = minimize(lambda q: -q @ losses, start, jac=lambda q: -losses, method="SLSQP", bounds=[(0, 1)] * p.size,
                          constraints=[{"type": "eq", "fun": lambda q: q.sum() - 1},
                                       {"type": "ineq", "fun": lambda q: rho - np.sum((q - p) ** 2 / p)}],
                          options={"ftol": 1e-14, "maxiter": 2000})
        if result.success:
            best = max(best, -result.fun)
    return best


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 100_000), st.integers(2, 6), st.sampled_from([0.01, 0.1, 0.5, 2.0, 20.0]))
def test_chi2_worst_case_is_the_exact_maximiser(seed, k, rho):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(k)) + 1e-3
    p /= p.sum()
    losses = rng.uniform(0.5, 5.0, size=k)
    q = chi2_worst_case(losses, p, rho)
    assert np.all(q >= 0) and q.sum() == pytest.approx(1.0, abs=1e-12)
    assert chi2_divergence(q, p) <= rho * (1 + 1e-9) + 1e-12
    assert q @ losses >= scipy_worst_case(losses, p, rho) - 1e-7
    assert q @ losses >= p @ losses - 1e-12


def test_chi2_worst_case_closed_form_vertex_and_ties_by_hand():
    p, losses = np.array([0.8, 0.2]), np.array([2.0, 4.0])
    # unclipped: q = p (1 + sqrt(ρ/Var) (L − E L)), E L = 2.4, Var = 0.64
    np.testing.assert_allclose(chi2_worst_case(losses, p, 0.1), p * (1 + math.sqrt(0.1 / 0.64) * (losses - 2.4)))
    np.testing.assert_allclose(chi2_worst_case(losses, p, 4.0), [0.0, 1.0])  # 1/p_max = 5 <= 1 + ρ
    np.testing.assert_allclose(chi2_worst_case([3.0, 3.0], p, 0.5), p)
    np.testing.assert_allclose(chi2_worst_case([1.0, 2.0, 9.0], [0.5, 0.5, 0.0], 0.5)[2], 0.0)


def test_dro_weights_are_importance_ratios_and_follow_the_loss_ema():
    p = np.array([0.7, 0.2, 0.1])
    dro = ChiSquareDRO(TASKS3, p, rho=0.2, ema_decay=0.5)
    torch.testing.assert_close(dro.loss_weights(), torch.ones(3))
    dro.observe_losses(torch.tensor([1.0, 3.0, 0.0]), torch.tensor([10.0, 5.0, 0.0]))  # tl-en not seen yet
    torch.testing.assert_close(dro.loss_weights(), torch.ones(3))
    dro.observe_losses(torch.tensor([3.0, 0.0, 5.0]), torch.tensor([10.0, 0.0, 2.0]))
    ema = np.array([0.5 * 1 + 0.5 * 3, 3.0, 5.0])
    q = chi2_worst_case(ema, p, 0.2)
    torch.testing.assert_close(dro.loss_weights(), torch.tensor(q / p, dtype=torch.float32))
    logged = dro.log_values()
    assert logged["dro/chi2"] == pytest.approx(0.2, rel=1e-6)
    assert logged["dro/worst_case_loss"] > logged["dro/expected_loss"]
    assert logged["dro_loss/de-en"] == pytest.approx(2.0)
    restored = ChiSquareDRO(TASKS3, p, rho=0.2, ema_decay=0.5)
    restored.load_state_dict(round_trip(dro.state_dict()))
    assert restored.log_values() == logged
    with pytest.raises(ValueError, match="sampling probabilities"):
        ChiSquareDRO(TASKS3, [1 / 3] * 3).load_state_dict(dro.state_dict())


def test_dro_warmup_and_update_every():
    dro = ChiSquareDRO(TASKS3, [0.4, 0.3, 0.3], warmup_steps=2, update_every=2)
    changed = []
    for step in range(6):
        before = dro.loss_weights().clone()
        dro.observe_losses(torch.tensor([1.0, 2.0, 2.0 + step]), torch.ones(3))
        changed.append(not torch.equal(before, dro.loss_weights()))
    assert changed == [False, False, True, False, True, False]


# ---------------------------------------------------------------------------- training runs


class SharedTrunk(nn.Module):
    """Shared trunk + one head per task: the usual multi-task shape."""

    def __init__(self, tasks: int):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 16), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(16, 1) for _ in range(tasks))

    def forward(self, x, task):
        return self.heads[task](self.trunk(x)).squeeze(-1)


def synthetic_tasks(sizes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shared = torch.randn(4, generator=generator)
    data = []
    for n in sizes:
        x = torch.randn(n, 4, generator=generator)
        own = torch.randn(4, generator=generator)
        data.append((x, torch.tanh(x @ (shared + 0.5 * own))))
    return data


def task_losses(model, data):
    with torch.no_grad():
        return torch.stack([(model(x, i) - y).pow(2).mean() for i, (x, y) in enumerate(data)])


PEERS = [config() for config in PEER_CONFIGS] + [GradVacConfig(beta=0.1), DROConfig(rho=0.2)]


@pytest.mark.parametrize("config", PEERS, ids=lambda c: c.name)
def test_short_synthetic_training_lowers_every_task_loss(config):
    torch.manual_seed(0)
    sizes = [48, 12, 4]  # imbalanced: HiRes, MidRes, LoRes
    data = synthetic_tasks(sizes)
    model = SharedTrunk(3)
    if config.name == "gradvac":
        balancer = GradVac(TASKS3, config)
    elif config.name == "dro":
        balancer = ChiSquareDRO(TASKS3, np.array(sizes) / sum(sizes), config)
    else:
        balancer = TorchJDBalancer(TASKS3, config)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    start = task_losses(model, data)
    total = sum(sizes)

    def closure(i, x, y):
        def run():
            per_token = (model(x, i) - y).pow(2)
            return TaskLoss(per_token.sum() / total, float(per_token.detach().mean()), len(x))
        return run

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(40):
            optimizer.zero_grad()
            backward_per_task(model.parameters(), [closure(i, x, y) for i, (x, y) in enumerate(data)], balancer)
            optimizer.step()
    end = task_losses(model, data)
    assert bool((end < 0.7 * start).all()), (start, end)
    logged = balancer.log_values()
    assert all(math.isfinite(v) for v in logged.values())
    assert {f"weight/{t}" for t in TASKS3} <= set(logged)
    json.dumps(round_trip(balancer.state_dict()), default=lambda value: None)  # loads weights_only


TRAINER = {
    "data": {"source": "synthetic", "languages": {"de": 120, "sw": 30}, "valid_per_lang": 8, "test_per_lang": 8,
             "vocab_size": 48, "synthetic": {"words": 8, "min_words": 2, "max_words": 4}},
    "model": {"d_model": 16, "encoder_layers": 1, "decoder_layers": 1, "heads": 2, "ffn_dim": 32, "dropout": 0.0},
    "train": {"max_updates": 4, "max_tokens": 120, "lr": 0.01, "warmup_updates": 0, "log_every": 1,
              "valid_every": 2, "save_every": 2, "keep_snapshots": False},
}


@pytest.mark.parametrize("balancer", [{"name": "dro", "rho": 0.5}, {"name": "gradvac", "grouping": "per_tensor"},
                                      {"name": "upgrad"}], ids=lambda b: b["name"])
def test_trainer_runs_each_family_and_resumes_exactly(tmp_path, balancer):
    from polycats.train.metrics import read_metrics
    from polycats.train.trainer import train

    def config(max_updates):
        tree = json.loads(json.dumps(TRAINER))
        tree["balancer"] = balancer
        tree["train"]["max_updates"] = max_updates
        return config_from_dict(tree)

    straight, split = tmp_path / "straight", tmp_path / "split"
    train(config(4), straight, progress=False)
    train(config(2), split, progress=False)
    train(config(4), split, progress=False)
    a = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(split / "checkpoints" / "last.pt", weights_only=True)
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    strip = lambda events: [{k: v for k, v in e.items() if k != "tokens_per_s"} for e in events]  # noqa: E731
    events = strip(read_metrics(straight))
    assert events == strip(read_metrics(split))
    assert sum(any(key.startswith("weight/") for key in e) for e in events) == 4  # log_every=1
    if balancer["name"] == "dro":
        assert any(e.get("dro/updates", 0) > 0 for e in events)
        assert any(e.get("weight/sw-en", 1.0) != 1.0 for e in events)
    if balancer["name"] == "gradvac":
        assert any(e.get("gradvac/groups", 0) > 1 for e in events)
