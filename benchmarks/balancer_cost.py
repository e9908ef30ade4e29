"""Seconds per update of every balancer, and how it grows with the number of languages K.

* ``peer_rows``: all balancers on the demo preset (K = 4), as ratios against scalar and CATS.
* ``k_rows``: scalar, CATS (α every step, and every 10 steps) and PCGrad for K = 2, 4, 8, 16 languages from the Bible with the demo
  preset's model and batch (2,048 target tokens), so only K changes; half the languages HiRes
  (6,000 pairs), half LoRes (400), like the demo (K = 4 *is* the demo's data).

Timing is ``cats_overhead.interleaved``: all trainers in one process, taking turns round by round
on identical batches, medians of per-round ratios. ``backward_passes`` is the mean number of
backward passes per update: the tasks present in the batch for the per-task-gradient balancers
(LoRes tasks are often absent at T = 1, so fewer than K), one for the loss-weighting ones.

``--quick`` checks the harness only: ``tiny.py``'s toy model on synthetic data, K = 2, 4.

    python benchmarks/balancer_cost.py [--quick]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import tiny
from cats_overhead import METHODS, interleaved

from polycats.methods import PEERS

# Ordered so that K = 4 gives exactly the demo preset's languages (and shares its prepared data).
HIRES = ["de", "fr", "es", "ru", "zh", "ja", "vi", "tr"]
LORES = ["sw", "tl", "hi", "id", "ko", "fa", "ar", "pl"]
K_VALUES = (2, 4, 8, 16)
QUICK_K_VALUES = (2, 4)
HIRES_PAIRS, LORES_PAIRS = 6000, 400  # the demo preset's
K_METHODS = ("scalar", "cats", "cats/10", "pcgrad")
FIGURE = Path(__file__).resolve().parents[1] / "docs" / "figures" / "cost_vs_k.png"


def method_options(name: str) -> list[str]:
    """CATS as in cats_overhead (α updated on every step, so it pays its full cost), the rest by name."""
    return METHODS.get(name, [f"balancer.name={name}"])


def peer_rows(quick: bool) -> list[dict]:
    names = [*METHODS, *PEERS]
    timings = interleaved("demo", {name: method_options(name) for name in names},
                          updates=2 if quick else 30, warmup=1 if quick else 3, threads=tiny.THREADS if quick else 2,
                          extra=tiny.OVERRIDES if quick else [])
    return [{
        "method": name,
        "s_per_update": timings.median(name),
        "vs_scalar": timings.ratio(name, "scalar"),
        "vs_cats": timings.ratio(name, "cats"),
        "backward_passes": timings.mean_passes(name),
    } for name in names]


def languages_override(k: int, hires_pairs: int, lores_pairs: int) -> str:
    half = k // 2
    sizes = [f"{lang}: {hires_pairs}" for lang in HIRES[:half]] + [f"{lang}: {lores_pairs}" for lang in LORES[:half]]
    return "data.languages={" + ", ".join(sizes) + "}"


def k_rows(quick: bool) -> list[dict]:
    # One interleaved run over every (K, method): all K are timed round by round under the same
    # load, so the growth with K is not a drift of the machine's load between K values.
    # Quick: the synthetic source at toy sizes (tiny.SETTINGS leaves the languages to us).
    k_values = QUICK_K_VALUES if quick else K_VALUES
    pairs = (tiny.HIRES_PAIRS, tiny.LORES_PAIRS) if quick else (HIRES_PAIRS, LORES_PAIRS)
    label = lambda k, method: f"K={k} {method}"  # noqa: E731
    methods = {label(k, m): [*method_options(m), languages_override(k, *pairs)] for k in k_values for m in K_METHODS}
    timings = interleaved("demo", methods, updates=2 if quick else 20, warmup=1 if quick else 3,
                          threads=tiny.THREADS if quick else 2, extra=tiny.SETTINGS if quick else [])
    rows = [{
        "K": k,
        "method": m,
        "s_per_update": timings.median(label(k, m)),
        "vs_scalar_same_K": timings.ratio(label(k, m), label(k, "scalar")),
        "vs_same_method_K2": timings.ratio(label(k, m), label(k_values[0], m)),
        "backward_passes": timings.mean_passes(label(k, m)),
    } for m in K_METHODS for k in k_values]
    if not quick:
        plot_cost_vs_k(rows, FIGURE)
    return rows


def plot_cost_vs_k(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), constrained_layout=True)
    for method in K_METHODS:
        mine = [row for row in rows if row["method"] == method]
        ks = [row["K"] for row in mine]
        axes[0].plot(ks, [row["s_per_update"] for row in mine], marker="o", label=method)
        axes[1].plot(ks, [row["vs_scalar_same_K"] for row in mine], marker="o", label=method)
    axes[0].set_ylabel("seconds per update (median)")
    axes[1].set_ylabel("time ratio vs scalar at the same K")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(K_VALUES), [str(k) for k in K_VALUES])
        ax.set_xlabel("languages K (2,048 target tokens per batch)")
        ax.set_ylim(bottom=0)
    axes[0].legend()
    fig.suptitle("Cost per update vs number of languages (demo model, interleaved updates)", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (checks the harness, numbers are noise)")
    args = parser.parse_args()
    from benchmarks_table import print_rows

    print_rows("Seconds per update of every balancer (demo preset)", peer_rows(args.quick))
    print_rows("Cost per update vs number of languages K", k_rows(args.quick))


if __name__ == "__main__":
    main()
