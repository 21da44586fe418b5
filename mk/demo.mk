# Demo of the logit lens on the shipped reference model (issue 4): prints the per-layer table and
# writes the figures that the docs page shows (docs/source/_static/logit_lens/*.png, committed).

DEMO_FIGURES_DIR := docs/source/_static/logit_lens

.PHONY: demo

## demo: logit lens of the reference model, fresh against cached scale; figures for the docs page
demo:
	$(PY) demos/logit_lens_demo.py --out-dir $(DEMO_FIGURES_DIR)
