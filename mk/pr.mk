# The pull requests as upstream sees them: `make pr` exports dist/<pr>/ for each PR of the manifest
# (git format-patch series against pristine 4.3.0, each stacked on the ones before, each with its
# DESCRIPTION.md), authored by the exporter (PR_AUTHOR_NAME / PR_AUTHOR_EMAIL, else git config
# user.name / user.email; tools/export_pr.py stops, naming them, where neither is set).
# `make pr-check` applies them with `git am` to a fresh pristine 4.3.0 (never build/fork) and
# runs, there, the tests each adds and upstream's tests of the code it touches.

.PHONY: pr pr-check

## pr: export every pull request of the manifest (tools/pull_requests.py) to dist/<pr>/
pr:
	$(PY) tools/export_pr.py export

## pr-check: prove each series applies to pristine 4.3.0 + the PRs before it and its tests pass there
pr-check: pr
	$(PY) tools/export_pr.py check --python $(abspath $(PY))
