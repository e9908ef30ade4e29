"""polycats: multilingual translation on imbalanced data — temperature sampling, CATS (Curvature
Aware Task Scaling), the diagnostics behind it (gradient similarity, sharpness per task) and peers.

The library API for your own training loop::

    from polycats import CATS, backward_per_task
    cats = CATS(["de-en", "sw-en"])
    backward_per_task(model.parameters(), [loss_de, loss_sw], cats)  # leaves Σ α_i g_i in .grad
    optimizer.step()
"""

from polycats.balance.base import Balancer, TaskStats
from polycats.balance.cats import CATS, CatsConfig
from polycats.balance.scalar import ScalarBalancer
from polycats.balance.task_gradients import TaskLoss, backward_per_task, per_task_gradients

__version__ = "0.1.0"
__all__ = ["CATS", "Balancer", "CatsConfig", "ScalarBalancer", "TaskLoss", "TaskStats", "backward_per_task",
           "per_task_gradients"]
