"""``polycats report PATH... --out DIR``: one Markdown page (and a self-contained HTML copy) over
experiment grids, directories of runs, or single runs.

Per grid: the Table 1 analogue (group BLEU/chrF, mean ± 95% CI over seeds), NLL curves per group
and method, diagnostics over training (top eigenvalue, HiRes–LoRes cosine), CATS α/λ and example
translations; a grid without the baselines (an ablation) beside the runs of the grid on the same base
preset that has them. Across grids: gradient similarity by direction, the batch/size settings, and the
claims table. Every number is read from the run directories.

>>> from pathlib import Path
>>> from polycats.report.report import build_report
>>> build_report([Path("runs/experiments/ted_like")], Path("runs/report"))  # doctest: +SKIP
PosixPath('runs/report/report.md')
"""

from __future__ import annotations

import base64
import json
import math
import random
import re
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from markdown_it import MarkdownIt
from scipy.optimize import brentq

from polycats.config import config_from_dict
from polycats.data.prepare import prepare
from polycats.data.sampling import temperature_probabilities
from polycats.errors import PolycatsError
from polycats.io import atomic_write_text
from polycats.figures import alpha_curves, nll_curves, setting_deltas, training_curves
from polycats.report.stats import BOOTSTRAP_SAMPLES, Difference, mean_ci, paired_bootstrap, verdict, welch_difference
from polycats.train.metrics import read_metrics

GROUPS = ("LoRes", "MidRes", "HiRes", "All")
TEMPERATURE = re.compile(r"^T=\d+(\.\d+)?$")
# Grids that test a robustness claim: the LoRes gain must survive the changed setting.
ROBUSTNESS = {"batch4x": "robust to a 4x batch (Fig 8)", "overparam": "robust to overparameterisation (Fig 9)"}
NON_INFERIORITY_BLEU = 0.5  # "not hurt" / "as good as": at most this many BLEU below, with 95% confidence
EXAMPLES_PER_GROUP = 3


@dataclass
class Run:
    name: str
    path: Path
    method: str
    seed: int
    config: dict
    commit: str | None = None
    status: str = "finished"
    wall_s: float | None = None
    metrics: list[dict] = field(default_factory=list)
    test: dict | None = None
    diagnostics: list[dict] = field(default_factory=list)  # {"update", "lambda_max/...", "cosine/HiRes-LoRes"}

    def score(self, group: str, metric: str = "bleu") -> float | None:
        return ((self.test or {}).get("groups", {}).get(group) or {}).get(metric)

    @property
    def start(self) -> dict | None:
        """The training's start record (sampling probabilities, training pairs, device)."""
        return next((e for e in self.metrics if e.get("event") == "start"), None)

    @property
    def devices(self) -> set[str]:
        return {e["device"] for e in self.metrics if e.get("event") == "start" and "device" in e}

    def hypotheses(self, task: str) -> list[str] | None:
        """The run's test translations of ``task``, one per test sentence; None if it has none."""
        path = self.path / "eval" / f"test.{task}.hyp"
        # One per line as evaluate wrote them; split on "\n" alone (splitlines also splits on \x1c, \u2028, ...).
        return path.read_text(encoding="utf-8").split("\n")[:-1] if path.is_file() else None


@dataclass
class Grid:
    name: str
    path: Path
    runs: list[Run]
    pending: int = 0  # runs of the grid's index without a run directory yet
    base: str | None = None  # the grid file's base preset (from index.json)

    def by_method(self) -> dict[str, list[Run]]:
        """Evaluated runs per method, in the grid's order, seeds ascending."""
        methods: dict[str, list[Run]] = {}
        for run in self.runs:
            if run.test:
                methods.setdefault(run.method, []).append(run)
        return {m: sorted(runs, key=lambda r: r.seed) for m, runs in methods.items()}

    def scores(self, method: str, group: str, metric: str = "bleu") -> list[float]:
        runs = self.by_method().get(method, [])
        return [s for s in (r.score(group, metric) for r in runs) if s is not None]

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]", "_", self.name)


# Two runs and a group → the first's minus the second's BLEU with its interval over the test sentences.
Pairing = Callable[[Run, Run, str], Difference | None]


def method_of(config: dict) -> str:
    """A method name for a run that was not started by ``polycats experiment``, from its config."""
    balancer, sampling = config["balancer"], config["sampling"]
    if balancer["name"] == "scalar":
        return "two-stage" if sampling.get("first_stage_updates") else f"T={sampling['temperature']:g}"
    if balancer["name"] == "cats":
        return "CATS-loss" if balancer.get("objective") == "loss" else "CATS"
    return balancer["name"]


