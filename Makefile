# `make demo`: set up .venv and run the main job. `make test`: set up .venv and run every test.
# `make test-fast`: the unit tests alone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-fast lint

# The requirements, then the package: editable (checkout edits take effect), so its commands and
# `python -m convert` work from any directory.
$(VENV)/.runtime: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

$(VENV)/.test: $(VENV)/.runtime requirements-test.txt
	$(PY) -m pip install -q -r requirements-test.txt
	touch $@

# Trains the embedded default (a small ViT with ATS on scikit-learn's digits), then evaluates it with
# and without ATS; rerunning resumes from workdir/digits (and only re-evaluates once finished).
demo: $(VENV)/.runtime
	$(PY) main.py --config=configs/digits_ats.py --workdir=workdir/digits

lint: $(VENV)/.test
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint
	$(PY) -m pytest -n 2 --dist=loadfile

# The inner loop: unit tests on tiny models (no DeiT-S compiles, no subprocess runs of main.py).
test-fast: $(VENV)/.test
	$(PY) -m pytest -n 2 tests/ops/test_attention.py tests/ops/test_ats.py tests/models/test_flops_and_zoo.py tests/test_docs.py tests/convert/test_convert_errors.py
