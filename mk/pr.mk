# The pull request as upstream sees it: `make pr` exports dist/pr/ (a git format-patch series
# against the pristine release, DESCRIPTION.md, LEFT_OUT.md); `make pr-check` applies that series
# with `git am` to a fresh pristine release (not build/fork) and runs the tests it adds there.

.PHONY: pr pr-check

## pr: export the pull request to dist/pr/ (series, description, what is left out and why)
pr:
	$(PY) tools/export_pr.py export

## pr-check: prove the series applies to the upstream release and its tests pass there
pr-check: pr
	$(PY) tools/export_pr.py check --python $(abspath $(PY)) $(subst build/fork/,,$(DOCTESTS))
