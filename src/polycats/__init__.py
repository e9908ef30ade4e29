"""polycats: multilingual translation on imbalanced data — temperature sampling, CATS (Curvature
Aware Task Scaling), the diagnostics behind it (gradient similarity, sharpness per task) and peers.

The library API for your own training loop::

    from polycats import CATS, backward_per_task
    cats = CATS(["de-en", "sw-en"])
    backward_per_task(model.parameters(), [loss_de, loss_sw], cats)  # leaves Σ α_i g_i in .grad
    optimizer.step()
"""

from importlib import import_module

from polycats.version import __version__

# Exports load on first use, so `polycats --help` and config errors do not wait for torch.
# The library API is polycats.balance and polycats.diagnostics; these are its most used names.
_EXPORTS = {
    **{name: "polycats.balance" for name in (
        "Balancer", "BalancerContext", "CATS", "CatsConfig", "ChiSquareDRO", "GradVac", "ScalarBalancer", "StepPlan",
        "TaskLoss", "TaskSplit", "TaskStats", "TorchJDBalancer", "backward_per_task", "per_task_gradients",
    )},
    **{name: "polycats.diagnostics" for name in (
        "gradient_similarity", "hessian_operator", "top_eigenvalue", "curvature_report",
    )},
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'polycats' has no attribute {name!r}")
