"""How task losses and gradients are combined: one interface (:class:`Balancer`, its
:class:`StepPlan` and :class:`BalancerContext`), one class per method, and the per-task gradient
path for a plain PyTorch loop (:func:`backward_per_task`).

>>> from polycats.balance import CATS, MGDAConfig, TorchJDBalancer
>>> sorted(CATS(["de-en", "sw-en"]).log_values())[:2]
['alpha/de-en', 'alpha/sw-en']
"""

from polycats.balance.base import Balancer, BalancerContext, CurvatureProbe, StepPlan, TaskStats
from polycats.balance.cats import CATS, CatsConfig, CatsSolver
from polycats.balance.dro import ChiSquareDRO, DROConfig
from polycats.balance.gradvac import GradVac, GradVacConfig
from polycats.balance.scalar import ScalarBalancer
from polycats.balance.task_gradients import TaskLoss, backward_per_task, per_task_gradients
from polycats.balance.task_split import TaskSplit
from polycats.balance.torchjd_peers import (
    AlignedMTLConfig, CAGradConfig, GradDropConfig, IMTLGConfig, MGDAConfig, NashMTLConfig, PCGradConfig,
    TorchJDBalancer, UPGradConfig,
)

__all__ = [
    "AlignedMTLConfig", "Balancer", "BalancerContext", "CAGradConfig", "CATS", "CatsConfig", "CatsSolver", "ChiSquareDRO",
    "CurvatureProbe", "DROConfig", "GradDropConfig", "GradVac", "GradVacConfig", "IMTLGConfig", "MGDAConfig",
    "NashMTLConfig", "PCGradConfig", "ScalarBalancer", "StepPlan", "TaskLoss", "TaskSplit", "TaskStats",
    "TorchJDBalancer", "UPGradConfig", "backward_per_task", "per_task_gradients",
]
