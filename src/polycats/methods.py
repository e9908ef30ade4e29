"""Named methods: each a list of ``--set`` overrides applied on top of a preset. ``polycats demo
--methods`` and the experiment grids (``polycats experiment``) pick from ``METHODS``."""

from __future__ import annotations

from polycats.balancer_config import BALANCER_NAMES

PEERS = tuple(name for name in BALANCER_NAMES if name not in ("scalar", "cats"))
METHODS: dict[str, list[str]] = {
    "T=1": ["sampling.temperature=1"],
    "T=5": ["sampling.temperature=5"],
    "T=100": ["sampling.temperature=100"],
    # CATS on the T=1 sampler (the paper's setting), default options.
    "CATS": ["sampling.temperature=1", "balancer.name=cats"],
    "CATS-loss": ["sampling.temperature=1", "balancer.name=cats", "balancer.objective=loss"],
    "two-stage": ["sampling.temperature=5", "sampling.first_stage_updates=100"],  # HiRes first (Choi et al. 2023)
    # Peers on the same T=1 sampler as CATS, with their documented default options.
    **{peer: ["sampling.temperature=1", f"balancer.name={peer}"] for peer in PEERS},
}


def run_name(method: str) -> str:
    """A directory-safe, stable name for a method: ``T=5`` → ``t5``, ``CATS-loss`` → ``cats-loss``."""
    return "".join(c for c in method.lower().replace("=", "") if c.isalnum() or c in "-_.") or "method"
