"""Per-task gradients from one pass (polycats.ops.task_split) against one pass per task."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from polycats.ops.task_gradients import TaskLoss, per_task_gradients
from polycats.ops.task_split import TaskSplit
from polycats.data.batching import collate
from polycats.model.transformer import Transformer, TransformerShape

PAD = 0
TASKS = 3


def tiny_model(dropout: float = 0.0) -> Transformer:
    torch.manual_seed(0)
    return Transformer(TransformerShape(vocab_size=23, d_model=16, encoder_layers=2, decoder_layers=2, heads=2,
                                        ffn_dim=24, dropout=dropout, max_positions=32, pad_id=PAD))


def batch_of(tasks: list[int], seed: int = 0):
    """Sentences of different lengths (padding in both source and target), rows in the given task order."""
    generator = torch.Generator().manual_seed(seed)
    sources, targets = [], []
    for row in range(len(tasks)):
        sources.append(torch.randint(4, 23, (3 + (row * 5) % 7,), generator=generator).numpy())
        targets.append(torch.randint(4, 23, (2 + (row * 3) % 6,), generator=generator).numpy())
    return collate(sources, targets, tasks)


def one_pass(model: Transformer, batch, params) -> torch.Tensor:
    batch = batch.select(torch.argsort(batch.task, stable=True))
    split = TaskSplit(model, params)
    grads = torch.full((TASKS, split.size), float("nan"))
    row_tokens = (batch.tgt_out != PAD).sum(1)
    with split.collect(batch.task, row_tokens, TASKS, grads):
        loss, _ = model.losses(batch.src, batch.tgt_in, batch.tgt_out, 0.1)
        (loss.sum() / batch.target_tokens).backward()
    return grads


def per_sub_batch(model: Transformer, batch, params) -> torch.Tensor:
    def closure(sub):
        def run():
            loss, _ = model.losses(sub.src, sub.tgt_in, sub.tgt_out, 0.1)
            return TaskLoss(loss.sum() / batch.target_tokens)
        return run

    return per_task_gradients(params, [sub and closure(sub) for sub in batch.by_task(TASKS)]).grads


def test_one_pass_gives_the_per_task_gradients_of_one_pass_per_task():
    model = tiny_model().eval()  # no dropout: both paths compute the same function
    params = [p for p in model.parameters() if p.requires_grad]
    batch = batch_of([2, 0, 2, 2, 0, 2, 0])  # task 1 absent, rows interleaved
    expected = per_sub_batch(model, batch, params)
    got = one_pass(model, batch, params)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert got[1].abs().max() == 0 and got[0].abs().max() > 0 and got[2].abs().max() > 0
    # Every parameter (embeddings looked up and tied to the output, linear weights and biases,
    # LayerNorm scales and shifts) gets a gradient from task 0, so the comparison covers them all.
    for block in got[0].split([p.numel() for p in params]):
        assert block.abs().max() > 0


def test_rows_of_the_one_pass_sum_to_the_ordinary_gradient_and_leave_the_model_as_it_was():
    model = tiny_model(dropout=0.0).train()
    params = [p for p in model.parameters() if p.requires_grad]
    batch = batch_of([1, 0, 2, 1, 1])
    model.zero_grad(set_to_none=True)
    loss, _ = model.losses(batch.src, batch.tgt_in, batch.tgt_out, 0.1)
    (loss.sum() / batch.target_tokens).backward()
    ordinary = torch.cat([p.grad.reshape(-1) for p in params])
    model.zero_grad(set_to_none=True)
    grads = one_pass(model, batch, params)
    torch.testing.assert_close(grads.sum(0), ordinary, atol=1e-6, rtol=1e-5)
    assert all(p.requires_grad and p.grad is None for p in params)
    assert not any(module._forward_hooks for module in model.modules())


def test_a_reused_buffer_is_overwritten_and_unreached_parameters_are_zero():
    # The trainer passes the same [K, P] buffer every step; nothing of the last step may survive,
    # whether a task was present then and is absent now or a parameter takes no part at all.
    model = tiny_model().eval()
    model.unused = nn.Linear(3, 2)  # hooked, but never called by the forward pass
    params = [p for p in model.parameters() if p.requires_grad]
    split = TaskSplit(model, params)
    out = torch.full((TASKS, split.size), float("nan"))
    for tasks, seed in (([2, 0, 2, 1, 0], 1), ([1, 0, 1], 2), ([0, 0], 3)):
        batch = batch_of(tasks, seed).select(torch.argsort(torch.tensor(tasks), stable=True))
        with split.collect(batch.task, (batch.tgt_out != PAD).sum(1), TASKS, out):
            loss, _ = model.losses(batch.src, batch.tgt_in, batch.tgt_out, 0.1)
            (loss.sum() / batch.target_tokens).backward()
        torch.testing.assert_close(out, per_sub_batch(model, batch, params), atol=1e-6, rtol=1e-5)
    unused = split.offsets[model.unused.weight]
    assert out[:, unused : unused + 6].abs().max() == 0 and out[1:].abs().max() == 0


def test_layer_norms_with_trained_looking_scales_and_shifts():
    # Default LayerNorms (w = 1, b = 0) would hide a hook that confuses x̂ with the output
    # w ⊙ x̂ + b; scales and shifts away from that, a zero scale and a tiny one, must not.
    model = tiny_model().eval()
    generator = torch.Generator().manual_seed(5)
    norms = [module for module in model.modules() if isinstance(module, nn.LayerNorm)]
    with torch.no_grad():
        for module in norms:
            module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=generator))
            module.bias.copy_(torch.rand(module.bias.shape, generator=generator) - 0.5)
        norms[0].weight[0], norms[0].bias[0] = 0.0, 1.0
        norms[1].weight[3], norms[1].bias[3] = 1e-6, 1.0
    params = [p for p in model.parameters() if p.requires_grad]
    batch = batch_of([2, 0, 2, 1, 0, 2, 0], seed=4)
    torch.testing.assert_close(one_pass(model, batch, params), per_sub_batch(model, batch, params), atol=1e-6, rtol=1e-5)


def test_unsorted_rows_and_unsupported_parameters_are_refused():
    model = tiny_model()
    params = [p for p in model.parameters() if p.requires_grad]
    assert TaskSplit.supports(model, params)
    batch = batch_of([1, 0])
    with pytest.raises(ValueError, match="sorted by task"):
        with TaskSplit(model, params).collect(batch.task, torch.ones(2, dtype=torch.long), TASKS, torch.empty(TASKS, 1)):
            pass

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(2, 2)
            self.scale = nn.Parameter(torch.ones(2))  # owned by a module type TaskSplit cannot hook

    other = Scaled()
    assert not TaskSplit.supports(other, list(other.parameters()))
