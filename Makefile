# Two entry points for a fresh machine (see README): `make review` and `make test`.
# pip, not uv/poetry: only pip sees the local torch 2.14.1 / torchvision 0.29.1 wheels here.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.medvit-installed

.PHONY: install review predict test test-fast lint bench audit fuzz clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install -e '.[dev]'
	touch $@

install: $(STAMP)

# The main job on the embedded default: the review app with the demo model, opened on RG1_UNCI.dcm.
review: $(STAMP)
	$(BIN)/medvit review

# Batch prediction with the demo model on the same example, printed as a table.
predict: $(STAMP)
	$(BIN)/medvit predict "$$($(BIN)/python -c 'from pydicom.data import get_testdata_file as g; print(g("RG1_UNCI.dcm"))')"

# `make test` (CI's command): two pytest-xdist workers, one file per worker, in collection order; the full suite takes
# ~9-12 min on the 2-core AMD EPYC (~20-26 min serially; 15.5-17 min on a slower day), 7-8 min on an AMX Xeon.
# test-fast skips the slow and browser tests.
XDIST := -n 2 --dist loadfile --no-loadscope-reorder

test: $(STAMP)
	$(BIN)/python -m pytest -q $(XDIST) --durations=25

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q $(XDIST) -m "not slow and not e2e"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/medvit bench

audit: $(STAMP)
	.ci/audit.sh

fuzz: $(STAMP)
	$(BIN)/python benchmarks/fuzz.py --seconds 600

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
