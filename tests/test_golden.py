"""Golden runs: every balancer (scalar, CATS in each variant, every peer, DRO, GradVac), two-stage
sampling, the sub-batch per-task path, a skipped non-finite batch and logged diagnostics, each
trained for a few updates on a fixed seed, must reproduce the stored metrics (exact floats) and
parameters (sha256 of every tensor's bytes) bit for bit. A refactor that changes any number fails
here; a change meant to alter training regenerates the values (``python tests/test_golden.py``)
and says why in its commit.

The values are those of one torch thread on the CPU (tests/conftest.py sets it). Another CPU
rounds differently (AVX-512 kernels sum in another order than AVX2 ones: 1e-7..1e-5 relative after
five updates), so runs.json keeps the exact values per machine, keyed by a fingerprint of the
torch kernels the model uses (:func:`numerics_fingerprint`). On a machine it knows, every run must
match bit for bit; on another one, every metric and parameter must agree within
:data:`TOLERANCE` with the values of the machine that last regenerated the file, and a warning says
how to add the machine (``python tests/test_golden.py --add-machine``, only while the code still
reproduces the file's values within tolerance).
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from polycats.ops.task_split import TaskSplit
from polycats.config import config_from_dict
from polycats.train.metrics import read_metrics
from polycats.train.trainer import Trainer

from nan_injection import poison_batches

GOLDEN = Path(__file__).parent / "golden" / "runs.json"

TINY = {
    "name": "golden",
    "data": {
        "source": "synthetic", "languages": {"de": 300, "fr": 150, "sw": 60}, "valid_per_lang": 20,
        "test_per_lang": 10, "vocab_size": 60, "synthetic": {"words": 10, "min_words": 3, "max_words": 5},
        "groups": {"lores_below": 100, "hires_from": 200},
    },
    "model": {"d_model": 16, "encoder_layers": 1, "decoder_layers": 1, "heads": 2, "ffn_dim": 32, "dropout": 0.1},
    "train": {"max_updates": 5, "max_tokens": 200, "lr": 0.003, "warmup_updates": 2, "label_smoothing": 0.1,
              "valid_every": 3, "save_every": 5, "log_every": 1, "keep_snapshots": False, "seed": 3},
}

CATS_FAST = {"name": "cats", "warmup_steps": 1}

# name -> (sections merged into TINY, how the run is made: "", "sub_batches", "nan")
RUNS: dict[str, tuple[dict, str]] = {
    "scalar": ({}, ""),
    "scalar-weights-T5": ({"balancer": {"name": "scalar", "weights": {"de": 0.5, "sw": 2.0}},
                          "sampling": {"temperature": 5}}, ""),
    "sampling-weights": ({"sampling": {"weights": {"de": 1.0, "fr": 0.0, "sw": 3.0}}}, ""),
    "two-stage": ({"sampling": {"temperature": 100, "first_stage_updates": 2}}, ""),
    "two-stage-languages": ({"sampling": {"first_stage_updates": 3, "first_stage_languages": ["fr", "sw"]}}, ""),
    "cats": ({"balancer": CATS_FAST}, ""),
    "cats-default-warmup": ({"balancer": {"name": "cats"}}, ""),
    "cats-loss": ({"balancer": {**CATS_FAST, "objective": "loss"}}, ""),
    "cats-per-task": ({"balancer": {**CATS_FAST, "constraint": "per_task"}}, ""),
    "cats-hvp": ({"balancer": {**CATS_FAST, "constraint": "hvp"}}, ""),
    "cats-valid": ({"balancer": {**CATS_FAST, "source": "valid", "valid_sentences": 5}}, ""),
    "cats-valid-hvp": ({"balancer": {**CATS_FAST, "source": "valid", "constraint": "hvp", "valid_sentences": 5,
                                     "update_every": 2}}, ""),
    "cats-softmax": ({"balancer": {**CATS_FAST, "parametrisation": "softmax", "lr_alpha": 0.5}}, ""),
    "cats-sketch": ({"balancer": {**CATS_FAST, "sketch_dim": 16, "sketch_seed": 2}}, ""),
    "cats-epsilon": ({"balancer": {**CATS_FAST, "epsilon": 0.01, "gram_decay": 0.0}}, ""),
    "cats-update-every": ({"balancer": {"name": "cats", "warmup_steps": 1, "update_every": 2}}, ""),
    "cats-sub-batches": ({"balancer": {**CATS_FAST, "constraint": "hvp"}}, "sub_batches"),
    "cats-nan": ({"balancer": {"name": "cats", "warmup_steps": 1, "update_every": 2}}, "nan"),
    "scalar-nan": ({}, "nan"),
    "scalar-diagnostics": ({"train": {"diagnostics_every": 4}}, ""),
    "pcgrad": ({"balancer": {"name": "pcgrad"}}, ""),
    "pcgrad-sub-batches": ({"balancer": {"name": "pcgrad"}}, "sub_batches"),
    "gradvac": ({"balancer": {"name": "gradvac", "beta": 0.5}}, ""),
    "gradvac-per-tensor": ({"balancer": {"name": "gradvac", "grouping": "per_tensor", "task_gradient": "mean_loss"}}, ""),
    "mgda": ({"balancer": {"name": "mgda"}}, ""),
    "cagrad": ({"balancer": {"name": "cagrad"}}, ""),
    # Batches with every task: torchjd's NashMTL fails on its second solve for a single present task.
    "nashmtl": ({"balancer": {"name": "nashmtl"}, "train": {"max_tokens": 800}}, ""),
    "upgrad": ({"balancer": {"name": "upgrad", "preference": {"sw": 2.0}}}, ""),
    "upgrad-mean-loss": ({"balancer": {"name": "upgrad", "task_gradient": "mean_loss"}}, ""),
    "graddrop": ({"balancer": {"name": "graddrop", "leak": 0.1}}, ""),
    "imtlg": ({"balancer": {"name": "imtlg"}}, ""),
    "alignedmtl": ({"balancer": {"name": "alignedmtl", "preference": {"de": 1.0, "fr": 2.0, "sw": 3.0}}}, ""),
    "dro": ({"balancer": {"name": "dro", "rho": 0.5}}, ""),
    "dro-schedule": ({"balancer": {"name": "dro", "warmup_steps": 1, "update_every": 2}}, ""),
}


def run_config(sections: dict):
    tree = json.loads(json.dumps(TINY))
    for section, values in sections.items():
        tree.setdefault(section, {}).update(values)
    return config_from_dict(tree)


# Across CPUs: metrics and parameter sums/norms within these (measured AVX2 vs AVX-512: ≤ 1.1e-5 relative).
TOLERANCE = {"rel_tol": 1e-4, "abs_tol": 1e-6}


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}:".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def tensor_stats(tensors: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """Sum and norm of every tensor: what can be compared within a tolerance across CPUs."""
    return {name: [tensor.double().sum().item(), tensor.double().norm().item()]
            for name, tensor in sorted(tensors.items()) if tensor.is_floating_point()}


def numerics_fingerprint() -> str:
    """sha256 of what this machine's kernels give for the tiny model's operations (linear, attention,
    layer norm, ReLU, log-softmax and NLL, forward and backward, one Adam step) on seeded inputs:
    equal on two machines that round these the same way. Plain torch, so that no change to
    polycats can change it."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(7, 11, 16, generator=generator, requires_grad=True)
    weights = [torch.randn(shape, generator=generator, requires_grad=True) for shape in ((48, 16), (32, 16), (16, 32), (60, 16))]
    qkv = F.linear(x, weights[0]).view(7, 11, 3, 2, 8).permute(2, 0, 3, 1, 4)
    attended = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=True).transpose(1, 2).reshape(7, 11, 16)
    hidden = F.layer_norm(attended + x, (16,))
    hidden = hidden + F.linear(F.relu(F.linear(hidden, weights[1])), weights[2])
    logits = F.linear(hidden, weights[3]).reshape(-1, 60)
    target = torch.randint(60, (77,), generator=generator)
    loss = F.nll_loss(F.log_softmax(logits, dim=-1), target, reduction="sum") / 77
    loss.backward()
    optimizer = torch.optim.Adam(weights, lr=1e-3)
    optimizer.step()
    return tensor_digest({"loss": loss.detach(), "grad": x.grad, **{str(i): w.detach() for i, w in enumerate(weights)}})[:16]


