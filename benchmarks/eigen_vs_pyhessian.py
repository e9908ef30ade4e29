"""Top Hessian eigenvalue: our solvers vs PyHessian on the same model and batch.

The model is our Transformer (3+3 layers, vocab 8000, batch 16 x 32 tokens as in the spec's
reference figure), trained a few Adam steps on the batch so the spectrum is dominated by a positive
eigenvalue (both tools then find the same, largest-magnitude one). The reference value is our
Lanczos at tol 1e-8. Each solver runs at its default tolerance; the row shows its time, Hessian-
vector products, relative error vs the reference and the speed-up over PyHessian.

    python benchmarks/eigen_vs_pyhessian.py --d-model 128
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from polycats.diagnostics.curvature import hessian_operator, lanczos, power_iteration
from polycats.diagnostics.gradients import translation_loss
from polycats.model.transformer import Transformer, TransformerShape


class PyHessianModel(nn.Module):
    """Our Transformer in PyHessian's calling convention: ``model(inputs) -> outputs``."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, inputs):
        return self.model(*inputs)


def problem(d_model: int, vocab: int = 8000, batch: int = 16, length: int = 32, steps: int = 20, seed: int = 0):
    torch.manual_seed(seed)
    shape = TransformerShape(vocab_size=vocab, d_model=d_model, encoder_layers=3, decoder_layers=3, heads=4,
                             ffn_dim=4 * d_model, dropout=0.0)
    model = Transformer(shape)
    src = torch.randint(4, vocab, (batch, length))
    tgt = torch.randint(4, vocab, (batch, length + 1))
    tgt_in, target = tgt[:, :-1], tgt[:, 1:]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(src, tgt_in).reshape(-1, vocab), target.reshape(-1)).backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    model.eval()
    return model, src, tgt_in, target, shape


def timed(fn):
    started = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - started


def run(d_model: int = 128, steps: int = 20, pyhessian_tol: float = 1e-3) -> list[dict]:
    import pyhessian

    model, src, tgt_in, target, shape = problem(d_model, steps=steps)
    closure = translation_loss(model, src, tgt_in, target, shape.pad_id)
    reference = lanczos(hessian_operator(model, closure), tol=1e-8).largest_magnitude

    def ours(method, **options):
        op = hessian_operator(model, closure)
        result, seconds = timed(lambda: method(op, **options))
        return result.largest_magnitude, seconds, result.matvecs

    def theirs():
        def criterion(logits, y):
            return F.cross_entropy(logits.reshape(-1, shape.vocab_size), y.reshape(-1), ignore_index=shape.pad_id)

        wrapped = PyHessianModel(model)
        with sdpa_kernel(SDPBackend.MATH):
            h = pyhessian.hessian(wrapped, criterion, data=((src, tgt_in), target), cuda=False)
            values, _ = h.eigenvalues(maxIter=100, tol=pyhessian_tol, top_n=1)
        model.zero_grad(set_to_none=True)
        return values[0]

    (value, seconds) = timed(theirs)
    rows = [{"solver": f"PyHessian power iteration (tol {pyhessian_tol:g})", "seconds": seconds, "hvps": None,
             "eigenvalue": value}]
    for name, method, options in (("ours: power iteration (tol 1e-3)", power_iteration, {"tol": 1e-3}),
                                  ("ours: Lanczos (tol 1e-3)", lanczos, {"tol": 1e-3}),
                                  ("ours: Lanczos (tol 1e-2)", lanczos, {"tol": 1e-2})):
        value, seconds, hvps = ours(method, **options)
        rows.append({"solver": name, "seconds": seconds, "hvps": hvps, "eigenvalue": value})
    base = rows[0]["seconds"]
    for row in rows:
        row["rel_error"] = abs(row["eigenvalue"] - reference) / abs(reference)
        row["speedup_vs_pyhessian"] = base / row["seconds"]
        row["hvps"] = "—" if row["hvps"] is None else row["hvps"]
    parameters = sum(p.numel() for p in model.parameters())
    for row in rows:
        row["model"] = f"d{d_model} ({parameters / 1e6:.1f}M)"
    return rows


def hvp_rows(d_model: int = 128, repeats: int = 5) -> list[dict]:
    """Seconds per Hessian-vector product: double backward (graph kept) vs forward-over-reverse."""
    model, src, tgt_in, target, shape = problem(d_model, steps=0)
    closure = translation_loss(model, src, tgt_in, target, shape.pad_id)
    rows = []
    for hvp in ("double_backward", "forward_over_reverse"):
        op = hessian_operator(model, closure, hvp=hvp)
        vector = torch.randn(op.size)
        op.matvec(vector)  # builds the graph / warms up
        _, seconds = timed(lambda: [op.matvec(vector) for _ in range(repeats)])
        rows.append({"hvp": hvp, "model": f"d{d_model}", "s_per_hvp": seconds / repeats})
    for row in rows:
        row["ratio_vs_double_backward"] = row["s_per_hvp"] / rows[0]["s_per_hvp"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    from benchmarks_table import print_rows

    print_rows("Top eigenvalue vs PyHessian", run(args.d_model, args.steps))
    print_rows("Hessian-vector products", hvp_rows(args.d_model))


if __name__ == "__main__":
    main()
