"""Gradient similarity between tasks and groups of tasks, per parameter, per parameter type and
for the whole model (spec: ``shared/specs/diagnostics.md``; paper Fig. 2, 3, 5-bottom).

See :mod:`polycats.ops.losses` for the loss closures every diagnostic takes.

Similarities
------------
For two gradients ``a`` and ``b`` restricted to a scope (one named parameter, all parameters of a
type, or the whole model):

* direction similarity ``cos(a, b) = <a, b> / (|a| |b|)``;
* norm similarity ``2 |a| |b| / (|a|^2 + |b|^2)`` (1 for equal norms, towards 0 when one dominates).

Zero gradients (a parameter that a task's loss does not reach, or whose gradient vanishes): the
cosine is ``NaN`` when either norm is zero (a direction is undefined); the norm similarity is
``NaN`` when both are zero and ``0`` when exactly one is (the formula's limit: one side dominates).
``NaN`` is written as ``null`` in JSON and ``nan`` in CSV; aggregates (types, whole model) simply
get no contribution from such a parameter.

All inner products are accumulated in float64 from per-scope Gram matrices, so every number is the
exact cosine of the concatenated gradients of its scope (a type's cosine is not an average of its
parameters' cosines). Each group's gradient is an exact linear combination of its tasks'
gradients, so groups cost no extra backward pass: one backward per task.

Example::

    >>> import torch
    >>> from polycats.diagnostics.gradients import gradient_similarity
    >>> model = torch.nn.Linear(2, 1, bias=False)
    >>> x = torch.eye(2)
    >>> tasks = {"a": lambda: model(x[:1]).sum(), "b": lambda: model(x[1:]).sum()}
    >>> result = gradient_similarity(model, tasks, groups={"all": ["a", "b"]})
    >>> round(result.cosine("a", "b"), 6), round(result.cosine("a", "all"), 6)
    (0.0, 0.707107)
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from polycats.ops.losses import LossClosure, ParameterFilter, eval_mode, select_parameters, split_loss

PARAMETER_TYPES = ("attention", "ffn", "embeddings", "layer_norm", "output", "other")


# --------------------------------------------------------------------------- parameter types

_OUTPUT_MODULES = {"lm_head", "output_projection", "output", "generator", "head"}


def parameter_type(name: str) -> str:
    """The type of a named parameter, from its name: ``attention``, ``ffn``, ``embeddings``,
    ``layer_norm``, ``output`` or ``other``.

    Norms are matched first, because our pre-norm layers name them after the block they feed
    (``self_attn_norm``, ``ffn_norm``). Our Transformer ties the output projection to
    ``embed.weight``, so it has no ``output`` parameter: the shared matrix counts as embeddings.
    """
    path = name.lower().split(".")[:-1]  # module path; the last part is "weight"/"bias"
    if any("norm" in part or re.fullmatch(r"ln(_.*|\d*)", part) for part in path):
        return "layer_norm"
    if any("attn" in part or "attention" in part for part in path):
        return "attention"
    if any(key in part for part in path for key in ("ffn", "mlp", "feed_forward", "feedforward")):
        return "ffn"
    if any("embed" in part for part in path):
        return "embeddings"
    if any(part in _OUTPUT_MODULES for part in path):
        return "output"
    return "other"


# --------------------------------------------------------------------------- similarity tables


def _cosine(gram: Tensor) -> Tensor:
    norms = gram.diagonal().clamp_min(0).sqrt()
    outer = norms[:, None] * norms[None, :]
    cos = gram / outer
    cos[outer == 0] = math.nan
    return cos.clamp(-1.0, 1.0)  # NaN stays NaN


def _norm_similarity(gram: Tensor) -> Tensor:
    squares = gram.diagonal().clamp_min(0)
    norms = squares.sqrt()
    denominator = squares[:, None] + squares[None, :]
    similarity = 2 * norms[:, None] * norms[None, :] / denominator
    similarity[denominator == 0] = math.nan
    return similarity


@dataclass
class SimilarityTable:
    """Inner products of ``M`` gradients over one scope, and what follows from them.

    gram: ``[M, M]`` float64, ``gram[i, j] = <g_i, g_j>`` restricted to the scope.
    """

    gram: Tensor

    @classmethod
    def from_vectors(cls, vectors: Tensor) -> SimilarityTable:
        """From ``[M, n]`` gradients (one row per task/group)."""
        v = vectors.detach().to(torch.float64)
        return cls(v @ v.T)

    @property
    def norms(self) -> Tensor:
        return self.gram.diagonal().clamp_min(0).sqrt()

    @property
    def cosine(self) -> Tensor:
        """``[M, M]`` direction similarity; NaN where either gradient is zero."""
        return _cosine(self.gram.clone())

    @property
    def norm_similarity(self) -> Tensor:
        """``[M, M]`` ``2|a||b| / (|a|^2 + |b|^2)``; NaN where both are zero, 0 where one is."""
        return _norm_similarity(self.gram.clone())

    def __add__(self, other: SimilarityTable) -> SimilarityTable:
        return SimilarityTable(self.gram + other.gram)


def _json_number(x: float) -> float | None:
    return None if math.isnan(x) else x


@dataclass
class GradientSimilarity:
    """Gradient similarities between every pair of tasks/groups, at three levels.

    names:            the compared gradients: tasks (in closure order) then groups.
    kinds:            name -> ``"task"`` or ``"group"``.
    members:          name -> the tasks it averages (a task: itself).
    losses, tokens:   name -> its loss (``sum S / sum n``) and token count ``sum n``.
    parameters:       parameter name -> :class:`SimilarityTable` (model order).
    parameter_types:  parameter name -> its type (see :func:`parameter_type`).
    types:            type -> table over all parameters of that type.
    model:            table over all selected parameters.
    signature:        how this was produced (torch version, dtype, parameter count, conventions).
    """

    names: list[str]
    kinds: dict[str, str]
    members: dict[str, list[str]]
    losses: dict[str, float]
    tokens: dict[str, float]
    parameters: dict[str, SimilarityTable]
    parameter_types: dict[str, str]
    types: dict[str, SimilarityTable]
    model: SimilarityTable
    signature: dict[str, object] = field(default_factory=dict)

    def pairs(self) -> list[tuple[str, str]]:
        """Every unordered pair ``(a, b)``, ``a`` before ``b`` in :attr:`names`."""
        return [(a, b) for i, a in enumerate(self.names) for b in self.names[i + 1 :]]

    def table(self, scope: str = "model") -> SimilarityTable:
        """``"model"``, a parameter type (``"attention"``...) or a parameter name."""
        if scope == "model":
            return self.model
        if scope in self.types:
            return self.types[scope]
        return self.parameters[scope]

    def cosine(self, a: str, b: str, scope: str = "model") -> float:
        return float(self.table(scope).cosine[self.names.index(a), self.names.index(b)])

    def norm_similarity(self, a: str, b: str, scope: str = "model") -> float:
        return float(self.table(scope).norm_similarity[self.names.index(a), self.names.index(b)])

    def heatmap(
        self, metric: str = "cosine", level: str = "parameter", pairs: Sequence[tuple[str, str]] | None = None
    ) -> tuple[list[str], list[str], np.ndarray]:
        """``(pair labels, scope labels, values [pairs, scopes])`` for a Fig. 2/3-style heatmap.

        metric: ``"cosine"`` or ``"norm_similarity"``; level: ``"parameter"`` or ``"type"``.
        """
        if metric not in ("cosine", "norm_similarity"):
            raise ValueError(f"metric must be 'cosine' or 'norm_similarity', not {metric!r}")
        tables = {"parameter": self.parameters, "type": self.types}[level]
        pairs = list(pairs) if pairs is not None else self.pairs()
        index = [(self.names.index(a), self.names.index(b)) for a, b in pairs]
        values = np.empty((len(pairs), len(tables)))
        for column, table in enumerate(tables.values()):
            matrix = getattr(table, metric)
            for row, (i, j) in enumerate(index):
                values[row, column] = float(matrix[i, j])
        return [f"{a}/{b}" for a, b in pairs], list(tables), values

    def rows(self) -> list[dict[str, object]]:
        """One flat row per (scope, pair): the CSV layout."""
        out: list[dict[str, object]] = []
        scopes = [("model", "model", self.model)]
        scopes += [("type", name, table) for name, table in self.types.items()]
        scopes += [("parameter", name, table) for name, table in self.parameters.items()]
        for level, scope, table in scopes:
            cosine, norm_sim, norms = table.cosine, table.norm_similarity, table.norms
            for a, b in self.pairs():
                i, j = self.names.index(a), self.names.index(b)
                out.append(
                    {
                        "level": level,
                        "scope": scope,
                        "type": self.parameter_types.get(scope, scope if level == "type" else ""),
                        "a": a,
                        "b": b,
                        "cosine": float(cosine[i, j]),
                        "norm_similarity": float(norm_sim[i, j]),
                        "norm_a": float(norms[i]),
                        "norm_b": float(norms[j]),
                    }
                )
        return out

    def to_dict(self) -> dict[str, object]:
        """A JSON-safe dict (NaN -> ``None``)."""

        def matrices(table: SimilarityTable) -> dict[str, object]:
            return {
                "norms": [float(x) for x in table.norms],
                "cosine": [[_json_number(float(x)) for x in row] for row in table.cosine],
                "norm_similarity": [[_json_number(float(x)) for x in row] for row in table.norm_similarity],
            }

        return {
            "signature": self.signature,
            "names": self.names,
            "kinds": self.kinds,
            "members": self.members,
            "losses": self.losses,
            "tokens": self.tokens,
            "parameter_types": self.parameter_types,
            "model": matrices(self.model),
            "types": {name: matrices(t) for name, t in self.types.items()},
            "parameters": {name: matrices(t) for name, t in self.parameters.items()},
        }

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def write_json(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    def to_csv(self) -> str:
        buffer = io.StringIO()
        columns = ["level", "scope", "type", "a", "b", "cosine", "norm_similarity", "norm_a", "norm_b"]
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows())
        return buffer.getvalue()

    def write_csv(self, path: str | Path) -> None:
        Path(path).write_text(self.to_csv())


# --------------------------------------------------------------------------- computation


def gradient_similarity(
    model: nn.Module,
    closures: Mapping[str, LossClosure],
    groups: Mapping[str, Sequence[str]] | None = None,
    *,
    parameters: ParameterFilter | None = None,
    classify: Callable[[str], str] = parameter_type,
    include_tasks: bool = True,
) -> GradientSimilarity:
    """Per-task and per-group gradients of ``model`` and their pairwise similarities.

    closures:      task name -> loss closure (see the module docstring for the convention).
    groups:        group name -> task names; its gradient is that of ``sum S_i / sum n_i``.
    parameters:    keep only parameters whose name passes this predicate (default: all trainable).
    classify:      parameter name -> type, for the per-type tables.
    include_tasks: False compares the groups only (the tasks are still needed to build them).

    One backward pass per task, with the model in eval mode (restored afterwards). Parameters a
    task does not reach have a zero gradient for it.
    """
    groups = dict(groups or {})
    tasks = list(closures)
    for group, members in groups.items():
        if group in closures:
            raise ValueError(f"group {group!r} has the name of a task")
        unknown = [t for t in members if t not in closures]
        if unknown:
            raise KeyError(f"group {group!r} names unknown tasks {unknown}")
        if not members:
            raise ValueError(f"group {group!r} is empty")
    named = select_parameters(model, parameters)
    if not named:
        raise ValueError("no trainable parameter selected")
    params = [p for _, p in named]

    # Raw per-task gradients of the loss *sums* S_i, one backward pass each.
    sizes = [p.numel() for p in params]
    raw = torch.zeros(len(tasks), sum(sizes), dtype=params[0].dtype, device=params[0].device)
    sums, counts = [], []
    with eval_mode(model):
        for k, task in enumerate(tasks):
            total, count = split_loss(closures[task]())
            grads = torch.autograd.grad(total, params, allow_unused=True)
            offset = 0
            for size, grad in zip(sizes, grads):
                if grad is not None:
                    raw[k, offset : offset + size] = grad.reshape(-1)
                offset += size
            sums.append(float(total.detach()))
            counts.append(float(count))

    # Every compared gradient is coefficients @ raw: a task is grad(S_i)/n_i, a group
    # grad(sum S_i)/sum n_i; so its Gram matrix is C (raw raw^T) C^T, scope by scope.
    names = (tasks if include_tasks else []) + list(groups)
    members = {t: [t] for t in tasks} | {g: list(m) for g, m in groups.items()}
    coefficients = torch.zeros(len(names), len(tasks), dtype=torch.float64)
    losses, tokens = {}, {}
    for row, name in enumerate(names):
        n = sum(counts[tasks.index(t)] for t in members[name])
        s = sum(sums[tasks.index(t)] for t in members[name])
        if n <= 0:
            raise ValueError(f"{name!r} has no tokens")
        for t in members[name]:
            coefficients[row, tasks.index(t)] = 1.0 / n
        losses[name], tokens[name] = s / n, n

    per_parameter: dict[str, SimilarityTable] = {}
    offset = 0
    for (name, _), size in zip(named, sizes):
        block = raw[:, offset : offset + size].to(torch.float64)
        per_parameter[name] = SimilarityTable(coefficients @ (block @ block.T).cpu() @ coefficients.T)
        offset += size
    types_of = {name: classify(name) for name, _ in named}
    per_type: dict[str, SimilarityTable] = {}
    for name, table in per_parameter.items():
        kind = types_of[name]
        per_type[kind] = per_type[kind] + table if kind in per_type else table
    ordered_types = {t: per_type[t] for t in sorted(per_type, key=_type_order)}
    whole = SimilarityTable(sum(t.gram for t in per_parameter.values()))

    signature = {
        "diagnostic": "gradient_similarity",
        "torch": torch.__version__,
        "dtype": str(params[0].dtype),
        "parameters": sum(sizes),
        "parameter_tensors": len(params),
        "mode": "eval",
        "group_loss": "sum(loss_sum) / sum(n_tokens) over the group's tasks",
        "zero_gradient": "cosine NaN if either norm is 0; norm similarity NaN if both, 0 if one",
    }
    return GradientSimilarity(
        names=names,
        kinds={n: ("group" if n in groups else "task") for n in names},
        members={n: members[n] for n in names},
        losses=losses,
        tokens=tokens,
        parameters=per_parameter,
        parameter_types=types_of,
        types=ordered_types,
        model=whole,
        signature=signature,
    )


def _type_order(kind: str) -> tuple[int, str]:
    return (PARAMETER_TYPES.index(kind) if kind in PARAMETER_TYPES else len(PARAMETER_TYPES), kind)
