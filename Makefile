# Two entry points: `make demo` (set up, then run the main job) and `make test`.
# The setup installs the local CPU build of torch first, so no CUDA wheels are downloaded.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# pytest-xdist workers for `make test` (`make test JOBS=0` runs serially). --dist loadfile keeps each file on one
# worker, so module fixtures are built once and session fixtures once per worker. Whole suite on 2 cores:
# serial ~320 s, -n 2 --dist loadfile ~185 s.
JOBS ?= auto

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/rewriter demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(JOBS) --dist loadfile

bench: $(STAMP)
	$(BIN)/python bench/compare_peft.py

clean:
	rm -rf $(VENV) rewriter-demo .pytest_cache .hypothesis
