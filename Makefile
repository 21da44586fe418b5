# Builds and checks the fork of TransformerLens that carries the logit-lens pull request.
# The two commands a new user runs are `make setup` and `make test` (see README.md).

PYTHON_BOOTSTRAP ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONHASHSEED := 0

PYTEST := $(PY) -m pytest -c pytest.ini -p no:cacheprovider
# Doctests of the code this pull request adds or changes (upstream's other examples need the Hub).
DOCTESTS := build/fork/transformer_lens/utilities \
	build/fork/transformer_lens/ActivationCache.py::transformer_lens.ActivationCache.ActivationCache.accumulated_resid \
	build/fork/transformer_lens/ActivationCache.py::transformer_lens.ActivationCache.ActivationCache.apply_ln_to_stack \
	build/fork/transformer_lens/ActivationCache.py::transformer_lens.ActivationCache.ActivationCache.logit_lens_stats
# Python files this repository adds (checked by black, isort and mypy).
OUR_PY = $(shell git ls-files --cached --others --exclude-standard -- '*.py')

.PHONY: setup venv fork link example test unit acceptance doctest lint format patches patches-check \
	constraints clean

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

## fork: materialize build/fork (pristine release + patches/ + our files) and install it editable
fork: $(VENV_STAMP)
	PYTHON=$(PY) tools/fork.sh fork

## example: a short logit lens, fresh normalization against the cached scale, offline
example:
	$(PY) examples/quickstart.py

## link: make files newly added to this repository visible in build/fork
link:
	PYTHON=$(PY) tools/fork.sh link

## test: unit and acceptance tests plus the doctests of the changed code, offline
test: link
	$(PYTEST) tests --doctest-modules $(DOCTESTS)

unit: link
	$(PYTEST) tests/unit

acceptance: link
	$(PYTEST) tests/acceptance

doctest: link
	$(PYTEST) --doctest-modules $(DOCTESTS)

## lint: black, isort and mypy on the files we add, and on the patched upstream file
lint:
	$(PY) -m black --check --line-length 100 $(OUR_PY) build/fork/transformer_lens/ActivationCache.py
	$(PY) -m isort --check-only --profile black --line-length 100 --project transformer_lens $(OUR_PY)
	cd build/fork && ../../$(PY) -m mypy transformer_lens/ActivationCache.py \
		transformer_lens/utilities/fresh_normalization.py transformer_lens/utilities/logit_lens_stats.py

format:
	$(PY) -m black --line-length 100 $(OUR_PY)
	$(PY) -m isort --profile black --line-length 100 --project transformer_lens $(OUR_PY)

## patches: regenerate patches/ from the commits in build/fork
patches:
	PYTHON=$(PY) tools/fork.sh patches

## patches-check: fail, naming the files, if build/fork edits upstream files beyond patches/
patches-check:
	PYTHON=$(PY) tools/fork.sh patches-check

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
