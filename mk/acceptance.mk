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

## acceptance: the acceptance tests, offline, against build/hub-cache (random weights, real configs),
## with upstream's selection (`make acceptance-test`: -m "not slow"); fails if any is deselected or
## skipped, so upstream's CI runs every one of them too
acceptance: link $(HUB_CACHE_STAMP)
	@echo "Acceptance tier against $(HUB_CACHE): full-size gpt2 and pythia-70m with their real"
	@echo "configurations but RANDOM weights. This exercises the loading path and the comparisons,"
	@echo "not the trained weights."
	@mkdir -p $(dir $(ACCEPTANCE_REPORT))
	cd $(FORK) && $(ACCEPTANCE_ENV) $(PYTEST) --collect-only -q $(ACCEPTANCE_TESTS) \
		> $(abspath $(ACCEPTANCE_COLLECTED))
	cd $(FORK) && $(ACCEPTANCE_ENV) $(PYTEST) -m "not slow" --durations=0 \
		--junitxml=$(abspath $(ACCEPTANCE_REPORT)) $(ACCEPTANCE_TESTS)
	$(PY) -c "$$ACCEPTANCE_ALL_RAN" $(ACCEPTANCE_COLLECTED) $(ACCEPTANCE_REPORT)

ACCEPTANCE_ENV = HF_HOME=$(abspath $(HUB_CACHE)) HF_HUB_CACHE=$(abspath $(HUB_CACHE))/hub
ACCEPTANCE_COLLECTED := build/acceptance/collected.txt
ACCEPTANCE_REPORT := build/acceptance/report.xml

# Every test collected without a marker filter must have run, and passed, under -m "not slow":
# pytest itself passes a run that deselects them ("2 deselected") or that they skip.
define ACCEPTANCE_ALL_RAN
import sys
import xml.etree.ElementTree as ET

collected_file, report = sys.argv[1:]
collected = set()
for line in open(collected_file).read().splitlines():
    path, sep, rest = line.partition(".py::")
    if sep:
        *classes, name = rest.split("::")
        collected.add((".".join([path.replace("/", ".")] + classes), name))
ran, not_passed = set(), []
for case in ET.parse(report).iter("testcase"):
    ran.add((case.get("classname"), case.get("name")))
    not_passed += [case.get("name") for child in case if child.tag in ("skipped", "failure", "error")]
missing = sorted(f"{c}::{n}" for c, n in collected - ran)
if not collected or missing or not_passed:
    sys.exit(f"acceptance: {len(collected)} collected; not run under -m 'not slow': {missing}; "
             f"skipped or failed: {not_passed}")
print(f"acceptance: all {len(collected)} collected tests ran under -m 'not slow' and passed")
endef
export ACCEPTANCE_ALL_RAN
