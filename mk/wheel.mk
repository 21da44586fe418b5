# An installable wheel of the fork: pristine 4.3.0 (the pinned sdist, checked against upstream.env)
# + the patch series, in the order tools/pull_requests.py gives + the files this repository adds,
# copied as real files. It is built in a temporary folder, so build/fork is not read or changed
# (its HEAD may hold commits `make patches` has not exported yet; the wheel is what patches/ say).
# The version gets the local label +logitlens, so pip and users can tell it from PyPI's 4.3.0.

UPSTREAM_VERSION := $(shell . ./upstream.env && echo $$UPSTREAM_VERSION)
WHEEL_VERSION := $(UPSTREAM_VERSION)+logitlens
WHEEL_DIR := dist/wheel
WHEEL := $(WHEEL_DIR)/transformer_lens-$(WHEEL_VERSION)-py3-none-any.whl
WHEEL_VENV := build/wheel-venv
WHEEL_TORCH := $(shell sed -n 's/^torch==//p' requirements/constraints.txt)
# The roots under which this repository keeps added files (ADDED_ROOTS in tools/fork.sh).
WHEEL_ADDED_ROOTS := transformer_lens tests docs demos

.PHONY: wheel wheel-check

# The wheel holds every Python file of the patched tree's transformer_lens/, byte for byte, as a
# file (a zip holds no links): the patched modules and any library file this repository adds.
define WHEEL_HOLDS_PY
import pathlib, sys, zipfile
wheel, src = zipfile.ZipFile(sys.argv[1]), pathlib.Path(sys.argv[2])
names = set(wheel.namelist())
files = [p for p in sorted(src.glob("transformer_lens/**/*.py")) if "__pycache__" not in p.parts]
bad = [str(p.relative_to(src)) for p in files
       if str(p.relative_to(src)) not in names or wheel.read(str(p.relative_to(src))) != p.read_bytes()]
assert files and not bad, f"wheel: files missing from the wheel or not as in the tree: {bad}"
print(f"wheel: its {len(files)} Python files of transformer_lens/ are the patched tree's")
endef
export WHEEL_HOLDS_PY

## wheel: build dist/wheel/transformer_lens-<version>+logitlens-py3-none-any.whl (pristine + series)
wheel: $(VENV_STAMP)
	@set -eu; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; src=$$tmp/src; \
	PYTHON=$(PY) tools/fork.sh pristine "$$src" >/dev/null; \
	n=0; for dir in $$(python3 tools/pull_requests.py patch-dirs); do \
		for patch in $$(ls $$dir/*.patch 2>/dev/null); do \
			git -C "$$src" am --quiet --committer-date-is-author-date "$(CURDIR)/$$patch"; n=$$((n+1)); \
		done; \
	done; \
	git ls-files --cached --others --exclude-standard -- $(WHEEL_ADDED_ROOTS) | \
		(while IFS= read -r f; do [ ! -e "$$f" ] || echo "$$f"; done) >"$$tmp/added"; \
	tar --files-from="$$tmp/added" --dereference -cf - | tar -xf - -C "$$src"; \
	grep -q '^    version="$(UPSTREAM_VERSION)"$$' "$$src/pyproject.toml" || \
		{ echo "wheel: no version=\"$(UPSTREAM_VERSION)\" line in pyproject.toml" >&2; exit 1; }; \
	sed -i 's/^    version="$(UPSTREAM_VERSION)"$$/    version="$(WHEEL_VERSION)"/' "$$src/pyproject.toml"; \
	mkdir -p $(WHEEL_DIR); rm -f $(WHEEL_DIR)/transformer_lens-*.whl; \
	$(PIP) wheel --quiet --no-deps --no-build-isolation --wheel-dir $(WHEEL_DIR) "$$src"; \
	test -f $(WHEEL) || { echo "wheel: $(WHEEL) was not built" >&2; exit 1; }; \
	$(PY) -c "$$WHEEL_HOLDS_PY" $(WHEEL) "$$src"; \
	echo "wheel: $(WHEEL) ($(UPSTREAM_VERSION) + $$n patches + added files)"

# The check runs in a fresh virtualenv (no system site-packages) from a folder outside the
# repository, so that it imports the installed wheel and nothing else. torch first: pip takes the
# local CPU wheel. The lens: a tiny random GPT-2 built from a config (offline), read with fresh
# normalization, must equal calling ln_final on each residual, bit for bit.
define WHEEL_CHECK_PY
import importlib.metadata, os, sys
import torch
from transformers import GPT2Config, GPT2LMHeadModel
import transformer_lens
from transformer_lens.model_bridge.sources import build_bridge_from_module

version = importlib.metadata.version("transformer-lens")
where = os.path.realpath(transformer_lens.__file__)
print(f"wheel-check: transformer-lens {version} from {where}; torch {torch.__version__}")
assert version == sys.argv[1], (version, sys.argv[1])
assert where.startswith(os.path.realpath(sys.prefix)), where
torch.manual_seed(0)
config = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=3, n_head=4)
model = build_bridge_from_module(
    GPT2LMHeadModel(config).eval(), "GPT2LMHeadModel", hf_config=config, device="cpu"
)
tokens = torch.randint(0, 64, (2, 8))
with torch.no_grad():
    _, cache = model.run_with_cache(tokens)
    lens = cache.accumulated_resid(apply_ln=True, recompute_ln=True)
    stack = cache.accumulated_resid()
    expected = torch.stack([model.ln_final(e) for e in stack])
assert lens.shape == (config.n_layer + 1, 2, 8, 32), lens.shape
assert torch.equal(lens, expected), (lens - expected).abs().max()
print(f"wheel-check: accumulated_resid(apply_ln=True, recompute_ln=True) {tuple(lens.shape)} "
      "equals ln_final on each layer (torch.equal)")
endef
export WHEEL_CHECK_PY

## wheel-check: install the wheel in a fresh virtualenv and run a short logit lens there
wheel-check: wheel
	rm -rf $(WHEEL_VENV)
	$(PYTHON_BOOTSTRAP) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/python -m pip install --quiet --disable-pip-version-check torch==$(WHEEL_TORCH)
	$(WHEEL_VENV)/bin/python -m pip install --quiet --disable-pip-version-check \
		--constraint requirements/constraints.txt $(WHEEL)
	@tmp=$$(mktemp -d); cd "$$tmp" && $(CURDIR)/$(WHEEL_VENV)/bin/python -c "$$WHEEL_CHECK_PY" \
		$(WHEEL_VERSION); status=$$?; rm -rf "$$tmp"; exit $$status
