# Docs: upstream's own build (docs/make_docs.py's steps: copy the demos, generate the bridge-models
# page, Sphinx with upstream's conf.py) on the exported tree, pristine 4.3.0 + every series. Pristine
# 4.3.0 itself does not build with -W (its generated API pages warn), so the check is that the
# series add no warning to pristine's (tools/docs-warnings-4.3.0.txt) and that the logit-lens page
# is built and in the toctree. Needs pandoc (Debian package) for upstream's notebooks.

.PHONY: docs docs-exported docs-baseline figures figures-check

## docs: build upstream's docs of the patched tree into build/docs/html; fail on any new warning
docs: pr docs-exported

## docs-exported: the same on the tree the last `make pr` exported, copied first so that a later
## `make pr` cannot change it midway (.ci/run builds the docs beside its other steps)
docs-exported:
	rm -rf build/docs-tree && cp -a build/pr/series build/docs-tree
	$(PY) tools/docs_check.py --tree build/docs-tree --out build/docs

## docs-baseline: record pristine 4.3.0's warnings (once per upstream release)
docs-baseline: $(PRISTINE)/.git
	$(PY) tools/docs_check.py --tree $(PRISTINE) --out build/docs-pristine \
		--record tools/docs-warnings-$(shell . ./upstream.env && echo $$UPSTREAM_VERSION).txt

## figures: redraw the docs page's figures from the reference model over held-out text
figures: link
	$(PY) tools/docs_figures.py

## figures-check: redraw them into a temporary folder; the numbers must match the committed CSV
# Compares logit_lens_stats.csv within an absolute 1e-3 in plotted units (see tools/docs_figures.py)
# and that every committed SVG is redrawn; never the SVG bytes, which change with the CPU. It does
# not depend on `link` (which commits in build/fork): a check should change nothing.
figures-check:
	$(PY) tools/docs_figures.py --check
