"""The diagnostics behind CATS as a library: gradient similarity between tasks and groups, and
curvature (the eigenvalue/trace algorithms, and the Hessian operators of ``polycats.ops`` they
take).
``polycats analyze`` (:mod:`polycats.diagnostics.analyze`) runs them over a run's checkpoints.

>>> import torch
>>> from polycats.diagnostics import top_eigenvalue
>>> model = torch.nn.Linear(2, 1, bias=False)
>>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
>>> round(top_eigenvalue(model, lambda: (model(x) ** 2).sum()).largest_algebraic, 6)  # H = 2 xᵀx
8.0
"""

from polycats.diagnostics.curvature import (
    CurvatureReport, ExtremeEigenvalues, TraceEstimate, curvature_report, hessian_trace, hutchinson_trace, lanczos,
    power_iteration, top_eigenvalue, top_eigenvalue_weighted,
)
from polycats.diagnostics.gradients import GradientSimilarity, SimilarityTable, gradient_similarity
from polycats.diagnostics.model_summary import DiagnosticSettings, analyze_model
from polycats.ops.hessian import DoubleBackwardHVP, ForwardOverReverseHVP, HessianOperator, dense_matrix, hessian_operator
from polycats.ops.losses import combine_losses, translation_loss

__all__ = [
    "CurvatureReport", "DiagnosticSettings", "DoubleBackwardHVP", "ExtremeEigenvalues", "ForwardOverReverseHVP",
    "GradientSimilarity", "HessianOperator", "SimilarityTable", "TraceEstimate", "analyze_model", "combine_losses",
    "curvature_report", "dense_matrix", "gradient_similarity", "hessian_operator", "hessian_trace",
    "hutchinson_trace", "lanczos", "power_iteration", "top_eigenvalue", "top_eigenvalue_weighted",
    "translation_loss",
]
