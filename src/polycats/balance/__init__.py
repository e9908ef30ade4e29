"""How task losses and gradients are combined: one interface (:class:`Balancer`, its
:class:`StepPlan` and :class:`BalancerContext`), one class per method, and the per-task gradient
path for a plain PyTorch loop (:func:`backward_per_task`).

>>> from polycats.balance import CATS, MGDAConfig, TorchJDBalancer
>>> sorted(CATS(["de-en", "sw-en"]).log_values())[:2]
['alpha/de-en', 'alpha/sw-en']
"""

from polycats.balance.base import Balancer, BalancerContext, StepPlan, backward_per_task
from polycats.balance.build import balancer_from_config
from polycats.balance.cats import CATS, CatsSolver
from polycats.balance.dro import ChiSquareDRO
from polycats.balance.gradvac import GradVac
from polycats.balance.scalar import ScalarBalancer
from polycats.balance.torchjd_peers import TorchJDBalancer
from polycats.balancer_config import (
    AlignedMTLConfig, CAGradConfig, CatsConfig, DROConfig, GradDropConfig, GradVacConfig, IMTLGConfig, MGDAConfig,
    NashMTLConfig, PCGradConfig, ScalarConfig, UPGradConfig,
)
from polycats.ops.task_gradients import CurvatureProbe, TaskLoss, TaskStats, per_task_gradients
from polycats.ops.task_split import TaskSplit

__all__ = [
    "AlignedMTLConfig", "Balancer", "BalancerContext", "CAGradConfig", "CATS", "CatsConfig", "CatsSolver", "ChiSquareDRO",
    "CurvatureProbe", "DROConfig", "GradDropConfig", "GradVac", "GradVacConfig", "IMTLGConfig", "MGDAConfig",
    "NashMTLConfig", "PCGradConfig", "ScalarBalancer", "StepPlan", "TaskLoss", "TaskSplit", "TaskStats",
    "ScalarConfig", "TorchJDBalancer", "UPGradConfig", "backward_per_task", "balancer_from_config", "per_task_gradients",
]
