"""The architecture as tests: the config loads without torch, and no import runs back up a floor."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_the_config_loads_and_validates_without_torch():
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any import of torch now fails
        from polycats.config import load_config
        from polycats.methods import METHODS
        config = load_config({str(CONFIGS / "demo.yaml")!r}, ["balancer.name=cats", "balancer.objective=loss"])
        assert config.balancer.objective == "loss" and "CATS" in METHODS
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
