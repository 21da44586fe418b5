# The acceptance tier (tests/acceptance) loads `gpt2` and `EleutherAI/pythia-70m` by name, as
# upstream's does. Offline, it reads them from a local Hugging Face Hub cache that
# tools/build_hub_cache.py writes: each model's real config.json and a tokenizer (the reference
# model's), with seeded random weights. The tests are run unchanged.

HUB_CACHE := build/hub-cache
HUB_CACHE_STAMP := $(HUB_CACHE)/.built
HUB_CACHE_INPUTS := tools/build_hub_cache.py $(addprefix reference_model/weights/,tokenizer.json \
	tokenizer_config.json special_tokens_map.json)

.PHONY: acceptance hub-cache

## hub-cache: build/hub-cache, full-size random-init gpt2 and pythia-70m as a Hub cache (~30 s)
hub-cache: $(HUB_CACHE_STAMP)

$(HUB_CACHE_STAMP): $(HUB_CACHE_INPUTS) | $(VENV_STAMP)
	$(PY) tools/build_hub_cache.py --out $(HUB_CACHE)
	touch $@

## acceptance: the acceptance tests, offline, against build/hub-cache (random weights, real configs)
acceptance: link $(HUB_CACHE_STAMP)
	@echo "Acceptance tier against $(HUB_CACHE): full-size gpt2 and pythia-70m with their real"
	@echo "configurations but RANDOM weights. This exercises the loading path and the comparisons,"
	@echo "not the trained weights."
	cd $(FORK) && HF_HOME=$(abspath $(HUB_CACHE)) HF_HUB_CACHE=$(abspath $(HUB_CACHE))/hub \
		$(PYTEST) --durations=0 $(ACCEPTANCE_TESTS)
