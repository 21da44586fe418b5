"""Benchmark: the logit-lens tool of this fork against pristine 4.3.0's, same request, one run.

A random GPT-2-shaped bridge (12 layers, d_model 768, built from a config) is run once per
vocabulary size; on its cache, every stack entry (13) at every position is read with per-row
next-token targets, or with ``top_k=5``, by:

- ``4.3.0``: pristine 4.3.0's ``logit_lens``, read from the pinned release sdist and imported by
  path (``checks/conftest.py``'s ``pristine_module``), so it runs on this fork's cache and norm;
- ``fork``: this tree's ``logit_lens``, the same call (it also returns ``target_probs``); its
  fields must be ``torch.equal`` to 4.3.0's;
- ``fork + KL``: the same call with ``kl_to_final=True``.

Time: the median of ``--repeats`` rounds after a warm-up, the cases interleaved within each
round (so that load drift hits every case alike), one torch thread by default. Peak memory: the
most bytes of tensors the call held at once, its output included, from the torch profiler's
allocation events (an untimed run). Targets: ``fork`` within noise of ``4.3.0``; ``fork + KL``
at most 1.1x ``4.3.0``'s time, and at most 1.1x ``fork``'s peak memory (``--quick`` checks the
memory bound only and exits 1 if it fails).

Usage: ``python benchmarks/bench_logit_lens_statistics.py [--quick] [--threads N] [--repeats N]``.
Without ``--quick`` the table goes into the "Logit-lens statistics" section of
``benchmarks/RESULTS.md`` (other sections are left alone), from which ``make pr`` fills PR 3's
description.
"""

import argparse
import datetime
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "checks"))
from conftest import pristine_module  # noqa: E402

RESULTS = ROOT / "benchmarks" / "RESULTS.md"
SECTION = "## Logit-lens statistics"
MIB = 2**20
N_LAYERS, D_MODEL = 12, 768
SHAPES = {  # (name, d_vocab, positions)
    "full": [("50,257", 50257, 64), ("256,000", 256000, 16)],
    "quick": [("50,257 (quick)", 50257, 8), ("256,000 (quick)", 256000, 2)],
}
REQUESTS = ("targets", "top-5")
TOOLS = ("4.3.0", "fork", "fork + KL")
MEMORY_BOUND = 1.1  # fork + KL against fork, peak memory
FIELDS = ("values", "entropy", "target_ranks", "top_ids")


def build(d_vocab: int, positions: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    from transformer_lens.model_bridge.sources import build_bridge_from_module

    torch.manual_seed(0)
    # n_inner only shortens the set-up: the lens reads the residual stream, not the MLPs.
    cfg = GPT2Config(
        vocab_size=d_vocab,
        n_positions=positions,
        n_embd=D_MODEL,
        n_layer=N_LAYERS,
        n_head=12,
        n_inner=D_MODEL,
    )
    hf = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # a random final norm, so that one skipped would show
        hf.transformer.ln_f.weight.normal_(1.0, 0.2)
        hf.transformer.ln_f.bias.normal_(0.0, 0.2)
    model = build_bridge_from_module(
        hf, "GPT2LMHeadModel", hf_config=cfg, dtype=torch.float32, device="cpu"
    )
    tokens = torch.randint(d_vocab, (1, positions + 1))
    _, cache = model.run_with_cache(tokens[:, :-1])
    return cache, tokens[:, 1:]


def calls(cache: Any, targets: torch.Tensor, pristine: Any) -> Dict[tuple, Callable[[], Any]]:
    from transformer_lens.tools.analysis import logit_lens

    out = {}
    for request in REQUESTS:
        kwargs: Dict[str, Any] = {"top_k": 5} if request == "top-5" else {"targets": targets}
        for tool in TOOLS:
            lens = pristine.logit_lens if tool == "4.3.0" else logit_lens
            extra = {"kl_to_final": True} if tool == "fork + KL" else {}
            out[request, tool] = lambda lens=lens, kw={**kwargs, **extra}: lens(
                cache, positions=None, **kw
            )
    return out


def tensor_peak(function: Callable[[], Any]) -> int:
    """Peak bytes of the tensors the call has allocated and not freed, its output included."""
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        result = function()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    del result
    return peak


def measure(functions: Dict[tuple, Callable[[], Any]], repeats: int) -> Dict[tuple, Dict]:
    times: Dict[tuple, List[float]] = {key: [] for key in functions}
    with torch.no_grad():
        for function in functions.values():
            function()  # warm-up
        keys = list(functions)
        for round_ in range(repeats):
            # Interleaved, each round in a rotated order, so that drift hits every case alike.
            for key in keys[round_ % len(keys) :] + keys[: round_ % len(keys)]:
                start = time.perf_counter()
                functions[key]()
                times[key].append(time.perf_counter() - start)
        return {
            key: {"seconds": statistics.median(times[key]), "peak": tensor_peak(function)}
            for key, function in functions.items()
        }


def same_as_4_3_0(functions: Dict[tuple, Callable[[], Any]], request: str) -> bool:
    with torch.no_grad():
        ours, theirs = functions[request, "fork"]().readout, functions[request, "4.3.0"]().readout
    return all(
        (getattr(theirs, f) is None and getattr(ours, f) is None)
        or torch.equal(getattr(ours, f), getattr(theirs, f))
        for f in FIELDS
    )


def machine_lines(threads: int, repeats: int) -> List[str]:
    with open("/proc/cpuinfo") as cpuinfo:
        match = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read(), re.MULTILINE)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return [
        f"- Date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- Machine: {match.group(1) if match else platform.processor()}, {os.cpu_count()} "
        f"cores, {platform.platform()}; load average at start {load}",
        f"- torch {torch.__version__}, CPU, {threads} thread(s); median of {repeats} "
        "interleaved rounds after a warm-up, all cases in one process",
        "- Command: `"
        + " ".join(["python", f"benchmarks/{Path(__file__).name}", *sys.argv[1:]])
        + "`",
    ]


