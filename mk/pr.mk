# The pull requests as upstream sees them: `make pr` exports dist/pr1/ and dist/pr2/ (git
# format-patch series against pristine 4.3.0, the second stacked on the first, each with its
# DESCRIPTION.md); `make pr-check` applies them with `git am` to a fresh pristine 4.3.0 (never
# build/fork) and runs, there, the tests each adds and upstream's tests of the code it touches.

.PHONY: pr pr-check

## pr: export both pull requests to dist/pr1/ and dist/pr2/
pr:
	$(PY) tools/export_pr.py export

## pr-check: prove each series applies to pristine 4.3.0 (+ pr1) and its tests pass there
pr-check: pr
	$(PY) tools/export_pr.py check --python $(abspath $(PY))
