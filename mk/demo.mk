# This repository's demo notebook (examples/, no pull request carries it), on the shipped reference
# model, offline, checked the way upstream checks its notebooks: nbval with upstream's sanitizer
# (build/fork/demos/doc_sanitize.cfg). It runs from the repository root with the fork installed in
# .venv. The command-line script's checks are in checks/test_demo_script.py (make test).

.PHONY: demo

## demo: run examples/Logit_Lens_Demo.ipynb under nbval on the shipped reference model
demo:
	$(PY) -m pytest -p no:cacheprovider -p no:doctestplus --override-ini addopts= --nbval \
		--nbval-sanitize-with $(FORK)/demos/doc_sanitize.cfg examples/Logit_Lens_Demo.ipynb
