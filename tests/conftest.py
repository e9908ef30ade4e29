"""Shared test settings: one torch thread (small ops are faster and results do not depend on the
machine's core count), a private data cache per test session, and hypothesis derandomized (the
same examples on every run, so CI never fails on an example no one has seen; run with
``HYPOTHESIS_PROFILE=explore`` to search afresh)."""

import os

import pytest
import torch
from hypothesis import settings

torch.set_num_threads(1)
settings.register_profile("deterministic", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))


@pytest.fixture(autouse=True, scope="session")
def private_cache(tmp_path_factory):
    os.environ["POLYCATS_CACHE"] = str(tmp_path_factory.mktemp("polycats-cache"))
    yield
