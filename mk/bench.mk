# Benchmarks (figures printed, never timed tests): fresh normalization against the cached scale
# and 4.3.0's per-entry loop; the logit-lens tool against 4.3.0's, without and with KL
# (--quick checks KL's memory bound). `make bench` writes benchmarks/RESULTS.md; `make bench-quick`
# prints CI sizes.
.PHONY: bench bench-quick

## bench: full benchmarks on this machine, tables written to benchmarks/RESULTS.md (minutes)
bench: link
	$(PY) benchmarks/bench_fresh_normalization.py
	$(PY) benchmarks/bench_logit_lens_statistics.py

## bench-quick: CI-size shapes, prints the tables only
bench-quick: link
	$(PY) benchmarks/bench_fresh_normalization.py --quick
	$(PY) benchmarks/bench_logit_lens_statistics.py --quick