def train_run(name: str, run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    sections, mode = RUNS[name]
    if mode == "nan":
        poison_batches(monkeypatch, {2, 4})  # a per-task step and a weighted one under update_every 2
    if mode == "sub_batches":
        monkeypatch.setattr(TaskSplit, "supports", staticmethod(lambda model, params: False))
    try:
        trainer = Trainer(run_config(sections), run_dir, progress=False)
        trainer.fit()
    finally:
        monkeypatch.undo()
    events = [{key: value for key, value in event.items() if key != "tokens_per_s"} for event in read_metrics(run_dir)]
    last = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    balancer_state = {key: torch.as_tensor(value) for key, value in last["balancer"].items()
                      if isinstance(value, (torch.Tensor, int, float))}
    return {"metrics": events, "model": tensor_digest(last["model"]), "balancer": tensor_digest(balancer_state),
            "stats": {"model": tensor_stats(last["model"]), "balancer": tensor_stats(balancer_state)}}


def tolerant(run: dict) -> dict:
    """What must agree within :data:`TOLERANCE` on any machine: the metrics and per-tensor sums and norms."""
    return {"metrics": run["metrics"], "stats": run["stats"]}


def exact(run: dict) -> dict:
    """What must match bit for bit on a known machine: digests of the metrics, parameters and balancer state."""
    metrics = hashlib.sha256(json.dumps(run["metrics"], sort_keys=True).encode()).hexdigest()
    return {"metrics": metrics, "model": run["model"], "balancer": run["balancer"]}


def close(got, expected, where: str) -> None:
    """``got`` equals ``expected`` in structure, its floats within :data:`TOLERANCE`."""
    if isinstance(expected, dict):
        assert sorted(got) == sorted(expected), f"{where}: keys differ"
        for key in expected:
            close(got[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert len(got) == len(expected), f"{where}: {len(got)} items, expected {len(expected)}"
        for i, (a, b) in enumerate(zip(got, expected)):
            close(a, b, f"{where}[{i}]")
    elif isinstance(expected, float):
        assert math.isclose(got, expected, **TOLERANCE), f"{where}: {got!r} vs {expected!r}"
    else:
        assert got == expected, f"{where}: {got!r} vs {expected!r}"


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text())


@pytest.fixture(scope="module")
def fingerprint() -> str:
    return numerics_fingerprint()


def test_every_run_has_golden_values(golden):
    assert sorted(golden["runs"]) == sorted(RUNS)
    assert all(sorted(machine) == sorted(RUNS) for machine in golden["exact"].values())


def test_the_fingerprint_is_stable(fingerprint):
    assert numerics_fingerprint() == fingerprint


@pytest.mark.filterwarnings("ignore:CATS:UserWarning")  # cats-epsilon's budget is below reach on purpose
@pytest.mark.parametrize("name", list(RUNS))
def test_training_is_bit_identical_to_the_golden_run(name, golden, fingerprint, tmp_path, monkeypatch):
    got = train_run(name, tmp_path / name, monkeypatch)
    close(tolerant(got), golden["runs"][name], name)  # names what moved, if much did
    if fingerprint in golden["exact"]:
        assert exact(got) == golden["exact"][fingerprint][name], f"{name}: not bit-identical (within tolerance, though)"
    else:
        warnings.warn(f"no bit-exact golden values for this CPU (numerics fingerprint {fingerprint}): compared within "
                      f"{TOLERANCE}; `python tests/test_golden.py --add-machine` adds them", stacklevel=1)


def generate() -> dict:
    import os
    import tempfile

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as scratch:
        os.environ["POLYCATS_CACHE"] = str(Path(scratch) / "cache")
        patch = pytest.MonkeyPatch()
        return {name: train_run(name, Path(scratch) / name, patch) for name in RUNS}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Regenerate tests/golden/runs.json: new values after a change meant to "
                                                 "alter training (this machine's only), or --add-machine.")
    parser.add_argument("--add-machine", action="store_true",
                        help="add this machine's exact values beside the others' (same code: checked within tolerance)")
    add_machine = parser.parse_args().add_machine
    runs, fingerprint = generate(), numerics_fingerprint()
    if add_machine:
        values = json.loads(GOLDEN.read_text())
        for name, run in runs.items():
            close(tolerant(run), values["runs"][name], name)
        values["exact"][fingerprint] = {name: exact(run) for name, run in runs.items()}
    else:
        values = {"runs": {name: tolerant(run) for name, run in runs.items()},
                  "exact": {fingerprint: {name: exact(run) for name, run in runs.items()}}}
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(values, indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}: {len(runs)} runs, exact values for {len(values['exact'])} machine(s), this one {fingerprint}",
          file=sys.stderr)
