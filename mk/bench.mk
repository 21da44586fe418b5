# Benchmark of the logit lens (issue 5): fresh normalization against the cached scale and a
# Python loop, and streaming logit-lens statistics against the naive full computation.
.PHONY: bench bench-quick

## bench: full benchmark on this machine, tables written to benchmarks/RESULTS.md (minutes)
bench:
	$(PY) benchmarks/bench_logit_lens.py

## bench-quick: CI-size shapes, prints the tables only (under 2 minutes)
bench-quick:
	$(PY) benchmarks/bench_logit_lens.py --quick
