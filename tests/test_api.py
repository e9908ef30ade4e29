"""The public API: the curated export lists resolve, and every docstring example in the library
modules runs."""

from __future__ import annotations

import doctest
import importlib

import pytest

import polycats
import polycats.balance
import polycats.diagnostics

DOCUMENTED = [
    "polycats.balance", "polycats.balance.base", "polycats.balance.build", "polycats.balance.scalar",
    "polycats.balance.dro", "polycats.balance.gradvac", "polycats.balance.torchjd_peers", "polycats.balancer_config",
    "polycats.data.sampling", "polycats.diagnostics", "polycats.ops.hessian", "polycats.ops.losses",
    "polycats.ops.task_gradients", "polycats.train.state", "polycats.evaluate.scoring", "polycats.report.stats",
]


@pytest.mark.parametrize("package", [polycats, polycats.balance, polycats.diagnostics], ids=lambda p: p.__name__)
def test_every_exported_name_resolves(package):
    missing = [name for name in package.__all__ if getattr(package, name, None) is None]
    assert not missing


def test_peers_dro_and_diagnostics_are_one_import_away():
    from polycats import ChiSquareDRO, GradVac, TorchJDBalancer, top_eigenvalue  # noqa: F401
    from polycats.balance import DROConfig, MGDAConfig, StepPlan, balancer_from_config  # noqa: F401


@pytest.mark.parametrize("name", DOCUMENTED)
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name))
    assert result.failed == 0