def load_run(path: Path, record: dict | None = None) -> Run:
    if not (path / "config.yaml").is_file():
        raise PolycatsError(f"{path} is not a run directory (no config.yaml)")
    # The run's own record is the freshest (an index lists a run that started after it was written as pending).
    if (path / "experiment.json").is_file():
        record = json.loads((path / "experiment.json").read_text())
    record = record or {}
    config = yaml.safe_load((path / "config.yaml").read_text())
    run = Run(name=path.name, path=path, method=record.get("method") or method_of(config),
              seed=int(record.get("seed", config["train"]["seed"])), config=config, commit=record.get("commit"),
              status=record.get("status", "finished"), wall_s=record.get("wall_s"))
    if (path / "metrics.jsonl").is_file():
        run.metrics = read_metrics(path)
    if (path / "eval" / "test.json").is_file():
        run.test = json.loads((path / "eval" / "test.json").read_text())
    analysis = path / "analysis" / "summary.json"
    if analysis.is_file():
        run.diagnostics = json.loads(analysis.read_text())["checkpoints"]
    else:
        run.diagnostics = logged(run, "diagnostics")
    return run


def collect(paths: list[Path]) -> list[Grid]:
    """Grids from experiment directories (``index.json``), directories holding run directories
    (directly or under ``runs/``), and single run directories (gathered into one grid ``runs``)."""
    grids, singles = [], []
    for path in map(Path, paths):
        if (path / "index.json").is_file():
            index = json.loads((path / "index.json").read_text())
            runs, pending = [], 0
            for name, record in index["runs"].items():
                if (path / "runs" / name / "config.yaml").is_file():
                    runs.append(load_run(path / "runs" / name, record))
                else:
                    pending += 1
            grids.append(Grid(index["grid"]["name"], path, runs, pending, index["grid"].get("base")))
        elif (path / "config.yaml").is_file():
            singles.append(load_run(path))
        elif path.is_dir():
            folder = path / "runs" if (path / "runs").is_dir() else path
            found = sorted(p for p in folder.iterdir() if (p / "config.yaml").is_file())
            if not found:
                raise PolycatsError(f"{path}: no run directories in it (no */config.yaml, no index.json); "
                                    "give an experiment directory, a folder of runs, or run directories")
            grids.append(Grid(path.name, path, [load_run(p) for p in found]))
        else:
            problem = "is not a directory" if path.exists() else "does not exist"
            raise PolycatsError(f"{path} {problem}; give an experiment directory, a folder of runs, or run directories")
    if singles:
        parents = {run.path.parent for run in singles}
        parent = parents.pop() if len(parents) == 1 else Path(".")
        grids.append(Grid(parent.name or "runs", parent, singles))
    return grids


def plural(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


def fmt(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def span(low: float, high: float) -> str:
    """``40.3–89.3``, or one number when both ends print alike."""
    low_text, high_text = f"{low:.1f}", f"{high:.1f}"
    return low_text if low_text == high_text else f"{low_text}–{high_text}"


def fmt_ci(values: list[float], digits: int = 1) -> str:
    if not values:
        return "—"
    summary = mean_ci(values)
    if summary.low is None:
        return fmt(summary.mean, digits)
    return f"{summary.mean:.{digits}f} ± {summary.high - summary.mean:.{digits}f}"


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows])


def mean_points(series: list[list[dict]], keys: list[str], event: str) -> list[dict]:
    """Records averaged over runs (``series``: one list per run) at each update, for the keys
    every run has there; each point is tagged ``event`` (what the figures select on)."""
    points: dict[int, dict[str, list[float]]] = {}
    for records in series:
        for record in records:
            for key in keys:
                if record.get(key) is not None:
                    points.setdefault(record["update"], {}).setdefault(key, []).append(record[key])
    return [{"event": event, "update": u, **{k: sum(v) / len(v) for k, v in values.items() if len(v) == len(series)}}
            for u, values in sorted(points.items())]


def logged(run: Run, kind: str) -> list[dict]:
    return [e for e in run.metrics if e.get("event") == kind]


# --- sections of one grid ---------------------------------------------------------------------

def overview_section(grid: Grid) -> list[str]:
    finished = [r for r in grid.runs if r.test]
    lines = [f"## Grid `{grid.name}`", "", f"From `{grid.path}`: {len(finished)} of {len(grid.runs) + grid.pending} runs "
             "trained and evaluated."]
    if not grid.runs:
        return lines + [""]
    commits = Counter(run.commit or "unrecorded" for run in finished or grid.runs)  # of the runs the tables show
    commit_list = ", ".join(f"`{commit[:12]}` ({plural(n, 'run')})" for commit, n in commits.items())
    config = grid.runs[0].config
    data, model, train = config["data"], config["model"], config["train"]
    devices = sorted(set().union(*(r.devices for r in grid.runs)))
    walls = [r.wall_s for r in finished if r.wall_s]
    lines += [
        "",
        f"- Commit: {commit_list}; device: {', '.join(devices) or '—'}"
        + (f"; wall time per run {span(min(walls) / 60, max(walls) / 60)} min (train + evaluate)" if walls else ""),
        f"- Data: {data['source']} {data['direction']}, training pairs {json.dumps(data['languages'])} "
        f"of at most {data['max_len']} tokens a side.",
        f"- Budget: {train['max_updates']} updates of ≤{train['max_tokens']} tokens, lr {train['lr']:g}, warm-up "
        f"{train['warmup_updates']}; model d_model {model['d_model']}, {model['encoder_layers']}+{model['decoder_layers']} "
        f"layers, FFN {model['ffn_dim']}.",
        "",
    ]
    return lines


