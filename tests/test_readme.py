"""The README's library snippet runs as written and does what it says."""

import contextlib
import io
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def snippet(name: str) -> str:
    text = README.read_text(encoding="utf-8")
    match = re.search(rf"<!-- snippet: {name}.*?-->\s*```python\n(.*?)```", text, re.S)
    assert match, f"README snippet {name} not found"
    return match.group(1)


def test_cats_loop_snippet_runs_and_leaves_alpha_in_the_feasible_set():
    namespace: dict = {}
    with contextlib.redirect_stdout(io.StringIO()) as out:
        exec(compile(snippet("cats-loop"), "README.md", "exec"), namespace)
    cats = namespace["cats"]
    alpha = torch.as_tensor(cats.alpha)
    assert torch.isclose(alpha.mean(), torch.tensor(1.0, dtype=alpha.dtype), atol=1e-6)
    assert (alpha >= cats.config.alpha_min - 1e-9).all()
    assert not torch.allclose(alpha, torch.ones_like(alpha)), "α never moved after warm-up"
    assert "alpha/de-en" in out.getvalue()


def test_config_table_is_the_one_generated_from_the_config_models():
    """The table is generated (``python -m polycats.config_table README.md``), so a field added to
    the config shows up or this fails."""
    from polycats.config_table import with_table

    text = README.read_text(encoding="utf-8")
    assert text == with_table(text), "README's config table is stale: run python -m polycats.config_table README.md"
    for field in ("train.log_every", "train.keep_snapshots", "eval.batch_size", "model.attention_dropout"):
        assert f"| `{field}` |" in text
