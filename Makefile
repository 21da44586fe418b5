# Builds and checks the fork of TransformerLens 4.3.0 that carries the logit-lens pull requests.
# The two commands a new user runs are `make setup` and `make test` (see README.md).

PYTHON_BOOTSTRAP ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONHASHSEED := 0

FORK := build/fork
PRISTINE := build/pristine
# Run from the fork so that upstream's pyproject.toml (pytest options, black/isort config) applies.
FORK_PY := ../../$(PY)
PYTEST := $(FORK_PY) -m pytest -p no:cacheprovider
# The tests the pull requests add (at upstream paths, linked into the fork), but for the acceptance
# tier: it loads gpt2 and pythia-70m from the Hugging Face Hub, as upstream's acceptance tests do
# (upstream's CI caches them). `make acceptance` (mk/acceptance.mk) runs it offline against a local
# Hub cache of those models with random weights.
ACCEPTANCE_TESTS = $(shell git ls-files --cached --others --exclude-standard -- 'tests/acceptance/*.py')
OUR_TESTS = $(filter-out $(ACCEPTANCE_TESTS),$(shell git ls-files --cached --others --exclude-standard -- 'tests/*.py'))
# Python files the series add (and the repository's own examples), and the library files they edit.
ADDED_PY = $(filter tests/% demos/% examples/% transformer_lens/%,$(shell git ls-files --cached --others --exclude-standard -- '*.py'))
EDITED_LIBRARY_FILES = $(shell cd $(FORK) && git diff --name-only upstream HEAD --diff-filter=M -- 'transformer_lens/*.py')
# Upstream's tests of the code the pull requests touch (the cache, the norms, the logit-lens tool),
# as the manifest lists them.
UPSTREAM_TESTS = $(shell python3 tools/pull_requests.py upstream-tests)

.PHONY: setup venv fork link example test lint format patches patches-check upstream-compare \
	upstream-compare-full constraints clean

## setup: create the virtualenv with pinned dependencies, build the fork, run the offline example
setup: fork example

# A stamp, not $(PY) itself: the interpreter is a link into the base Python.
VENV_STAMP := $(VENV)/.installed
REQUIREMENTS := $(filter-out requirements/constraints.txt,$(wildcard requirements/*.txt))
$(VENV_STAMP): $(REQUIREMENTS) requirements/constraints.txt
	test -x $(PY) || $(PYTHON_BOOTSTRAP) -m venv $(VENV)
	$(PIP) install --quiet --constraint requirements/constraints.txt $(addprefix -r ,$(REQUIREMENTS))
	touch $(VENV_STAMP)

venv: $(VENV_STAMP)

## fork: materialize build/fork (pristine 4.3.0 + patches/ + our files) and install it editable
fork: $(VENV_STAMP)
	PYTHON=$(PY) tools/fork.sh fork

## example: a short logit lens on the shipped reference model, fresh against cached, offline
example:
	$(PY) examples/quickstart.py

## link: make files newly added to this repository visible in build/fork
link:
	PYTHON=$(PY) tools/fork.sh link

## test: the tests the pull requests add, and this repository's own checks
test: link
	@echo "Deselected (pretrained weights from the Hub; upstream's CI caches them): $(ACCEPTANCE_TESTS)"
	cd $(FORK) && $(PYTEST) $(OUR_TESTS)
	$(PY) -m pytest -p no:cacheprovider checks

## lint: upstream's `make check-format` (pycln, isort, black with its config) on the exported
## tree (pristine 4.3.0 + every series, real files), mypy on the library files the series edit,
## and vermin's Python 3.10 check of the series' files (mk/lock.mk)
lint: pr py310-check
	cd build/pr/series && $(abspath $(PY)) -m pycln --check --all . --exclude "__init__.py"
	cd build/pr/series && $(abspath $(PY)) -m isort --check-only .
	cd build/pr/series && $(abspath $(PY)) -m black --check .
	cd $(FORK) && $(FORK_PY) -m mypy $(EDITED_LIBRARY_FILES)

## format: upstream's formatters, with upstream's configuration, on the files the series add
format:
	$(PY) -m pycln --all $(ADDED_PY)
	$(PY) -m isort --settings-path $(FORK) $(ADDED_PY)
	for file in $(ADDED_PY); do $(PY) -m black --config $(FORK)/pyproject.toml $$file; done

## patches: regenerate patches/<pr> (tools/pull_requests.py) from the edits committed in build/fork
patches:
	PYTHON=$(PY) tools/fork.sh patches

## patches-check: fail, naming the files, if build/fork edits upstream files beyond patches/
patches-check:
	PYTHON=$(PY) tools/fork.sh patches-check

$(PRISTINE)/.git:
	PYTHON=$(PY) tools/fork.sh pristine $(PRISTINE)

## upstream-compare: upstream's tests of the cache, norms and logit-lens tool, pristine vs fork
upstream-compare: $(PRISTINE)/.git link
	$(PY) tools/compare_suites.py --pristine $(PRISTINE) --fork $(FORK) \
		--report-dir build/compare -m "not slow" $(UPSTREAM_TESTS)

## upstream-compare-full: upstream's whole offline unit and integration suites (about an hour)
upstream-compare-full: $(PRISTINE)/.git link
	$(PY) tools/compare_suites.py --pristine $(PRISTINE) --fork $(FORK) \
		--report-dir build/compare-full -m "not slow" tests/unit tests/integration

## constraints: re-pin every package after a change to requirements/*.txt
constraints:
	(sed -n '1,2p' requirements/constraints.txt; $(PIP) freeze --exclude-editable \
		| sed 's/^torch==2.13.0+cpu$$/torch==2.13.0/' | grep -v '^transformer-lens') \
		> requirements/constraints.txt.new
	mv requirements/constraints.txt.new requirements/constraints.txt

clean:
	rm -rf build dist

# Targets of the docs, demo, benchmark and pull-request export live beside this file.
include $(wildcard mk/*.mk)