def scores_section(grid: Grid) -> list[str]:
    methods = grid.by_method()
    if not methods:
        return []
    groups = [g for g in GROUPS if any(grid.scores(m, g) for m in methods)]
    header = ["method", "seeds", *[f"{g} BLEU" for g in groups], *[f"{g} chrF" for g in groups]]
    rows = [[method, str(len(runs)), *[fmt_ci(grid.scores(method, g)) for g in groups],
             *[fmt_ci(grid.scores(method, g, "chrf")) for g in groups]] for method, runs in methods.items()]
    first = next(iter(methods.values()))[0].test
    return [f"### Test BLEU and chrF by group (Table 1 analogue)", "", markdown_table(header, rows), "",
            "Mean over seeds ± the half-width of its 95% Student-t interval (no interval with one seed). "
            f"Groups by training pairs: `{json.dumps(first.get('thresholds'))}`. "
            f"sacreBLEU: `{first['sacrebleu_signature']}`; chrF: `{first['chrf_signature']}`.", ""]


BASELINES = ("T=1", "CATS")


def reference_grid(grid: Grid, grids: list[Grid]) -> Grid | None:
    """The grid an ablation is read against: another grid on the same base preset that holds the
    baselines (T=1 and CATS) this one lacks, e.g. ``ablation`` → ``ted_like``."""
    if grid.base is None or set(BASELINES) <= grid.by_method().keys():
        return None
    return next((other for other in grids if other is not grid and other.base == grid.base
                 and set(BASELINES) <= other.by_method().keys()), None)


def seed_spread(grid: Grid, group: str) -> float | None:
    """The largest range over seeds of one method's ``group`` BLEU: the noise floor of a one-seed comparison."""
    ranges = [max(s) - min(s) for s in (grid.scores(m, group) for m in grid.by_method()) if len(s) >= 2]
    return max(ranges) if ranges else None


def ablation_section(grid: Grid, grids: list[Grid], paired: Pairing | None = None) -> list[str]:
    """Each run of ``grid`` beside the reference grid's T=1, best T and CATS runs of the same seed,
    with its difference from CATS (and its paired-bootstrap interval, given ``paired``)."""
    reference = reference_grid(grid, grids)
    methods = grid.by_method()
    if reference is None or not methods:
        return []
    baselines = reference.by_method()
    best = best_temperature(reference, "LoRes")
    seeds = sorted({r.seed for runs in methods.values() for r in runs})
    cats = {r.seed: r for r in baselines["CATS"]}
    shown = [(f"{m} ({reference.name})", baselines[m]) for m in dict.fromkeys(["T=1", best, "CATS"]) if m in baselines]
    rows = []

    def versus_cats(run: Run, group: str) -> str:
        other = cats.get(run.seed)
        if other is None or run.score(group) is None or other.score(group) is None:
            return "—"
        bootstrap = paired(run, other, group) if paired else None
        delta = run.score(group) - other.score(group)
        return f"{delta:+.1f}" + (f" [{bootstrap.low:+.1f}, {bootstrap.high:+.1f}]" if bootstrap else "")

    for label, runs in [*shown, *methods.items()]:
        for run in (r for r in runs if r.seed in seeds):
            rows.append([label, str(run.seed), *[fmt(run.score(g)) for g in ("LoRes", "HiRes", "All")],
                         *[fmt(run.score(g, "chrf")) for g in ("LoRes", "HiRes")],
                         *[versus_cats(run, g) for g in ("LoRes", "HiRes")]])
    spread = {g: seed_spread(reference, g) for g in ("LoRes", "HiRes")}
    noise = ("" if None in spread.values() else
             f" Seed-to-seed spread in `{reference.name}` (the largest range over seeds of one method): LoRes "
             f"{spread['LoRes']:.1f}, HiRes {spread['HiRes']:.1f} BLEU; a one-seed difference smaller than that is no finding.")
    return [f"### Against `{reference.name}` at equal seed", "",
            markdown_table(["method", "seed", "LoRes BLEU", "HiRes BLEU", "All BLEU", "LoRes chrF", "HiRes chrF",
                            "Δ LoRes BLEU vs CATS", "Δ HiRes BLEU vs CATS"], rows), "",
            f"Both grids start from the `{grid.base}` preset; the reference rows are `{reference.name}`'s runs of the "
            f"same seed (T=1, the best T on LoRes, CATS); [low, high]: the difference's 95% paired-bootstrap interval "
            f"over the test sentences.{noise}", ""]


