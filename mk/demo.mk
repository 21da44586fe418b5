# The demo notebook, checked the way upstream checks its notebooks (nbval with its sanitizer). The
# command-line script's argument checks are in checks/test_demo_script.py (make test).

.PHONY: demo

## demo: run demos/Logit_Lens_Demo.ipynb under nbval in the fork
demo: link
	cd $(FORK) && $(PYTEST) --nbval --nbval-sanitize-with demos/doc_sanitize.cfg \
		demos/Logit_Lens_Demo.ipynb
