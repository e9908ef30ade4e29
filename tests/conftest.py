"""Shared test settings: one torch thread (small ops are faster and results do not depend on the
machine's core count) and a private data cache per test session."""

import os

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def private_cache(tmp_path_factory):
    os.environ["POLYCATS_CACHE"] = str(tmp_path_factory.mktemp("polycats-cache"))
    yield