def curves_section(grid: Grid, out: Path) -> list[str]:
    methods = grid.by_method()
    if not methods:
        return []
    keys = [f"{kind}_nll/{g}" for kind in ("train", "valid") for g in ("LoRes", "HiRes")]
    averaged = {m: mean_points([logged(r, "train") for r in runs], keys[:2], "train")
                + mean_points([logged(r, "valid") for r in runs], keys[2:], "valid") for m, runs in methods.items()}
    name = f"{grid.slug}_nll.png"
    nll_curves(averaged, out / name)
    rows = []
    for method, events in averaged.items():
        valid = [e for e in events if e["event"] == "valid" and e.get("valid_nll/HiRes") is not None]
        if len(valid) >= 2:
            last, horizon = valid[-1], valid[-1]["update"] * 0.8
            earlier = min(valid[:-1], key=lambda e: abs(e["update"] - horizon))
            change = (last["valid_nll/HiRes"] - earlier["valid_nll/HiRes"]) / earlier["valid_nll/HiRes"]
            rows.append([method, fmt(last["valid_nll/HiRes"], 3), fmt(last.get("valid_nll/LoRes"), 3),
                         f"{100 * change:+.1f}% (update {earlier['update']} → {last['update']})"])
    lines = [f"### NLL over training (Fig 1/6/7 analogue)", "", f"![{grid.name}: train and valid NLL, LoRes and HiRes, mean over seeds]({name})", ""]
    if rows:
        lines += [markdown_table(["method", "final valid NLL HiRes", "final valid NLL LoRes", "HiRes valid NLL change over the last 20%"], rows),
                  "", "A change within ±1% over the last fifth of training is a plateau; a larger fall means the budget "
                  "stopped the run while HiRes was still learning.", ""]
    return lines


def diagnostics_section(grid: Grid, out: Path) -> list[str]:
    keys = ["lambda_max/HiRes", "lambda_max/LoRes", "lambda_max/combined", "cosine/HiRes-LoRes"]
    analysed = {m: [r for r in runs if r.diagnostics] for m, runs in grid.by_method().items()}
    analysed = {m: runs for m, runs in analysed.items() if runs}
    if not analysed:
        return []
    averaged = {m: mean_points([r.diagnostics for r in runs], keys, "diagnostics") for m, runs in analysed.items()}
    name = f"{grid.slug}_diagnostics.png"
    training_curves(averaged, out / name)
    rows = [[m, str(len(analysed[m])), str(p["update"]), *[fmt(p.get(k), 3) for k in keys]] for m, points in averaged.items() for p in points]
    return ["### Curvature and gradient similarity over training (Fig 5 analogue)", "",
            f"![{grid.name}: top Hessian eigenvalue and HiRes–LoRes gradient cosine]({name})", "",
            markdown_table(["method", "runs", "update", *keys], rows), "",
            "λ_max: largest eigenvalue of the Hessian of the mean token NLL on fixed, seeded training batches; "
            "combined: the loss the run optimises (sampling × balancer weights). Mean over the analysed runs.", ""]


def alpha_section(grid: Grid, out: Path) -> list[str]:
    lines = []
    for method, runs in grid.by_method().items():
        run = runs[0]
        if any(k.startswith("alpha/") for e in run.metrics for k in e):
            name = f"{grid.slug}_alpha_{re.sub(r'[^A-Za-z0-9_.-]', '_', run.name)}.png"
            alpha_curves(run.metrics, out / name, title=f"{method} seed {run.seed}")
            lines += [f"![{grid.name}: {method} seed {run.seed}, α per task and λ]({name})", ""]
    return ["### CATS α and λ", "", *lines] if lines else []


def per_task(record: dict, prefix: str) -> dict[str, float]:
    """``{task: value}`` of a metrics record's ``prefix<task>`` keys (``sampling_p/``, ``train_pairs/``)."""
    return {key[len(prefix):]: value for key, value in record.items() if key.startswith(prefix)}


def group_shares(run: Run, update: int) -> dict[str, float] | None:
    """Each group's share of the training gradient's weight after ``update`` updates,
    ``Σ_{i∈g} p_i α_i / Σ_i p_i α_i`` (p: the sampling probability in force, α: CATS's task scales,
    1 for plain sampling; tasks' token lengths ignored); None where the balancer is no per-task
    weighting (PCGrad, NashMTL, ...) or the run has no start record or test scores."""
    start = run.start
    if start is None or run.test is None or run.config["balancer"]["name"] not in ("scalar", "cats"):
        return None
    first_stage = update < (run.config["sampling"].get("first_stage_updates") or 0)
    probabilities = per_task(start, "first_stage_p/" if first_stage else "sampling_p/")
    trained = [e for e in logged(run, "train") if e["update"] <= update]
    scales = trained[-1] if trained else {}
    weights = {task: p * scales.get(f"alpha/{task}", 1.0) for task, p in probabilities.items()}
    shares: dict[str, float] = {}
    for task, weight in weights.items():
        group = run.test["per_language"][task]["group"]
        shares[group] = shares.get(group, 0.0) + weight / sum(weights.values())
    return shares


