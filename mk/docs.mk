# Docs: the logit lens page and the API reference of the changed code, built with Sphinx and MyST
# as upstream builds its docs, warnings as errors. The page stays at its upstream path
# (docs/source/content/); docs-shim/ holds a minimal configuration outside upstream's tree.

DOCS_BUILD := build/docs
.PHONY: docs docs-test

## docs: build the logit lens page and the API reference to build/docs/html (warnings are errors)
docs: $(VENV_STAMP) link
	rm -rf $(DOCS_BUILD)
	mkdir -p $(DOCS_BUILD)/source/content
	cp docs-shim/conf.py docs-shim/index.md docs-shim/api.md $(DOCS_BUILD)/source/
	cp docs/source/content/logit_lens.md $(DOCS_BUILD)/source/content/
	mkdir -p $(DOCS_BUILD)/source/_static
	cp -R docs/source/_static/logit_lens $(DOCS_BUILD)/source/_static/
	$(PY) -m sphinx -W --keep-going -b html -d $(DOCS_BUILD)/doctrees \
		$(DOCS_BUILD)/source $(DOCS_BUILD)/html

## docs-test: run every code block of the page and check its output
docs-test: link
	$(PYTEST) tests/docs
