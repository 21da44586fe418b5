# Upstream's CI environment and jobs. `make lock-test` runs the tests the series add in a virtualenv
# pinned to the pinned tree's uv.lock (what upstream's `uv sync` installs; transformers 5.13.0
# there, 5.24.0 in .venv). `make upstream-jobs` runs upstream's docstring, mypy and format jobs on
# the stacked tree and on pristine 4.3.0 in that venv and fails on any failure or error pristine
# lacks. `make py310-check` checks the series' Python files against 3.10, upstream's oldest.

LOCK := $(FORK)/uv.lock
LOCK_VENV := build/lock-venv
LOCK_PY := $(abspath $(LOCK_VENV))/bin/python
# The Python files the series add or edit, in the stacked tree (the fork).
SERIES_PY = $(shell cd $(FORK) && git diff --name-only upstream HEAD -- '*.py')
# The stacked tree as upstream gets it: pristine 4.3.0 + every series, real files (`make pr`).
STACKED := build/pr/series

.PHONY: lock-venv lock-test upstream-jobs py310-check

## lock-venv: build/lock-venv, every package at upstream's uv.lock version, the fork installed
lock-venv: link
	PYTHON=$(PY) tools/lock_venv.sh $(LOCK) $(LOCK_VENV) $(FORK)

## lock-test: the tests the series add (acceptance included), in build/lock-venv: upstream's
## selection (-m "not slow"), then the slow ones, so that none goes unrun
# Both passes run whatever the first gives; pytest's status 5 (nothing selected) passes the second.
LOCK_PYTEST = cd $(FORK) && HF_HOME=$(abspath $(HUB_CACHE)) HF_HUB_CACHE=$(abspath $(HUB_CACHE))/hub \
	$(LOCK_PY) -m pytest -p no:cacheprovider
lock-test: lock-venv $(HUB_CACHE_STAMP)
	@echo "In $(LOCK_VENV): $$(cat $(LOCK_VENV)/.torch-choice)"
	status=0; \
	($(LOCK_PYTEST) -m "not slow" $(OUR_TESTS) $(ACCEPTANCE_TESTS)) || status=1; \
	echo "The tests upstream's selection leaves out (marked slow):"; \
	($(LOCK_PYTEST) -m slow $(OUR_TESTS) $(ACCEPTANCE_TESTS)) || [ $$? = 5 ] || status=1; \
	exit $$status

# docstring, mypy and format by default; CI leaves out format, which `make lint` runs on the same
# tree with the same tools and configuration, and fails on any file (so on any new one).
UPSTREAM_JOBS ?=
UPSTREAM_JOBS_DIR := build/upstream-jobs

## upstream-jobs: upstream's `make docstring-test`, `mypy .` and `make check-format` on the stacked
## tree and pristine 4.3.0, in build/lock-venv; fails on a failure or error pristine lacks
# On a copy of the stacked tree, so that CI can run it beside steps that re-export build/pr.
upstream-jobs: lock-venv pr $(PRISTINE)/.git
	rm -rf $(UPSTREAM_JOBS_DIR)/stacked && mkdir -p $(UPSTREAM_JOBS_DIR)
	cp -a $(STACKED) $(UPSTREAM_JOBS_DIR)/stacked
	$(LOCK_PY) tools/upstream_jobs.py --pristine $(PRISTINE) --stacked $(UPSTREAM_JOBS_DIR)/stacked \
		--report-dir $(UPSTREAM_JOBS_DIR) $(UPSTREAM_JOBS)

## py310-check: the series' Python files use no syntax or standard library newer than 3.10 (vermin)
py310-check: link
	cd $(FORK) && out=$$(../../$(VENV)/bin/vermin --target=3.10- --violations --no-tips \
		--eval-annotations $(SERIES_PY)); status=$$?; echo "$$out"; \
		if echo "$$out" | grep -q "error:"; then echo "vermin could not parse a file"; exit 1; fi; \
		exit $$status