def equivalent_temperature(run: Run, lores_share: float) -> float | None:
    """The temperature T at which plain sampling ``p_i ∝ n_i^(1/T)`` of the run's training pairs
    gives LoRes ``lores_share`` of the weight; None outside T ∈ [0.1, 1000] (e.g. beyond uniform)."""
    sizes = per_task(run.start, "train_pairs/")
    lores = [task for task in sizes if run.test["per_language"][task]["group"] == "LoRes"]

    def gap(log_temperature: float) -> float:
        probabilities = temperature_probabilities(sizes, math.exp(log_temperature))
        return sum(probabilities[task] for task in lores) - lores_share

    low, high = math.log(0.1), math.log(1000.0)
    if not lores or gap(low) * gap(high) > 0:
        return None
    return math.exp(brentq(gap, low, high, xtol=1e-6))


def weights_section(grid: Grid) -> list[str]:
    """How much of the gradient each group gets per method: at a fifth, half and the end of training."""
    entries = []  # (method, update, mean share per group, equivalent temperature)
    for method, runs in grid.by_method().items():
        horizon = runs[0].config["train"]["max_updates"]
        points = []
        for update in sorted({horizon // 5, horizon // 2, horizon}):
            shares = [s for s in (group_shares(run, update) for run in runs) if s is not None]
            if shares:
                points.append((str(update), {g: sum(s.get(g, 0.0) for s in shares) / len(shares) for g in GROUPS[:3]}))
        if points and all(mean == points[0][1] for _, mean in points):
            points = [("all", points[0][1])]
        entries += [(method, update, mean, equivalent_temperature(runs[0], mean["LoRes"])) for update, mean in points]
    if not entries:
        return []
    groups = [g for g in GROUPS[:3] if any(mean[g] > 0 for _, _, mean, _ in entries)]
    rows = [[method, update, *[f"{100 * mean[g]:.1f}%" for g in groups], fmt(temperature, 2)]
            for method, update, mean, temperature in entries]
    return ["### Gradient weight per group", "",
            markdown_table(["method", "update", *[f"{g} share" for g in groups], "T with the same LoRes share"], rows), "",
            "Share of the training gradient's weight, Σ_{i∈g} p_i α_i / Σ_i p_i α_i (p: sampling probability, α: "
            "CATS's scales, 1 otherwise; tasks' token lengths ignored), mean over seeds; the last column is the "
            "temperature at which plain sampling gives LoRes the same share. Methods that combine gradients "
            "otherwise (PCGrad, NashMTL, ...) have no such weights and are left out.", ""]


def example_indices(references: list[dict], count: int, seed: str) -> list[int]:
    """``count`` sentence indices in a seeded order, short ones (≤ 25 reference words) first, so
    that examples stay readable and are the same in every report."""
    order = random.Random(seed).sample(range(len(references)), len(references))
    return sorted(order, key=lambda j: len(references[j]["ref"].split()) > 25)[:count]


def examples_section(grid: Grid, prepare_references: Callable[[dict], dict]) -> list[str]:
    """Three test sentences per language group beside the reference and each method's first seed."""
    methods = {m: runs[0] for m, runs in grid.by_method().items()}
    if not methods:
        return []
    first = next(iter(methods.values()))
    try:
        references = prepare_references(first.config)
    except PolycatsError as error:
        return ["### Example translations", "", f"Not shown: the prepared test data is not available ({error}).", ""]
    hypotheses = {m: {task: hyps for task in references if (hyps := run.hypotheses(task)) is not None}
                  for m, run in methods.items()}
    by_group: dict[str, list[str]] = {}
    for task, scores in first.test["per_language"].items():
        by_group.setdefault(scores["group"], []).append(task)
    lines = ["### Example translations", "",
             f"{EXAMPLES_PER_GROUP} test sentences per group (a fixed seeded draw), each method's lowest seed.", ""]
    for group in [g for g in GROUPS if g in by_group]:
        drawn = {task: example_indices(references[task], EXAMPLES_PER_GROUP, f"{grid.name}/{task}") for task in by_group[group]}
        for i in range(EXAMPLES_PER_GROUP):
            task = by_group[group][i % len(by_group[group])]
            j = drawn[task][i // len(by_group[group])]
            lines += [f"**{group} · {task} · test #{j}**", "", f"- source: {references[task][j]['src']}",
                      f"- reference: {references[task][j]['ref']}"]
            lines += [f"- {m}: {hyps[task][j] if j < len(hyps.get(task, [])) else '—'}" for m, hyps in hypotheses.items()]
            lines.append("")
    return lines


# --- sections across grids ---------------------------------------------------------------------

def best_temperature(grid: Grid, group: str) -> str | None:
    temperatures = [m for m in grid.by_method() if TEMPERATURE.match(m) and grid.scores(m, group)]
    if not temperatures:
        return None
    return max(temperatures, key=lambda m: sum(grid.scores(m, group)) / len(grid.scores(m, group)))


def similarity_section(grids: list[Grid], out: Path) -> list[str]:
    """Paper Fig 2/3: the gradient-similarity heatmaps ``polycats analyze`` drew, one per direction."""
    lines, rows = [], []
    for grid in grids:
        for run in (r for runs in grid.by_method().values() for r in runs):
            figures = sorted((run.path / "analysis").glob("similarity_*.png"))
            if figures and run.diagnostics:
                name = f"{grid.slug}_{run.name}_{figures[-1].name}"
                shutil.copyfile(figures[-1], out / name)
                point = run.diagnostics[-1]
                rows.append([grid.name, run.config["data"]["direction"], f"{run.method} seed {run.seed}", str(point["update"]),
                             fmt(point.get("cosine/HiRes-LoRes"), 3), fmt(point.get("norm_similarity/HiRes-LoRes"), 3)])
                lines += [f"![{grid.name} ({run.config['data']['direction']}), {run.method} seed {run.seed}, update {point['update']}]({name})", ""]
                break
    if not rows:
        return []
    return ["## Gradient similarity by direction (Fig 2/3 analogue)", "",
            markdown_table(["grid", "direction", "run", "update", "cosine HiRes–LoRes", "norm similarity HiRes–LoRes"], rows), "", *lines]


def settings_section(grids: list[Grid], out: Path, paired: Pairing | None = None) -> list[str]:
    """Paper Fig 8/9: CATS minus the baselines in every grid's setting (batch, model size, direction)."""
    rows, deltas = [], {}
    for grid in grids:
        methods = grid.by_method()
        best = best_temperature(grid, "LoRes")
        if "CATS" not in methods or best is None:
            continue

        def versus(baseline: str, group: str) -> tuple[float, str]:
            over_seeds = welch_difference(grid.scores("CATS", group), grid.scores(baseline, group))
            one_seed = over_seeds.low is None
            bootstrap = lowest_seed_bootstrap(methods["CATS"], methods[baseline], group, paired)[0] if one_seed else None
            return over_seeds.mean, f"{bootstrap} †" if bootstrap else str(over_seeds)

        config = methods["CATS"][0].config
        lores = versus(best, "LoRes")
        hires = versus("T=1", "HiRes") if "T=1" in methods else None
        deltas[grid.name] = (lores[0], hires[0] if hires else None)
        rows.append([grid.name, config["data"]["direction"], str(config["train"]["max_tokens"]), f"{config['train']['lr']:g}",
                     f"{config['model']['d_model']}×{config['model']['encoder_layers']}+{config['model']['decoder_layers']}",
                     str(len(methods["CATS"])), f"{lores[1]} vs {best}", hires[1] if hires else "—"])
    if not rows:
        return []
    setting_deltas(deltas, out / "settings_deltas.png")
    return ["## CATS across settings (Fig 8/9 analogue)", "",
            markdown_table(["grid", "direction", "tokens/batch", "lr", "d_model×layers", "CATS seeds",
                            "Δ LoRes BLEU (CATS − best T)", "Δ HiRes BLEU (CATS − T=1)"], rows), "",
            "Δ: mean difference [95% Welch interval] over seeds; with one seed, † marks the 95% paired-bootstrap "
            "interval over the test sentences instead (the test set's noise, not the seed's).", "",
            "![CATS minus baseline BLEU per grid](settings_deltas.png)", ""]


@dataclass(frozen=True)
class Claim:
    claim: str
    paper: str
    grid: str
    measure: str
    difference: Difference | None  # over seeds
    threshold: float
    paired: Difference | None = None  # over the test sentences of one seed's two runs
    paired_seed: int | None = None

    @property
    def verdict(self) -> str:
        """Over seeds where there is an interval; otherwise (one seed) on the paired bootstrap, and says so."""
        if self.difference is not None and self.difference.low is None and self.paired is not None:
            return f"{verdict(self.paired, self.threshold)} (one seed)"
        return verdict(self.difference, self.threshold)


def cached_references(prepare_references: Callable[[dict], dict]) -> Callable[[dict], dict]:
    """``prepare_references`` once per data config (a report reads the same test set many times);
    a failure is remembered and raised again."""
    found: dict[str, dict | PolycatsError] = {}

    def references(config: dict) -> dict:
        key = json.dumps(config["data"], sort_keys=True)
        if key not in found:
            try:
                found[key] = prepare_references(config)
            except PolycatsError as error:
                found[key] = error
        if isinstance(found[key], PolycatsError):
            raise found[key]
        return found[key]

    return references


def paired_difference(first: Run, second: Run, group: str, references: Callable[[dict], dict]) -> Difference | None:
    """``first``'s minus ``second``'s test BLEU on ``group`` with its paired-bootstrap interval over
    the test sentences; None where a run lacks translations, the runs' data differ or the test data
    cannot be prepared."""
    directions = ((first.test or {}).get("groups", {}).get(group) or {}).get("directions")
    if not directions or first.config["data"] != second.config["data"]:
        return None
    try:
        prepared = references(first.config)
    except PolycatsError:
        return None
    targets = {d: [item["ref"] for item in prepared.get(d, [])] for d in directions}
    systems = [{d: run.hypotheses(d) for d in directions} for run in (first, second)]
    if any(hyps is None or len(hyps) != len(targets[d]) for system in systems for d, hyps in system.items()):
        return None
    return paired_bootstrap(*systems, targets)


def lowest_seed_bootstrap(first: list[Run], second: list[Run], group: str,
                          paired: Pairing | None) -> tuple[Difference | None, int | None]:
    """``paired`` on the two methods' runs of the lowest seed both have, and that seed; (None, None)
    without ``paired``, a common seed or a bootstrap."""
    common = sorted({r.seed for r in first} & {r.seed for r in second})
    if paired is None or not common:
        return None, None
    seed = common[0]
    bootstrap = paired(next(r for r in first if r.seed == seed), next(r for r in second if r.seed == seed), group)
    return (bootstrap, seed) if bootstrap else (None, None)


def paired_diagnostics(grid: Grid, key: str, relative: bool) -> Difference | None:
    """CATS vs T=1 at equal seed and update (after update 1): ``T=1 − CATS`` (relative to T=1 when
    ``relative``) for eigenvalues, ``CATS − T=1`` for the cosine."""
    methods = grid.by_method()
    if "CATS" not in methods or "T=1" not in methods:
        return None
    base = {(r.seed, p["update"]): p.get(key) for r in methods["T=1"] for p in r.diagnostics}
    differences = []
    for run in methods["CATS"]:
        for point in run.diagnostics:
            reference = base.get((run.seed, point["update"]))
            if point["update"] > 1 and reference is not None and point.get(key) is not None:
                differences.append((reference - point[key]) / abs(reference) if relative else point[key] - reference)
    return mean_ci(differences) if differences else None


def claims(grids: list[Grid], paired: Pairing | None = None) -> list[Claim]:
    """The paper's claims on each grid with CATS and a temperature; ``paired`` (e.g.
    :func:`paired_difference` with the references bound) adds the paired bootstrap of the BLEU claims."""
    found = []
    for grid in grids:
        methods = grid.by_method()
        best_lores, best_all = best_temperature(grid, "LoRes"), best_temperature(grid, "All")
        if "CATS" not in methods or best_lores is None:
            continue

        def bleu_claim(claim: str, paper: str, group: str, baseline: str, label: str, threshold: float) -> Claim:
            return Claim(claim, paper, grid.name, f"{group} BLEU: CATS − {label}",
                         welch_difference(grid.scores("CATS", group), grid.scores(baseline, group)), threshold,
                         *lowest_seed_bootstrap(methods["CATS"], methods[baseline], group, paired))

        found.append(bleu_claim(ROBUSTNESS.get(grid.name, "CATS improves LoRes"), "+0.8..+2.2 BLEU", "LoRes",
                                best_lores, f"{best_lores} (best T)", 0.0))
        if grid.name in ROBUSTNESS:
            continue
        if "T=1" in methods:
            found.append(bleu_claim("HiRes not hurt", "≈0 BLEU", "HiRes", "T=1", "T=1", -NON_INFERIORITY_BLEU))
        found.append(bleu_claim("no temperature tuning needed", "CATS at T=1 ≥ tuned T", "All", best_all,
                                f"{best_all} (best T)", -NON_INFERIORITY_BLEU))
        eigen = paired_diagnostics(grid, "lambda_max/combined", relative=True)
        if eigen is not None:
            found.append(Claim("lower top eigenvalue", "lower λ_max", grid.name,
                               "relative λ_max reduction of the training loss (CATS's carries α), T=1 → CATS, "
                               "per checkpoint", eigen, 0.0))
        hires_eigen = paired_diagnostics(grid, "lambda_max/HiRes", relative=True)
        if hires_eigen is not None:
            found.append(Claim("lower top eigenvalue, same loss", "lower λ_max", grid.name,
                               "relative λ_max reduction of the HiRes loss (unweighted), T=1 → CATS, per checkpoint",
                               hires_eigen, 0.0))
        cosine = paired_diagnostics(grid, "cosine/HiRes-LoRes", relative=False)
        if cosine is not None:
            found.append(Claim("higher HiRes–LoRes gradient similarity", "higher cosine", grid.name,
                               "cosine HiRes–LoRes: CATS − T=1, per checkpoint", cosine, 0.0))
    return found


def claims_section(grids: list[Grid], paired: Pairing | None = None) -> list[str]:
    found = claims(grids, paired)
    if not found:
        return []
    rows = [[c.claim, c.paper, c.grid, c.measure, str(c.difference) if c.difference else "—",
             f"{c.paired} (seed {c.paired_seed})" if c.paired else "—", f"{c.threshold:+.1f}", f"**{c.verdict}**"]
            for c in found]
    spreads = [f"`{grid.name}` LoRes {lores:.1f}, HiRes {hires:.1f}" for grid in grids
               if (lores := seed_spread(grid, "LoRes")) is not None and (hires := seed_spread(grid, "HiRes")) is not None]
    return ["## Claims of the paper against our numbers", "",
            markdown_table(["claim", "paper", "grid", "measure", "ours: mean [95% CI over seeds]",
                            "one seed: paired bootstrap [95%]", "threshold", "verdict"], rows), "",
            "**Rule.** Each claim says *difference > threshold*. It **holds** when the whole 95% interval lies above the "
            "threshold, **does not hold** when the whole interval lies below it, and is **inconclusive** otherwise. "
            "BLEU differences use Welch's interval over seeds. A grid with one seed per method has no such interval: "
            f"its BLEU claims are decided on the paired bootstrap over test sentences ({BOOTSTRAP_SAMPLES:,} resamples, "
            "drawn per direction, the same sentences for both runs, sacreBLEU's statistics; shown for the lowest seed of "
            "every grid) and say *(one seed)*. That interval holds the test set's sampling noise only, not the "
            "training seed's" + (f", whose spread (the largest range over seeds of one method, BLEU) is {'; '.join(spreads)}" if spreads else "")
            + ": a one-seed verdict is weaker evidence than one over seeds. "
            f"\"not hurt\" and \"no tuning needed\" are non-inferiority claims with a margin of {NON_INFERIORITY_BLEU} BLEU; "
            "the curvature and similarity claims pair CATS and T=1 at equal seed and update (checkpoints are not "
            "independent, so their intervals are optimistic). The training loss is the one each run optimises: "
            "CATS's carries its weights α, so α below 1 on the tasks that dominate the curvature lowers its λ_max by "
            "rescaling alone; the HiRes-loss row compares one function at both runs' parameters. The best temperature "
            "is chosen on the test scores themselves, which favours the baseline.", ""]


# --- the page ----------------------------------------------------------------------------------

def load_test_references(config: dict) -> dict:
    """task -> [{"src", "ref"}] of the run's test split, from the prepared-data cache."""
    return prepare(config_from_dict(config).data).references("test")


def build_report(paths: list[Path], out: Path, command: str | None = None, results: Path | None = None,
                 prepare_references: Callable[[dict], dict] = load_test_references) -> Path:
    """Write ``out/report.md``, ``out/report.html`` and the figures; with ``results``, also that
    Markdown page with its figures in a folder beside it (``docs/results.md`` → ``docs/results/``)."""
    grids = collect(paths)
    grids = sorted(grids, key=lambda grid: reference_grid(grid, grids) is not None)  # an ablation after its reference
    references = cached_references(prepare_references)
    bootstraps: dict[tuple[Path, Path, str], Difference | None] = {}  # the claims and the sections share pairs

    def paired(first: Run, second: Run, group: str) -> Difference | None:
        key = (first.path, second.path, group)
        if key not in bootstraps:
            bootstraps[key] = paired_difference(first, second, group, references)
        return bootstraps[key]

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# polycats report", ""]
    if command:
        lines += [f"Generated by `{command}`.", ""]
    lines += claims_section(grids, paired)
    for grid in grids:
        lines += [*overview_section(grid), *scores_section(grid), *ablation_section(grid, grids, paired),
                  *curves_section(grid, out), *diagnostics_section(grid, out),
                  *alpha_section(grid, out), *weights_section(grid), *examples_section(grid, references)]
    lines += [*settings_section(grids, out, paired), *similarity_section(grids, out)]
    markdown = "\n".join(lines)
    atomic_write_text(out / "report.md", markdown)
    atomic_write_text(out / "report.html", to_html(markdown, out))
    if results is not None:
        publish(markdown, out, Path(results))
    return out / "report.md"


IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")


def publish(markdown: str, folder: Path, target: Path) -> None:
    """``target`` (e.g. docs/results.md) with the figures copied to ``target``'s stem folder."""
    figures = target.parent / target.stem
    figures.mkdir(parents=True, exist_ok=True)
    for stale in figures.glob("*.png"):
        stale.unlink()
    for name in {m.group(2) for m in IMAGE.finditer(markdown)}:
        shutil.copyfile(folder / name, figures / name)
    atomic_write_text(target, IMAGE.sub(lambda m: f"![{m.group(1)}]({figures.name}/{m.group(2)})", markdown))


def to_html(markdown: str, folder: Path) -> str:
    """A self-contained page: markdown-it (CommonMark + tables), PNG figures inlined as base64."""
    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown)

    def inline(match: re.Match) -> str:
        path = folder / match.group(1)
        if not path.is_file():
            return match.group(0)
        return f'src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}"'

    body = re.sub(r'src="([A-Za-z0-9_.-]+\.png)"', inline, body)
    style = ("body{font-family:sans-serif;max-width:1200px;margin:auto;padding:0 1em}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px}img{max-width:100%}code{background:#f4f4f4}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>polycats report</title><style>{style}</style></head><body>{body}</body></html>\n"
