"""``polycats report RUN_DIR... --out REPORT_DIR``: one Markdown + self-contained HTML page over
finished runs — group BLEU/chrF (eval/test.json), NLL curves (metrics.jsonl), the diagnostics of
``polycats analyze`` over training, CATS α/λ — with the PNG figures next to it.

Every number comes from the run directories; the page names them and the sacreBLEU signature.
"""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path

from polycats.errors import PolycatsError
from polycats.io import atomic_write_text
from polycats.report.figures import alpha_curves, nll_curves, training_curves
from polycats.train.metrics import read_metrics

GROUPS = ("LoRes", "MidRes", "HiRes", "All")


def fmt(value, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def load_run(path: Path) -> dict:
    if not (path / "config.yaml").exists():
        raise PolycatsError(f"{path} is not a run directory (no config.yaml)")
    run = {"name": path.name, "path": path, "metrics": read_metrics(path) if (path / "metrics.jsonl").exists() else []}
    evaluation = path / "eval" / "test.json"
    run["eval"] = json.loads(evaluation.read_text()) if evaluation.exists() else None
    analysis = path / "analysis" / "summary.json"
    run["analysis"] = json.loads(analysis.read_text())["checkpoints"] if analysis.exists() else None
    return run


def bleu_section(runs: list[dict]) -> list[str]:
    evaluated = [r for r in runs if r["eval"]]
    if not evaluated:
        return []
    header = ["run", *[f"{g} BLEU" for g in GROUPS], *[f"{g} chrF" for g in GROUPS]]
    rows = [[r["name"], *[fmt((r["eval"]["groups"].get(g) or {}).get("bleu")) for g in GROUPS],
             *[fmt((r["eval"]["groups"].get(g) or {}).get("chrf")) for g in GROUPS]] for r in evaluated]
    first = evaluated[0]["eval"]
    return ["## Test BLEU / chrF by group", "", markdown_table(header, rows), "",
            f"Groups by training pairs: {json.dumps(first.get('thresholds'))}. "
            f"sacreBLEU: `{first['sacrebleu_signature']}`.", ""]


def diagnostics_section(runs: list[dict]) -> list[str]:
    analysed = [r for r in runs if r["analysis"]]
    if not analysed:
        return []
    keys = ["lambda_max/HiRes", "lambda_max/LoRes", "lambda_max/combined", "cosine/HiRes-LoRes"]
    rows = []
    for r in analysed:
        for point in r["analysis"]:
            rows.append([r["name"], str(point["update"]), *[fmt(point.get(k), 3) for k in keys]])
    lines = ["## Diagnostics over training (`polycats analyze`)", "",
             "λ_max: largest algebraic eigenvalue of the Hessian of the mean token NLL on fixed training "
             "batches; combined: the loss the run optimises (sampling × balancer weights).", "",
             markdown_table(["run", "update", *keys], rows), ""]
    # Paired comparison at equal updates against the first analysed run (the baseline).
    base = {p["update"]: p for p in analysed[0]["analysis"]}
    for r in analysed[1:]:
        shared = [p for p in r["analysis"] if p["update"] in base and p.get("lambda_max/combined") is not None]
        if shared:
            lower = sum(p["lambda_max/combined"] < base[p["update"]]["lambda_max/combined"] for p in shared)
            lines += [f"- {r['name']} vs {analysed[0]['name']}: combined λ_max lower at {lower} of {len(shared)} "
                      "checkpoints at equal updates.", ""]
    return lines


def build_report(run_dirs: list[Path], out: Path) -> Path:
    runs = [load_run(Path(p)) for p in run_dirs]
    if not runs:
        raise PolycatsError("give at least one run directory")
    out.mkdir(parents=True, exist_ok=True)
    figures = []
    nll_curves({r["name"]: r["metrics"] for r in runs}, out / "nll_curves.png")
    figures.append(("Train and valid NLL of the LoRes and HiRes groups", "nll_curves.png"))
    if any(r["analysis"] for r in runs):
        training_curves({r["name"]: r["analysis"] for r in runs if r["analysis"]}, out / "diagnostics_curves.png")
        figures.append(("Top eigenvalue and HiRes/LoRes gradient cosine over training", "diagnostics_curves.png"))
    for r in runs:
        if any(k.startswith("alpha/") for e in r["metrics"] for k in e):
            name = f"alpha_{re.sub(r'[^A-Za-z0-9_.-]', '_', r['name'])}.png"
            alpha_curves(r["metrics"], out / name, title=r["name"])
            figures.append((f"{r['name']}: CATS α per task and λ", name))
    lines = ["# polycats report", "", "Runs: " + ", ".join(f"`{r['path']}`" for r in runs), "",
             *bleu_section(runs), *diagnostics_section(runs), "## Figures", ""]
    lines += [f"![{caption}]({name})\n" for caption, name in figures]
    markdown = "\n".join(lines)
    atomic_write_text(out / "report.md", markdown)
    atomic_write_text(out / "report.html", to_html(markdown, out))
    return out / "report.md"


def to_html(markdown: str, folder: Path) -> str:
    """A self-contained page: tables and images (inlined as base64) from our own Markdown subset."""
    body, table = [], []

    def flush() -> None:
        if table:
            rows = [row for row in table if not set(row.replace("|", "").strip()) <= {"-"}]
            cells = [[html.escape(c.strip()) for c in row.strip("|").split("|")] for row in rows]
            body.append("<table><tr>" + "".join(f"<th>{c}</th>" for c in cells[0]) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in cells[1:]) + "</table>")
            table.clear()

    for line in markdown.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line.lstrip('# '))}</h{level}>")
        elif match := re.match(r"!\[(.*)\]\((.*)\)", line):
            data = base64.b64encode((folder / match.group(2)).read_bytes()).decode()
            body.append(f'<figure><img src="data:image/png;base64,{data}" style="max-width:100%"><figcaption>'
                        f"{html.escape(match.group(1))}</figcaption></figure>")
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    flush()
    style = "body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
    return f"<!doctype html><html><head><meta charset='utf-8'><title>polycats report</title><style>{style}</style></head><body>{''.join(body)}</body></html>\n"
