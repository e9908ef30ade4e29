"""Figures (matplotlib, Agg backend, PNG): similarity heatmaps and curves over training."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def similarity_heatmap(similarity, path: Path, title: str = "") -> None:
    """Paper Fig 2: parameters (x) × task/group pairs (y), direction and norm similarity."""
    fig, axes = plt.subplots(2, 1, figsize=(14, 7), constrained_layout=True)
    for ax, kind, label in ((axes[0], "cosine", "direction (cosine)"), (axes[1], "norm_similarity", "norm similarity")):
        pairs, parameters, values = similarity.heatmap(kind)
        matrix = np.asarray(values, dtype=float)
        image = ax.imshow(matrix, aspect="auto", cmap="RdBu_r" if kind == "cosine" else "viridis",
                          vmin=-1 if kind == "cosine" else 0, vmax=1, interpolation="nearest")
        ax.set_yticks(range(len(pairs)), pairs, fontsize=7)
        ax.set_xticks([])
        ax.set_xlabel(f"{len(parameters)} parameter tensors (encoder → decoder)")
        ax.set_title(f"{title} — {label}")
        fig.colorbar(image, ax=ax)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def line_panels(panels: list[tuple[str, dict[str, tuple[list, list]], dict]], path: Path) -> None:
    """One row of panels ``(title, {line name: (updates, values)}, plot options)`` over updates,
    the legend on the first; lines without points are left out."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), constrained_layout=True)
    for ax, (title, lines, style) in zip(axes, panels):
        for name, (xs, ys) in lines.items():
            if xs:
                ax.plot(xs, ys, label=name, **style)
        ax.set_title(title)
        ax.set_xlabel("update")
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def training_curves(runs: dict[str, list[dict]], path: Path) -> None:
    """Paper Fig 5: λ_max (HiRes, LoRes, combined) and the HiRes/LoRes cosine over updates, one
    line per run."""
    keys = [("lambda_max/HiRes", "λ_max HiRes"), ("lambda_max/LoRes", "λ_max LoRes"),
            ("lambda_max/combined", "λ_max combined"), ("cosine/HiRes-LoRes", "cosine HiRes/LoRes")]
    line_panels([(label, {name: ([p["update"] for p in points if p.get(key) is not None],
                                 [p[key] for p in points if p.get(key) is not None]) for name, points in runs.items()},
                  {"marker": "o"}) for key, label in keys], path)


def nll_curves(runs: dict[str, list[dict]], path: Path) -> None:
    """Paper Fig 1/6: train and valid NLL of the LoRes and HiRes groups over updates, one line per
    run (``runs``: name -> metrics.jsonl events)."""
    panels = [("train", "train_nll/LoRes"), ("train", "train_nll/HiRes"), ("valid", "valid_nll/LoRes"), ("valid", "valid_nll/HiRes")]

    def series(events: list[dict], event: str, key: str) -> tuple[list, list]:
        chosen = [e for e in events if e.get("event") == event and e.get(key) is not None]
        return [e["update"] for e in chosen], [e[key] for e in chosen]

    line_panels([(key, {name: series(events, event, key) for name, events in runs.items()},
                  {"marker": "o" if event == "valid" else None, "markersize": 3}) for event, key in panels], path)


def alpha_curves(events: list[dict], path: Path, title: str = "CATS") -> None:
    """α per task and λ over training (keys ``alpha/<task>`` and ``lambda`` of metrics.jsonl)."""
    train = [e for e in events if e.get("event") == "train"]
    alphas = sorted({k for e in train for k in e if k.startswith("alpha/")})
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2), constrained_layout=True)
    for key in alphas:
        points = [(e["update"], e[key]) for e in train if e.get(key) is not None]
        left.plot(*zip(*points), label=key.removeprefix("alpha/"))
    left.set_title(f"{title}: α per task")
    left.set_xlabel("update")
    if alphas:
        left.legend(fontsize=8)
    points = [(e["update"], e["lambda"]) for e in train if e.get("lambda") is not None]
    if points:
        right.plot(*zip(*points))
    right.set_title("λ (constraint multiplier)")
    right.set_xlabel("update")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def setting_deltas(deltas: dict[str, tuple[float, float | None]], path: Path) -> None:
    """Paper Fig 8/9: per grid, CATS − best temperature on LoRes BLEU and CATS − T=1 on HiRes BLEU
    (``deltas``: grid -> (LoRes difference, HiRes difference or None))."""
    names = list(deltas)
    xs = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(names) + 2), 3.2), constrained_layout=True)
    ax.bar(xs - 0.2, [deltas[n][0] for n in names], width=0.4, label="LoRes: CATS − best T")
    ax.bar(xs + 0.2, [deltas[n][1] or 0.0 for n in names], width=0.4, label="HiRes: CATS − T=1")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(xs, names)
    ax.set_ylabel("BLEU difference")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)