def write_section(lines: List[str]) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    section = "\n".join([SECTION, "", *lines]) + "\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text).rstrip("\n") + "\n"
    else:
        text = text.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(text)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI sizes; checks memory only")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (1 if args.quick else 5)
    pristine = pristine_module(
        "transformer_lens/tools/analysis/logit_lens.py", Path(tempfile.mkdtemp())
    )
    header = machine_lines(args.threads, repeats)
    print("\n".join(header), flush=True)
    lines = [
        f"All {N_LAYERS + 1} entries, every position, random GPT-2-shaped bridge (d_model "
        f"{D_MODEL}, float32, `chunk_size=64`); peak: tensor bytes held at once.",
        "",
        *header,
        "",
        "| vocabulary × positions | request | 4.3.0 | PR | PR, KL | PR / 4.3.0 | KL / 4.3.0 "
        "| peak, KL / no KL |",
        "|---|---|---|---|---|---|---|---|",
    ]
    failures, equal = [], []
    for name, d_vocab, positions in SHAPES["quick" if args.quick else "full"]:
        cache, targets = build(d_vocab, positions)
        functions = calls(cache, targets, pristine)
        results = measure(functions, repeats)
        for request in REQUESTS:
            r = {tool: results[request, tool] for tool in TOOLS}
            base, ours, kl = r["4.3.0"], r["fork"], r["fork + KL"]
            memory = kl["peak"] / ours["peak"]
            if memory > MEMORY_BOUND:
                failures.append(f"{name} {request}: peak with KL {memory:.2f}x without")
            equal.append(same_as_4_3_0(functions, request))
            lines.append(
                f"| {name} × {positions} | {request} | {base['seconds']:.2f} s "
                f"| {ours['seconds']:.2f} s | {kl['seconds']:.2f} s "
                f"| {ours['seconds'] / base['seconds']:.2f}x "
                f"| {kl['seconds'] / base['seconds']:.2f}x | {memory:.2f}x |"
            )
            print(
                f"peak MiB, 4.3.0 / PR / KL: {base['peak'] / MIB:.1f} / {ours['peak'] / MIB:.1f} "
                f"/ {kl['peak'] / MIB:.1f}"
            )
            print(lines[-1], flush=True)
        del cache, functions
    lines += [
        "",
        f"Fields `torch.equal` to 4.3.0's: {all(equal)}. Peak with KL within {MEMORY_BOUND}x "
        "of without: " + ("every row." if not failures else "NO: " + "; ".join(failures)),
    ]
    print(lines[-1])
    if not args.quick:
        write_section(lines)
        print(f"Wrote the section to {RESULTS}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
