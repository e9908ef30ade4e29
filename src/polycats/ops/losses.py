"""Loss closures: how the diagnostics and the curvature probe name a loss without owning the model.

Every diagnostic takes one **loss closure** per task: a function of no arguments that runs the
model on that task's fixed batch and returns either

* a pair ``(loss_sum, n_tokens)`` — the token-loss *sum* ``S_i`` over the batch and its number of
  target tokens ``n_i`` (use :func:`translation_loss` for our Transformer), or
* a scalar tensor — read as ``(loss, 1)``.

The task's loss is ``S_i / n_i``; a group's loss is the token-weighted mean over its tasks,
``sum_i S_i / sum_i n_i`` (the mean token NLL over the group's batch), and a weighted combination
(:func:`combine_losses`, the balancer's training loss) is ``sum_i w_i S_i / sum_i n_i``. With
plain scalar closures a group is therefore the plain mean of its tasks' losses. Only pairs give
exact token-weighted group losses, so prefer them.

The model is put in eval mode (no dropout) while the closures run and its previous
train/eval state is restored afterwards, so results are deterministic for fixed batches.

>>> import torch
>>> closures = {"a": lambda: (torch.tensor(6.0), 3), "b": lambda: (torch.tensor(1.0), 1)}
>>> float(mean_loss(combine_losses(closures)()))  # (6 + 1) / (3 + 1)
1.75
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping

from torch import Tensor, nn

from polycats.model.transformer import token_losses

LossValue = Tensor | tuple[Tensor, "Tensor | int | float"]
LossClosure = Callable[[], LossValue]
ParameterFilter = Callable[[str], bool]


def split_loss(value: LossValue) -> tuple[Tensor, Tensor | float]:
    """``(loss_sum, count)`` from what a closure returned (a scalar counts as ``(loss, 1)``)."""
    if isinstance(value, tuple):
        total, count = value
        return total, count
    return value, 1.0


def mean_loss(value: LossValue) -> Tensor:
    """The loss a closure stands for: ``loss_sum / count``."""
    total, count = split_loss(value)
    return total / count


def combine_losses(closures: Mapping[str, LossClosure], weights: Mapping[str, float] | None = None) -> LossClosure:
    """One closure for ``sum_i w_i S_i / sum_i n_i`` over ``closures`` (``w_i = 1`` by default).

    With unit weights this is a group's loss (the token-weighted mean over its tasks); with the
    balancer's weights it is the combined training loss the trainer optimises. Tasks missing from
    ``weights`` get weight 0 (their tokens still count in the denominator, as in the trainer).
    """
    names = list(closures)

    def combined() -> tuple[Tensor, Tensor | float]:
        total, count = 0.0, 0.0
        for name in names:
            loss_sum, n = split_loss(closures[name]())
            weight = 1.0 if weights is None else float(weights.get(name, 0.0))
            total = total + weight * loss_sum
            count = count + n
        return total, count

    return combined


def translation_loss(
    model: nn.Module,
    src: Tensor,
    tgt_in: Tensor,
    target: Tensor,
    pad_id: int,
    label_smoothing: float = 0.0,
) -> LossClosure:
    """A closure for our Transformer on one batch: ``(token-loss sum, number of target tokens)``.

    ``label_smoothing=0`` gives the token NLL (the spec's task/group loss); pass the trainer's value
    to get its training loss. The batch is moved to the model's device once, here.
    """
    device = next(model.parameters()).device
    src, tgt_in, target = src.to(device), tgt_in.to(device), target.to(device)
    n_tokens = int((target != pad_id).sum())

    def closure() -> tuple[Tensor, int]:
        loss, _ = token_losses(model(src, tgt_in), target, pad_id, label_smoothing)
        return loss.sum(), n_tokens

    return closure


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode and restore every submodule's previous mode afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def select_parameters(model: nn.Module, parameters: ParameterFilter | None = None) -> list[tuple[str, nn.Parameter]]:
    """Named trainable parameters (tied weights once), optionally filtered by name."""
    return [
        (name, p)
        for name, p in model.named_parameters()
        if p.requires_grad and (parameters is None or parameters(name))
    ]
