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


# Floors, lowest first: a module may import its own floor and the ones below, never one above.
# (cli is the top: it imports every command lazily so `polycats --help` does not wait for torch.)
FLOORS = {
    "config": ["polycats.errors", "polycats.io", "polycats.figures", "polycats.version", "polycats.balancer_config", "polycats.config",
               "polycats.methods", "polycats.config_table"],
    "data and model": ["polycats.data", "polycats.model"],
    "gradients and operators": ["polycats.ops"],
    "balancers and diagnostics": ["polycats.balance", "polycats.diagnostics.gradients", "polycats.diagnostics.curvature",
                                  "polycats.diagnostics.model_summary"],
    "run": ["polycats.run"],
    "train, evaluate, analyze": ["polycats.train", "polycats.evaluate", "polycats.diagnostics.analyze",
                                 "polycats.integrations"],
    "report and grids": ["polycats.report", "polycats.experiment", "polycats.demo"],
    "command line": ["polycats.cli", "polycats.__main__", "polycats"],
}
SOURCE = Path(__file__).resolve().parents[1] / "src" / "polycats"


def floor_of(module: str) -> int:
    best = max(((len(prefix), level) for level, prefixes in enumerate(FLOORS.values()) for prefix in prefixes
                if module == prefix or module.startswith(prefix + ".")), default=None)
    assert best is not None, f"{module} has no floor in tests/test_layers.py"
    return best[1]


def imports() -> list[tuple[str, str, bool]]:
    """(module, imported polycats module, inside a function) for every import in the package."""
    import ast

    found = []
    for path in sorted(SOURCE.rglob("*.py")):
        module = ".".join(("polycats", *path.relative_to(SOURCE).with_suffix("").parts)).removesuffix(".__init__")

        def visit(node: ast.AST, inside: bool) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                    continue
                nested = inside or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
                if isinstance(child, ast.ImportFrom) and child.level == 0 and (child.module or "").startswith("polycats"):
                    found.append((module, child.module, nested))
                elif isinstance(child, ast.Import):
                    found.extend((module, alias.name, nested) for alias in child.names if alias.name.startswith("polycats"))
                visit(child, nested)

        visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return found


def test_no_import_runs_back_up_a_floor():
    upward = [f"{a} -> {b}" for a, b, _ in imports() if floor_of(b) > floor_of(a)]
    assert upward == []


def test_only_the_command_line_and_grids_import_inside_functions():
    # cli and experiment import their commands on use (startup time and torch-free --help); nothing
    # else imports inside a function, which is how cycles between floors hide.
    inside = sorted({a for a, _, nested in imports() if nested})
    assert inside == ["polycats.cli", "polycats.experiment"]
