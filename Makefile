# Two commands for a new user: `make tune` (the main job: the ranking search on the 627 LIVE Challenge photos in datasets/livec) and
# `make test` (the whole test suite, slow end-to-end tests included, as CI runs it).
# Both create .venv and install the package the first time, and reuse it afterwards.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install tune pregenerate test test-fast coverage clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

tune: $(STAMP)
	$(PY) launch/tune_ranking.py $(ARGS)

pregenerate: $(STAMP)
	$(PY) launch/pregenerate.py $(ARGS)

# Two pytest-xdist workers: the end-to-end tests run one at a time on one of them (see
# tests/conftest.py), the fast tests beside them on the other.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest -m "slow or not slow" -q -n $(TEST_WORKERS) --dist loadgroup

test-fast: $(STAMP)
	$(PY) -m pytest -q

# The whole suite as `make test` runs it, with line coverage of iqa_ray/ (docs/ARCHITECTURE.md records it).
coverage: $(STAMP)
	$(PY) -m pytest -m "slow or not slow" -q -n $(TEST_WORKERS) --dist loadgroup --cov=iqa_ray --cov-report=term \
		--cov-report=json:coverage.json

clean-venv:
	rm -rf $(VENV)
