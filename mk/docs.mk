# Docs: upstream's own build (docs/make_docs.py's steps: copy the demos, generate the bridge-models
# page, Sphinx with upstream's conf.py) on the exported tree, pristine 4.3.0 + every series. Pristine
# 4.3.0 itself does not build with -W (its generated API pages warn), so the check is that the
# series add no warning to pristine's (tools/docs-warnings-4.3.0.txt) and that the logit-lens page
# is built and in the toctree. Needs two Debian packages: pandoc (upstream's notebooks) and
# libjs-mathjax (math rendered offline; tools/docs_check.py stops with the install command when it
# is missing). docs-narrow needs a third, chromium.

.PHONY: docs docs-exported docs-baseline docs-narrow docs-deps figures figures-check

DOCS_DEBIAN_PACKAGES := pandoc libjs-mathjax
DOCS_PAGE_HTML := build/docs/html/content/logit_lens.html

## docs: build upstream's docs of the patched tree into build/docs/html; fail on any new warning
docs: pr docs-exported

## docs-deps: say which Debian packages the docs build lacks, and how to install them
docs-deps:
	@missing=""; command -v pandoc >/dev/null || missing="pandoc"; \
	test -f /usr/share/javascript/mathjax/MathJax.js || missing="$$missing libjs-mathjax"; \
	if [ -n "$$missing" ]; then \
		echo "docs: missing Debian packages:$$missing; install them with:"; \
		echo "  apt-get update && apt-get install -y$$missing"; exit 1; \
	fi

## docs-exported: the same on the tree the last `make pr` exported, copied first so that a later
## `make pr` cannot change it midway (.ci/run builds the docs beside its other steps)
docs-exported: docs-deps
	rm -rf build/docs-tree && cp -a build/pr/series build/docs-tree
	$(PY) tools/docs_check.py --tree build/docs-tree --out build/docs

## docs-narrow: the built page at 390 px in headless Chromium: the table and the first display
## equation fit or scroll in a box of their own, the math is typeset, the page does not scroll
## sideways (needs `make docs` first and Debian's chromium)
docs-narrow:
	$(PY) tools/docs_check.py --narrow $(DOCS_PAGE_HTML) --width 390

## docs-baseline: record pristine 4.3.0's warnings (once per upstream release)
docs-baseline: $(PRISTINE)/.git
	$(PY) tools/docs_check.py --tree $(PRISTINE) --out build/docs-pristine \
		--record tools/docs-warnings-$(shell . ./upstream.env && echo $$UPSTREAM_VERSION).txt

## figures: redraw this repository's logit-lens figures (examples/figures/; no PR carries them)
## from the reference model over held-out text
figures:
	$(PY) tools/docs_figures.py

## figures-check: redraw them into a temporary folder; the numbers must match the committed CSV
# Compares examples/figures/logit_lens_stats.csv within an absolute 1e-3 in plotted units (see
# tools/docs_figures.py) and that every committed SVG is redrawn; never the SVG bytes, which change
# with the CPU. A check should change nothing, so it writes only to a temporary folder.
figures-check:
	$(PY) tools/docs_figures.py --check
