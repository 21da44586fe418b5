# The demo notebook, checked the way upstream checks its notebooks (nbval with its sanitizer), and
# the command-line demo script's argument checks.

.PHONY: demo

## demo: run demos/Logit_Lens_Demo.ipynb under nbval in the fork, and the script's checks
demo: link
	cd $(FORK) && $(PYTEST) --nbval --nbval-sanitize-with demos/doc_sanitize.cfg \
		demos/Logit_Lens_Demo.ipynb
