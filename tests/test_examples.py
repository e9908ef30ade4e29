"""The examples run as written, as subprocesses, at tiny size: the plain loop with CATS, a torchjd
aggregator and the scalar balancer; the HF Marian on a tiny Bible subset with CATS."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(script: str, *args: str, cwd: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # POLYCATS_CACHE: the session's private cache (conftest)
    result = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True,
                            timeout=300, cwd=cwd, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.parametrize("method", ["cats", "upgrad", "scalar"])
def test_the_plain_loop_trains_with_each_kind_of_balancer(method, tmp_path):
    out = run("plain_loop.py", "--method", method, "--steps", "60", cwd=tmp_path)
    match = re.search(rf"^{method}: mean squared error before (\{{.*?\}}), after 60 steps (\{{.*?\}})$", out, re.M)
    assert match, out
    before, after = (ast.literal_eval(group) for group in match.groups())
    assert sum(after.values()) < 0.8 * sum(before.values())
    if method == "cats":
        alpha = ast.literal_eval(out.strip().splitlines()[-1])
        assert alpha["alpha/de-en"] + alpha["alpha/sw-en"] == pytest.approx(2.0, abs=2e-3)  # printed rounded
        assert alpha["alpha/sw-en"] != 1.0  # moved after the 10 warm-up steps


def test_an_unknown_method_is_refused_by_name(tmp_path):
    result = subprocess.run([sys.executable, str(EXAMPLES / "plain_loop.py"), "--method", "nope"], capture_output=True,
                            text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 2 and "nope" in result.stderr and "pcgrad" in result.stderr


def test_the_hf_marian_example_trains_with_cats_and_scores_each_language(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    out = run("hf_marian.py", "--steps", "4", "--batch-size", "16", "--eval-sentences", "4", "--threads", "1",
              "--set", "data.languages={de: 120, sw: 30}", "--set", "data.valid_per_lang=8",
              "--set", "data.test_per_lang=8", "--set", "data.vocab_size=400", "--set", "data.tokenizer_sentences=1500",
              "--set", "data.groups={lores_below: 50, hires_from: 100}",
              "--set", "model={d_model: 32, encoder_layers: 1, decoder_layers: 1, heads: 2, ffn_dim: 64}",
              "--set", "balancer.warmup_steps=2", "--out", str(tmp_path / "run"), cwd=tmp_path)
    alpha = ast.literal_eval(re.search(r"^alpha after step 4 (\{.*\})$", out, re.M).group(1))
    assert set(alpha) == {"alpha/de-en", "alpha/sw-en"} and alpha["alpha/sw-en"] != 1.0
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[-5:]}
    for name in ("de-en", "sw-en", "LoRes", "HiRes", "All"):
        assert name in rows and all(0.0 <= float(value) <= 100.0 for value in rows[name]), out
    assert any(path.name.startswith("events.out.tfevents") for path in (tmp_path / "run").rglob("*"))  # TensorBoard
