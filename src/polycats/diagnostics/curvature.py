"""Curvature of a loss: Hessian-vector products, extreme eigenvalues and the Hessian trace.

Algorithms separate from operators (as in hessian-eigenthings): they take any
:class:`~polycats.ops.hessian.HessianOperator` (``polycats.ops.hessian``): :func:`power_iteration`,
:func:`lanczos` (plain Lanczos for the top end, the default; ARPACK through
``scipy.sparse.linalg.eigsh`` for both ends), :func:`hutchinson_trace`. Vectors live in float64 on
the algorithm side and are cast to the operator's dtype only for the product.

Eigenvalue labels (the Hessian is indefinite; early in training its spectrum can be dominated by
a negative eigenvalue):

* ``largest_algebraic``: the largest eigenvalue ``lambda_max`` (what the paper plots);
* ``largest_magnitude``: the eigenvalue with the largest ``|lambda|``, signed;
* ``smallest_algebraic``: ``lambda_min`` when the method knows it, else ``None``.

Power iteration converges to the largest-magnitude eigenvalue ``mu``. If ``mu >= 0`` it is also
the largest algebraic one. If ``mu < 0`` (so ``mu = lambda_min``) we run power iteration again on
``H - mu I``, whose spectrum lies in ``[0, lambda_max - mu]``, and add ``mu`` back. Lanczos
(``ends="top"``, the default) runs plain Lanczos until the residual bound of the largest-magnitude
Ritz value is within ``tol`` and, only when that value is negative, that of ``lambda_max`` too
(same Krylov space): the same labels as power iteration. With ``ends="both"`` it asks ARPACK for
one eigenvalue at each end (``which="BE"``) and reads all three labels off them.

The reused graph (:class:`DoubleBackwardHVP`, the default :data:`DEFAULT_HVP`) is the fastest
operator on our Transformer; timings per product and of whole solves are in docs/performance.md
(``python benchmarks/run.py``).

Example::

    >>> import torch
    >>> from polycats.diagnostics.curvature import top_eigenvalue
    >>> model = torch.nn.Linear(3, 1, bias=False)
    >>> with torch.no_grad():
    ...     _ = model.weight.copy_(torch.tensor([[0.5, -1.0, 2.0]]))
    >>> x = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    >>> loss = lambda: (model(x) ** 2).sum()  # Hessian 2 x^T x = diag(2, 8, 0)
    >>> result = top_eigenvalue(model, loss)  # top-only Lanczos
    >>> round(result.largest_algebraic, 6), result.smallest_algebraic, result.converged
    (8.0, None, True)
    >>> both = top_eigenvalue(model, loss, ends="both")  # ARPACK: lambda_min too
    >>> round(both.largest_algebraic, 6), round(both.smallest_algebraic, 6)
    (8.0, 0.0)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from polycats.ops.hessian import DEFAULT_HVP, HessianOperator, hessian_operator, matvec64
from polycats.ops.losses import LossClosure, ParameterFilter, combine_losses


class _Observed:
    """An operator that calls ``on_product(products so far)`` after each product (progress bars)."""

    def __init__(self, op: HessianOperator, on_product: Callable[[int], None]):
        self.op, self.on_product, self.products = op, on_product, 0
        self.size, self.dtype, self.device = op.size, op.dtype, op.device

    def matvec(self, v: Tensor) -> Tensor:
        product = self.op.matvec(v)
        self.products += 1
        self.on_product(self.products)
        return product


class _Shifted:
    """``H - shift I``."""

    def __init__(self, op: HessianOperator, shift: float):
        self.op, self.shift = op, shift
        self.size, self.dtype, self.device = op.size, op.dtype, op.device

    def matvec(self, v: Tensor) -> Tensor:
        return self.op.matvec(v) - self.shift * v.to(self.dtype)


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class ExtremeEigenvalues:
    """Eigenvalues at the ends of a Hessian's spectrum, labelled (see the module docstring).

    largest_algebraic:  ``lambda_max``.
    largest_magnitude:  the eigenvalue with the largest ``|lambda|``, with its sign.
    smallest_algebraic: ``lambda_min``, or None when the method did not find it.
    method:             ``"power_iteration"`` or ``"lanczos"``.
    matvecs:            Hessian-vector products used.
    converged:          whether every run met its tolerance within its iteration budget.
    settings:           tolerance, seed, iteration limits, operator.
    """

    largest_algebraic: float
    largest_magnitude: float
    smallest_algebraic: float | None
    method: str
    matvecs: int
    converged: bool
    settings: dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class TraceEstimate:
    """Hutchinson's estimate of ``tr H`` from ``samples`` Rademacher probes: mean and its standard
    error ``std(v^T H v, ddof=1) / sqrt(samples)``."""

    trace: float
    stderr: float
    samples: int
    settings: dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


# --------------------------------------------------------------------------- algorithms


def _random_unit(size: int, generator: torch.Generator) -> Tensor:
    v = torch.randn(size, generator=generator, dtype=torch.float64)
    return v / v.norm()


def _power(
    op: HessianOperator, v: Tensor, tol: float, max_iter: int, shift: float = 0.0
) -> tuple[float, Tensor, int, bool]:
    """Power iteration on ``op = H - shift I`` from unit ``v``.

    Returns ``(Rayleigh quotient of op, vector, products, converged)``. With ``theta`` the Rayleigh
    quotient and ``lambda = theta + shift`` the estimate of H's eigenvalue, it stops when both

    * ``|theta_k - theta_{k-1}| <= tol * scale`` (PyHessian's relative-change rule), and
    * ``|H v - lambda v| <= sqrt(tol) * scale`` (the residual; the eigenvalue error is about
      ``residual^2 / gap``),

    with ``scale = |lambda| + tol |shift|``: tolerances are relative to H's eigenvalue, not to the
    shifted operator's. Both choices matter on a shifted operator: a random start vector lies
    mostly in the bulk of near-zero eigenvalues of H, so at first the Rayleigh quotient of
    ``H - shift I`` is about ``-shift`` and moves by far less than ``tol`` relative to itself.
    PyHessian's rule applied to the shifted quotient stopped within a few products on a randomly
    initialised Transformer (d_model 64) and reported ``lambda_max = 0.0005`` instead of 1.128.
    """
    previous: float | None = None
    theta = 0.0
    for step in range(1, max_iter + 1):
        hv = matvec64(op, v)
        theta = float(v @ hv)
        norm = float(hv.norm())
        if norm == 0:  # v is in the null space of op
            return 0.0, v, step, True
        scale = abs(theta + shift) + tol * abs(shift)
        residual = float((hv - theta * v).norm())
        if (
            previous is not None
            and abs(theta - previous) <= tol * scale
            and residual <= math.sqrt(tol) * scale
        ):
            return theta, hv / norm, step, True
        previous = theta
        v = hv / norm
    return theta, v, max_iter, False


def power_iteration(
    op: HessianOperator,
    *,
    tol: float = 1e-3,
    max_iter: int = 100,
    seed: int = 0,
    both_ends: bool = False,
) -> ExtremeEigenvalues:
    """Power iteration (PyHessian-style) for the largest-magnitude and largest eigenvalue.

    tol:       relative tolerance (PyHessian's default 1e-3), see :func:`_power` for the rule
               (PyHessian's relative change of the Rayleigh quotient plus a residual guard).
    max_iter:  products per run; a run that hits it is reported with ``converged=False``.
    seed:      the start vector is ``randn`` from a generator seeded with ``seed``.
    both_ends: also find ``lambda_min`` when the dominant eigenvalue is positive (one more run on
               the shifted operator); otherwise ``smallest_algebraic`` is only set when the dominant
               eigenvalue is negative.

    The second run (on ``H - mu I``) converges at rate ``(lambda_2 - mu) / (lambda_max - mu)``,
    which is close to 1 when ``|mu|`` is much larger than the gap at the top: then it needs many
    products, and :func:`lanczos` is the better tool. Power iteration also cannot settle when
    ``lambda_max = -lambda_min`` exactly.
    """
    generator = torch.Generator().manual_seed(seed)
    mu, _, products, converged = _power(op, _random_unit(op.size, generator), tol, max_iter)
    largest, smallest = mu, None
    if mu != 0 and (mu < 0 or both_ends):
        # H - mu I is positive semi-definite (mu < 0) or negative semi-definite (mu > 0), so its
        # dominant eigenvalue is the other end of H's spectrum, shifted by -mu.
        start = _random_unit(op.size, generator)
        other, _, more, other_converged = _power(_Shifted(op, mu), start, tol, max_iter, shift=mu)
        products += more
        converged = converged and other_converged
        if mu < 0:
            largest, smallest = other + mu, mu
        else:
            smallest = other + mu
    elif mu == 0:
        smallest = 0.0
    return ExtremeEigenvalues(
        largest_algebraic=largest,
        largest_magnitude=mu,
        smallest_algebraic=smallest,
        method="power_iteration",
        matvecs=products,
        converged=converged,
        settings={"tol": tol, "max_iter": max_iter, "seed": seed, "both_ends": both_ends},
    )


#: Most Lanczos steps (products) of one ``ends="top"`` run when ``max_iter`` is None. The basis
#: is kept for full reorthogonalisation: ``k`` float64 vectors of ``P`` entries after ``k`` steps.
TOP_MAX_ITER = 100
#: ``lambda_max`` is resolved relative to at least this fraction of ``|mu|`` (``sqrt(eps)``).
_FLOOR = math.sqrt(np.finfo(np.float64).eps)


def _top_lanczos(op: HessianOperator, v: Tensor, tol: float, max_iter: int) -> tuple[float, float, int, bool]:
    """Plain Lanczos with full reorthogonalisation from unit ``v``, stopping as early as ``tol`` allows.

    After step ``k`` (``k`` products) the tridiagonal ``T_k`` has Ritz pairs ``(theta_i, s_i)``
    (``scipy.linalg.eigh_tridiagonal``); the Ritz vector ``y_i = Q_k s_i`` has residual
    ``|H y_i - theta_i y_i| = |beta_k s_i[k]|``, so some eigenvalue of H lies within that of
    ``theta_i``. It stops at the first ``k`` where the largest-magnitude Ritz value ``mu`` has
    ``|beta_k s[k]| <= tol * |mu|`` and, when ``mu < 0``, the largest Ritz value ``theta_max``
    (another Ritz value than ``mu``) meets the same bound, with ``|theta_max|`` floored at
    ``sqrt(eps) |mu|`` (a ``lambda_max`` of 0 has no relative accuracy); or when the Krylov space is exhausted
    (``beta_k = 0`` or ``k = P``: the Ritz values are then eigenvalues).

    Returns ``(mu, theta_max, products, converged)``; ``converged`` is False when ``max_iter``
    steps did not meet the bound (the last Ritz values are returned).
    """
    from scipy.linalg import eigh_tridiagonal

    steps = min(max_iter, op.size)
    basis = torch.empty(min(steps, 16), op.size, dtype=torch.float64)
    alphas: list[float] = []
    betas: list[float] = []
    mu = largest = 0.0
    for k in range(steps):
        if k == basis.shape[0]:  # grow the basis storage (rows are kept)
            basis.resize_(min(2 * k, steps), op.size)
        basis[k] = v
        w = matvec64(op, v)
        alphas.append(float(v @ w))
        # The three-term recurrence, then one pass of full reorthogonalisation, repeated only
        # when that pass removed most of w (the DGKS test): the basis is swept about once per
        # product, not twice — it is memory-bound, about a tenth of a product's time at k = 12.
        w.add_(v, alpha=-alphas[-1])
        if k:
            w.add_(basis[k - 1], alpha=-betas[-1])
        beta = float(w.norm())
        for _ in range(2):
            w.addmv_(basis[: k + 1].T, basis[: k + 1] @ w, alpha=-1)
            before, beta = beta, float(w.norm())
            if beta > before / math.sqrt(2):
                break
        thetas, vectors = eigh_tridiagonal(np.asarray(alphas), np.asarray(betas))
        bounds = beta * np.abs(vectors[-1])
        top = int(np.argmax(thetas))
        dominant = int(np.argmax(np.abs(thetas)))
        mu, largest = float(thetas[dominant]), float(thetas[top])
        exhausted = beta <= np.finfo(np.float64).eps * max(abs(mu), 1e-300) or k + 1 == op.size
        converged = bounds[dominant] <= tol * abs(mu) and (
            mu >= 0 or (top != dominant and bounds[top] <= tol * max(abs(largest), _FLOOR * abs(mu)))
        )
        if converged or exhausted:
            return mu, largest, k + 1, True
        betas.append(beta)
        v = w / beta
    return mu, largest, steps, False


def lanczos(
    op: HessianOperator,
    *,
    tol: float = 1e-4,
    max_iter: int | None = None,
    ncv: int | None = None,
    seed: int = 0,
    ends: str = "top",
) -> ExtremeEigenvalues:
    """Lanczos for the ends of the spectrum.

    ends: ``"top"`` (default): plain Lanczos with full reorthogonalisation (:func:`_top_lanczos`)
          that checks its Ritz values after every product and stops once the largest-magnitude
          one ``mu`` has converged and, only when ``mu < 0``, the largest one (``lambda_max``)
          too, in the same Krylov space; as with :func:`power_iteration`, ``smallest_algebraic``
          is then ``mu``, else None.
          ``"both"``: implicitly restarted Lanczos (ARPACK, ``scipy.sparse.linalg.eigsh``), one
          eigenvalue from each end (``which="BE"``, ``k=2``), so all three labels are known.
          ``"top"`` is much cheaper: ``"both"`` must also resolve
          ``lambda_min`` to ``tol`` relative, and when ``lambda_min`` sits at the edge of the
          near-zero bulk that takes most of the products (benchmark Transformer, d_model 32,
          trained 20 steps: 263 products for both ends at tol 1e-8), and ARPACK cannot stop
          before it has filled its basis of ``ncv`` vectors.
    tol: relative accuracy. ``"both"``: ARPACK's (relative to each eigenvalue). ``"top"``: the
         residual bound ``|H y - theta y| <= tol |theta|`` of each Ritz value it returns, so an
         eigenvalue of H lies within ``tol |theta|`` (conservative: the error is usually about
         ``residual^2 / gap``).
    max_iter: ``"both"``: ARPACK's restarts (``maxiter``); ``"top"``: products per run (default
              :data:`TOP_MAX_ITER`; the basis holds one float64 vector of P per product).
    ncv: ARPACK's basis size (``"both"`` only; default ``min(P, 20)``).
    seed: the start vector.
    A float32 operator limits the attainable accuracy to about 1e-6 relative.
    """
    from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

    if ends not in ("both", "top"):
        raise ValueError(f"ends must be 'both' or 'top', not {ends!r}")
    generator = torch.Generator().manual_seed(seed)
    if ends == "top":
        if ncv is not None:
            raise ValueError('ncv is an ARPACK setting: ends="top" runs plain Lanczos (use max_iter)')
        limit = TOP_MAX_ITER if max_iter is None else max_iter
        magnitude, largest, matvecs, converged = _top_lanczos(op, _random_unit(op.size, generator), tol, limit)
        return ExtremeEigenvalues(
            largest_algebraic=largest if magnitude < 0 else magnitude,
            largest_magnitude=magnitude,
            smallest_algebraic=magnitude if magnitude < 0 else None,
            method="lanczos",
            matvecs=matvecs,
            converged=converged,
            settings={"tol": tol, "max_iter": limit, "seed": seed, "ends": ends,
                      "which": "LM+LA" if magnitude < 0 else "LM"},
        )

    matvecs = 0

    def matvec(x: np.ndarray) -> np.ndarray:
        nonlocal matvecs
        matvecs += 1
        return matvec64(op, torch.from_numpy(np.asarray(x, dtype=np.float64).reshape(-1))).numpy()

    settings: dict[str, object] = {"tol": tol, "max_iter": max_iter, "ncv": ncv, "seed": seed, "ends": ends}
    if op.size < 3:  # ARPACK needs k < P; a 1x1 or 2x2 Hessian is cheaper to write down
        values = torch.linalg.eigvalsh(dense_matrix(op)).tolist()
        converged, settings["which"], matvecs = True, "dense", op.size
    else:
        operator = LinearOperator((op.size, op.size), matvec=matvec, dtype=np.float64)
        v0 = _random_unit(op.size, generator).numpy()
        settings["which"] = "BE"
        try:
            values = eigsh(operator, k=2, which="BE", tol=tol, maxiter=max_iter, ncv=ncv, v0=v0,
                           return_eigenvectors=False).tolist()
            converged = True
        except ArpackNoConvergence as error:
            if not len(error.eigenvalues):
                raise
            values, converged = list(error.eigenvalues), False
    largest, smallest = max(values), min(values)
    magnitude = largest if abs(largest) >= abs(smallest) else smallest
    return ExtremeEigenvalues(
        largest_algebraic=float(largest),
        largest_magnitude=float(magnitude),
        smallest_algebraic=float(smallest),
        method="lanczos",
        matvecs=matvecs,
        converged=converged,
        settings=settings,
    )


def hutchinson_trace(op: HessianOperator, *, samples: int = 100, seed: int = 0) -> TraceEstimate:
    """``tr H ~ mean(v^T H v)`` over Rademacher ``v``, with its standard error."""
    if samples < 2:
        raise ValueError("need at least 2 samples for a standard error")
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(samples):
        v = torch.randint(0, 2, (op.size,), generator=generator).to(torch.float64) * 2 - 1
        values.append(float(v @ matvec64(op, v)))
    array = np.asarray(values)
    return TraceEstimate(
        trace=float(array.mean()),
        stderr=float(array.std(ddof=1) / math.sqrt(samples)),
        samples=samples,
        settings={"seed": seed, "distribution": "rademacher"},
    )


EIGEN_METHODS = {"power_iteration": power_iteration, "lanczos": lanczos}


# --------------------------------------------------------------------------- conveniences


def top_eigenvalue(
    model: nn.Module,
    loss: LossClosure,
    *,
    method: str = "lanczos",
    hvp: str = DEFAULT_HVP,
    parameters: ParameterFilter | None = None,
    on_product: Callable[[int], None] | None = None,
    **solver: object,
) -> ExtremeEigenvalues:
    """The extreme Hessian eigenvalues of ``loss`` w.r.t. ``model``'s trainable parameters.

    loss:       a closure (``(loss_sum, n_tokens)`` or a scalar; see :mod:`.gradients`).
    method:     ``"lanczos"`` (top-only by default) or ``"power_iteration"``; ``solver`` goes to
                that function (``tol``, ``max_iter``, ``seed``, ``ends``...).
    hvp:        ``"double_backward"`` or ``"forward_over_reverse"``.
    parameters: predicate on parameter names (default: all trainable parameters).
    on_product: called with the number of products so far after each one (progress bars).

    The model runs in eval mode; its mode is restored afterwards. The result's ``settings``
    record the operator and the parameter count.
    """
    if method not in EIGEN_METHODS:
        raise ValueError(f"method must be one of {sorted(EIGEN_METHODS)}, not {method!r}")
    op = hessian_operator(model, loss, hvp=hvp, parameters=parameters)
    result = EIGEN_METHODS[method](op if on_product is None else _Observed(op, on_product), **solver)
    return _with_settings(result, hvp=hvp, parameters=op.size, dtype=str(op.dtype))


def top_eigenvalue_weighted(
    model: nn.Module,
    closures: Mapping[str, LossClosure],
    weights: Mapping[str, float],
    **options: object,
) -> ExtremeEigenvalues:
    """:func:`top_eigenvalue` of the combined loss ``sum_i w_i S_i / sum_i n_i`` (the loss the
    trainer optimises with the balancer's weights ``w``)."""
    return top_eigenvalue(model, combine_losses(closures, weights), **options)


def hessian_trace(
    model: nn.Module,
    loss: LossClosure,
    *,
    samples: int = 100,
    seed: int = 0,
    hvp: str = DEFAULT_HVP,
    parameters: ParameterFilter | None = None,
) -> TraceEstimate:
    """Hutchinson's trace estimate of the Hessian of ``loss`` (see :func:`hutchinson_trace`)."""
    op = hessian_operator(model, loss, hvp=hvp, parameters=parameters)
    return hutchinson_trace(op, samples=samples, seed=seed)


@dataclass
class CurvatureReport:
    """Extreme eigenvalues of each task's, each group's and the combined loss."""

    tasks: dict[str, ExtremeEigenvalues]
    groups: dict[str, ExtremeEigenvalues]
    combined: ExtremeEigenvalues | None
    weights: dict[str, float] | None
    signature: dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return {
            "signature": self.signature,
            "weights": self.weights,
            "tasks": {name: r.to_dict() for name, r in self.tasks.items()},
            "groups": {name: r.to_dict() for name, r in self.groups.items()},
            "combined": None if self.combined is None else self.combined.to_dict(),
        }


def curvature_report(
    model: nn.Module,
    closures: Mapping[str, LossClosure],
    groups: Mapping[str, Sequence[str]] | None = None,
    weights: Mapping[str, float] | None = None,
    *,
    include_tasks: bool = True,
    progress: Callable[[str, int], None] | None = None,
    **options: object,
) -> CurvatureReport:
    """Top eigenvalues for (a) each task, (b) each group (token-weighted mean loss over its tasks)
    and (c) the combined training loss with the balancer's ``weights`` (skipped when None).

    ``options`` go to :func:`top_eigenvalue` (``method``, ``hvp``, ``parameters``, ``tol``...;
    by default top-only Lanczos at tol 1e-4). ``progress(label, products)``, if given, is called
    with 0 when a solve starts and after each of its products; labels are ``"task <name>"``,
    ``"group <name>"`` and ``"combined"``.
    """
    groups = dict(groups or {})

    def solve(label: str, loss: LossClosure) -> ExtremeEigenvalues:
        if progress is None:
            return top_eigenvalue(model, loss, **options)
        progress(label, 0)
        return top_eigenvalue(model, loss, on_product=lambda products: progress(label, products), **options)

    tasks = {name: solve(f"task {name}", loss) for name, loss in closures.items()} if include_tasks else {}
    group_results = {
        name: solve(f"group {name}", combine_losses({t: closures[t] for t in members}))
        for name, members in groups.items()
    }
    combined = None if weights is None else solve("combined", combine_losses(closures, weights))
    signature = {
        "diagnostic": "curvature",
        "torch": torch.__version__,
        "mode": "eval",
        "group_loss": "sum(loss_sum) / sum(n_tokens) over the group's tasks",
        "combined_loss": "sum(w_i * loss_sum_i) / sum(n_tokens_i)",
        "options": {k: (v if isinstance(v, int | float | str | bool | None) else repr(v)) for k, v in options.items()},
    }
    return CurvatureReport(
        tasks=tasks,
        groups=group_results,
        combined=combined,
        weights=None if weights is None else {k: float(v) for k, v in weights.items()},
        signature=signature,
    )


def _with_settings(result: ExtremeEigenvalues, **extra: object) -> ExtremeEigenvalues:
    return ExtremeEigenvalues(**{**asdict(result), "settings": {**result.settings, **extra}})
