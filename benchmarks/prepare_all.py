"""`polycats prepare` of all 22 Bible languages: wall time and peak RSS, on an empty cache and again
on the cache hit.

Each run is its own `polycats prepare` process (the command a user types), on configs/many.yaml with
``data.languages`` overridden to every non-pivot translation of the Bible (21 languages + the
English pivot). The first run has a fresh, empty ``POLYCATS_CACHE``; the second reuses it. Peak RSS
is each process's own (``cats_overhead.peak_rss_mb``).

    python benchmarks/prepare_all.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def languages(quick: bool) -> dict[str, int]:
    from polycats.data.corpus import BIBLE_TRANSLATIONS

    if quick:
        return {"de": 300, "sw": 100}
    return {lang: 10000 for lang in BIBLE_TRANSLATIONS if lang != "en"}


def overrides(quick: bool) -> list[str]:
    pairs = ", ".join(f"{lang}: {count}" for lang, count in languages(quick).items())
    sets = [f"data.languages={{{pairs}}}"]
    if quick:
        sets += ["data.vocab_size=300", "data.tokenizer_sentences=2000", "data.valid_per_lang=20", "data.test_per_lang=20"]
    return sets


# `polycats prepare` with its peak RSS (MiB) on stderr's last line.
CHILD = f"""
import sys
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
from cats_overhead import peak_rss_mb
from polycats.cli import main
sys.argv = ["polycats", *sys.argv[1:]]
try:
    main()
finally:
    print(peak_rss_mb(), file=sys.stderr)
"""


def timed_prepare(sets: list[str], cache: str) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one `polycats prepare` process."""
    command = [sys.executable, "-c", CHILD, "prepare", str(ROOT / "configs" / "many.yaml"),
               *sum((["--set", s] for s in sets), [])]
    started = time.perf_counter()
    child = subprocess.run(command, env={**os.environ, "POLYCATS_CACHE": cache}, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - started
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(command[3:])} failed: {child.stderr[-2000:]}")
    return elapsed, float(child.stderr.strip().splitlines()[-1])


def rows(quick: bool) -> list[dict]:
    sets = overrides(quick)
    with tempfile.TemporaryDirectory(prefix="polycats-cache-") as cache:
        first = timed_prepare(sets, cache)
        second = timed_prepare(sets, cache)
    count = len(languages(quick)) + 1
    return [
        {"run": "empty cache", "languages": count, "wall_s": first[0], "peak_rss_mb": first[1], "time_ratio_vs_empty": 1.0},
        {"run": "cache hit", "languages": count, "wall_s": second[0], "peak_rss_mb": second[1],
         "time_ratio_vs_empty": second[0] / first[0]},
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 languages + pivot, small vocabulary")
    args = parser.parse_args()
    from benchmarks_table import print_rows

    print_rows("prepare, all Bible languages", rows(args.quick))


if __name__ == "__main__":
    main()
