"""From a ``balancer`` config (:mod:`polycats.balancer_config`) to its balancer: one branch per
config type, so a new method is one config class in the union and one branch here.

>>> from polycats.balancer_config import CatsConfig
>>> balancer_from_config(CatsConfig(), ["de-en", "sw-en"], ["de", "sw"]).plan(0)
StepPlan(task_gradients=True, validation=False, curvature=False)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from polycats.balance.base import Balancer
from polycats.balance.cats import CATS
from polycats.balance.dro import ChiSquareDRO
from polycats.balance.gradvac import GradVac
from polycats.balance.scalar import ScalarBalancer
from polycats.balance.torchjd_peers import TorchJDBalancer
from polycats.balancer_config import (
    AlignedMTLConfig, BalancerConfig, CatsConfig, DROConfig, GradVacConfig, PeerConfig, ScalarConfig, UPGradConfig,
)
from polycats.errors import PolycatsError


def balancer_from_config(
    options: BalancerConfig, tasks: Sequence[str], languages: Sequence[str], probabilities: np.ndarray | None = None
) -> Balancer:
    """The balancer ``options`` describe, for ``tasks`` and their ``languages`` (the config's
    per-language weights and preferences name languages). ``probabilities``, the sampler's in
    task order, is needed by DRO."""
    tasks = list(tasks)
    if isinstance(options, CatsConfig):
        return CATS(tasks, options)
    if isinstance(options, GradVacConfig):
        return GradVac(tasks, options)
    if isinstance(options, DROConfig):
        if probabilities is None:
            raise PolycatsError("balancer.name=dro needs the sampling probabilities")
        return ChiSquareDRO(tasks, probabilities, options)
    if isinstance(options, (UPGradConfig, AlignedMTLConfig)) and options.preference is not None:
        unknown = sorted(set(options.preference) - set(languages))
        if unknown:
            raise PolycatsError(f"balancer.preference names {', '.join(unknown)}, not in data.languages")
        return TorchJDBalancer(tasks, options, preference=[options.preference.get(lang, 1.0) for lang in languages])
    if isinstance(options, PeerConfig):
        return TorchJDBalancer(tasks, options)
    if isinstance(options, ScalarConfig):
        weights = options.weights and {task: options.weights.get(lang, 1.0) for task, lang in zip(tasks, languages)}
        return ScalarBalancer(tasks, weights)
    raise TypeError(f"no balancer for {type(options).__name__}")
