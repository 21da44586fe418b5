"""Benchmark of the logit lens: fresh normalization and streaming statistics.

Prints two tables and writes them, with the machine, date and command, to ``--output``
(``benchmarks/RESULTS.md`` by default):

1. Normalizing the accumulated residual stream, ``accumulated_resid(apply_ln=True)``: the cached
   scale (the default) against fresh statistics (``recompute_ln=True``) and against the obvious
   fix, a Python loop that calls the norm module on each layer.
2. Logit-lens statistics (entropy, KL to the final layer, target probability and rank, top 5):
   ``ActivationCache.logit_lens_stats`` against the naive code that materializes
   ``[layers, batch, pos, d_vocab]`` logits and takes ``log_softmax``. Where the naive logits
   cannot fit in memory, the table says so and the comparison runs on fewer positions.

Each case runs in a fresh subprocess, so allocator caches of one case do not hide another's
memory. In it the model (random weights; the blocks' weights are never read) and an
ActivationCache built from synthetic residuals of the right shapes and keys are set up, the
measured call runs once to warm up and then ``--repeats`` times, and the table gives the median
wall time. Peak extra memory is, on CPU, the peak resident set size (``VmHWM``, reset through
``/proc/self/clear_refs`` before each run) minus the resident size before the run; on CUDA,
``torch.cuda.max_memory_allocated`` minus the memory allocated before the run. All calls run under
``torch.no_grad()``.

Usage: ``python benchmarks/bench_logit_lens.py [--quick] [--repeats N] [--output PATH]``.
"""

import argparse
import datetime
import multiprocessing
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.ActivationCache import ActivationCache
from transformer_lens.utilities.logit_lens_stats import default_chunk_sizes

GIB = 2**30
MIB = 2**20


@dataclass
class Shape:
    """A model and cache shape: ``layers`` blocks give ``layers + 1`` rows of the lens."""

    name: str
    layers: int
    d_model: int
    d_vocab: int
    batch: int
    pos: int
    normalization_type: str = "LN"

    def describe(self) -> str:
        return (
            f"{self.name}: {self.layers + 1} rows x batch {self.batch} x pos {self.pos} x "
            f"d_model {self.d_model}, d_vocab {self.d_vocab:,}, {self.normalization_type}"
        )


# --------------------------------------------------------------------------------------------
# Worker side: build a model and cache, run one case, report time and memory.


def build_cache(shape: Shape, device: str):
    cfg = HookedTransformerConfig(
        n_layers=shape.layers,
        d_model=shape.d_model,
        d_head=64,
        n_heads=shape.d_model // 64,
        d_mlp=4 * shape.d_model,
        n_ctx=shape.pos,
        d_vocab=shape.d_vocab,
        act_fn="gelu",
        normalization_type=shape.normalization_type,
        init_weights=False,  # the blocks are never run; only ln_final and the unembed are read
        device=device,
        seed=0,
    )
    model = HookedTransformer(cfg)
    generator = torch.Generator(device=device).manual_seed(0)

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=generator, device=device)

    with torch.no_grad():
        model.unembed.W_U.copy_(randn(shape.d_model, shape.d_vocab) * 0.05)
        model.unembed.b_U.copy_(randn(shape.d_vocab) * 0.1)
        # Random weights and biases, so that a norm that skipped them would show in the figures.
        for name, param in model.ln_final.named_parameters():
            param.copy_((1.0 if name == "w" else 0.0) + 0.2 * randn(shape.d_model))
    cache_dict: Dict[str, torch.Tensor] = {}
    resid = randn(shape.batch, shape.pos, shape.d_model)
    for layer in range(shape.layers):
        cache_dict[f"blocks.{layer}.hook_resid_pre"] = resid
        # The residual norm grows with depth, as in trained models.
        resid = resid + 0.5 * randn(shape.batch, shape.pos, shape.d_model)
    cache_dict[f"blocks.{shape.layers - 1}.hook_resid_post"] = resid
    centred = resid - resid.mean(-1, keepdim=True) if shape.normalization_type == "LN" else resid
    cache_dict["ln_final.hook_scale"] = (centred.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
    return model, ActivationCache(cache_dict, model)


def naive_stats(cache, targets: torch.Tensor, top_k: int) -> Dict[str, torch.Tensor]:
    """The obvious code: every layer's logits over the whole vocabulary, then log_softmax."""
    model = cache.model
    lens = cache.accumulated_resid(apply_ln=True, recompute_ln=True)
    logits = lens @ model.W_U + model.b_U  # [layers, batch, pos, d_vocab]
    log_probs = logits.log_softmax(dim=-1)
    probs = log_probs.exp()
    target_logits = logits.gather(-1, targets.expand(logits.shape[:-1])[..., None])
    return {
        "entropy": -(probs * log_probs).sum(-1),
        "kl_to_final": (probs[-1] * (log_probs[-1] - log_probs)).sum(-1),
        "target_prob": probs.gather(-1, targets.expand(logits.shape[:-1])[..., None])[..., 0],
        "target_rank": (logits > target_logits).sum(-1),
        "top_k_probs": probs.topk(top_k, dim=-1).values,
    }


def case_function(case: str, model, cache, shape: Shape) -> Callable[[], object]:
    targets = torch.randint(shape.d_vocab, (shape.batch, shape.pos), device=model.cfg.device)
    if case == "cached":
        return lambda: cache.accumulated_resid(apply_ln=True)
    if case == "fresh":
        return lambda: cache.accumulated_resid(apply_ln=True, recompute_ln=True)
    if case == "loop":
        return lambda: torch.stack([model.ln_final(x) for x in cache.accumulated_resid()])
    if case == "stats":
        return lambda: cache.logit_lens_stats(target_tokens=targets, top_k=5)
    if case == "naive":
        return lambda: naive_stats(cache, targets, top_k=5)
    raise ValueError(case)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        match = re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE)
    assert match is not None, field
    return int(match.group(1))


def measure_once(function: Callable[[], object], device: str) -> Dict[str, float]:
    """Wall time and peak memory beyond what was allocated before the call."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # resets VmHWM to the current resident size
        before = _status_kib("VmRSS") * 1024
    start = time.perf_counter()
    result = function()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _status_kib("VmHWM") * 1024
    del result
    return {"seconds": seconds, "peak_extra_bytes": peak - before}


def worker(case: str, shape: Shape, device: str, repeats: int) -> Dict[str, float]:
    torch.manual_seed(0)
    model, cache = build_cache(shape, device)
    function = case_function(case, model, cache, shape)
    with torch.no_grad():
        measure_once(function, device)  # warm-up
        runs = [measure_once(function, device) for _ in range(repeats)]
    return {
        "seconds": statistics.median(run["seconds"] for run in runs),
        "peak_extra_bytes": max(run["peak_extra_bytes"] for run in runs),
        "repeats": repeats,
    }


# --------------------------------------------------------------------------------------------
# Driver side: run each case in a new process, print and write tables.


def run_case(case: str, shape: Shape, device: str, repeats: int) -> Dict[str, float]:
    """Run one case in a new process: forked on CPU (no second import), spawned for CUDA."""
    context = multiprocessing.get_context("fork" if device == "cpu" else "spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as executor:
        return executor.submit(worker, case, shape, device, repeats).result()


def logits_bytes(shape: Shape) -> int:
    return (shape.layers + 1) * shape.batch * shape.pos * shape.d_vocab * 4


def available_bytes(device: str) -> int:
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return free
    return _status_meminfo("MemAvailable")


def _status_meminfo(field: str) -> int:
    with open("/proc/meminfo") as meminfo:
        match = re.search(rf"^{field}:\s+(\d+) kB", meminfo.read(), re.MULTILINE)
    assert match is not None, field
    return int(match.group(1)) * 1024


def stats_chunk_bytes(shape: Shape) -> int:
    """One chunk of logits with the default chunk sizes of logit_lens_stats."""
    rows = shape.batch * shape.pos
    layer_chunk, vocab_chunk = default_chunk_sizes(shape.layers + 1, rows, shape.d_vocab)
    return layer_chunk * rows * vocab_chunk * 4


def stack_bytes(shape: Shape) -> int:
    return (shape.layers + 1) * shape.batch * shape.pos * shape.d_model * 4


def fmt_bytes(size: float) -> str:
    return f"{size / GIB:.2f} GiB" if size >= GIB else f"{size / MIB:.0f} MiB"


def normalization_table(shapes: List[Shape], device: str, repeats: int) -> List[str]:
    lines = [
        "| shape | cached scale | fresh (`recompute_ln=True`) | fresh / cached | "
        "Python loop over `ln_final` | loop / fresh |",
        "|---|---|---|---|---|---|",
    ]
    for shape in shapes:
        times = {
            case: run_case(case, shape, device, repeats)["seconds"]
            for case in ("cached", "fresh", "loop")
        }
        lines.append(
            f"| {shape.describe()} | {times['cached'] * 1e3:.0f} ms | {times['fresh'] * 1e3:.0f} ms | "
            f"{times['fresh'] / times['cached']:.2f}x | {times['loop'] * 1e3:.0f} ms | "
            f"{times['loop'] / times['fresh']:.2f}x |"
        )
        print(lines[-1], flush=True)
    return lines


def stats_table(shapes: List[Shape], device: str, repeats: int) -> List[str]:
    lines = [
        "| shape | naive logits alone | naive time | naive peak extra | `logit_lens_stats` time | "
        "`logit_lens_stats` peak extra | one chunk + residual stack | time stats / naive |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for shape in shapes:
        stats = run_case("stats", shape, device, repeats)
        # The naive code holds logits, log-probs and probs at once: three times the logits.
        fits = 3 * logits_bytes(shape) < 0.8 * available_bytes(device)
        naive = run_case("naive", shape, device, repeats) if fits else None
        bound = stats_chunk_bytes(shape) + stack_bytes(shape)
        lines.append(
            f"| {shape.describe()} | {fmt_bytes(logits_bytes(shape))} | "
            + (
                f"{naive['seconds']:.2f} s | {fmt_bytes(naive['peak_extra_bytes'])} | "
                if naive
                else "does not fit | does not fit | "
            )
            + f"{stats['seconds']:.2f} s | {fmt_bytes(stats['peak_extra_bytes'])} | "
            f"{fmt_bytes(bound)} | "
            + (f"{stats['seconds'] / naive['seconds']:.2f}x |" if naive else "- |")
        )
        print(lines[-1], flush=True)
    return lines


def machine_lines(device: str) -> List[str]:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            match = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read(), re.MULTILINE)
        cpu = match.group(1) if match else cpu
    except OSError:
        pass
    lines = [
        f"- Date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- Command: `{' '.join([os.path.relpath(sys.executable), *sys.argv])}`",
        f"- Machine: {cpu}, {os.cpu_count()} cores, "
        f"{_status_meminfo('MemTotal') / GIB:.0f} GiB RAM, {platform.platform()}",
        "- Load average at start (1, 5, 15 min): "
        + ", ".join(f"{load:.2f}" for load in os.getloadavg())
        + " (other processes on the machine slow multithreaded runs down)",
        f"- torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}"
        + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else ""),
    ]
    return lines


def shapes_for(quick: bool):
    if quick:
        normalization = [Shape("GPT-2-small-like, quick", 12, 768, 1000, 1, 128)]
        stats = [
            Shape("GPT-2 vocab, quick", 12, 768, 50257, 1, 16),
            Shape("256k vocab, quick", 12, 768, 256000, 1, 4),
        ]
        full = [Shape("GPT-2 small, full batch", 12, 768, 50257, 8, 1024)]
        return normalization, stats, full
    normalization = [
        Shape("GPT-2 small", 12, 768, 1000, 8, 1024),
        Shape("Gemma-2-2B-like", 26, 2304, 1000, 2, 1024, "RMS"),
    ]
    stats = [
        Shape("GPT-2 small", 12, 768, 50257, 1, 128),
        Shape("256k vocab", 12, 768, 256000, 1, 32),
    ]
    full = [
        Shape("GPT-2 small, full batch", 12, 768, 50257, 8, 1024),
        Shape("256k vocab, full batch", 12, 768, 256000, 8, 1024),
    ]
    return normalization, stats, full


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI-size shapes (under 2 minutes)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs after a warm-up")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--output",
        default=None,
        help="Markdown file for the tables (default: benchmarks/RESULTS.md, none with --quick)",
    )
    args = parser.parse_args(argv)

    repeats = args.repeats or (2 if args.quick else 3)
    # Quick runs (CI) must not overwrite the committed results.
    output = args.output or (
        os.devnull if args.quick else os.path.join(os.path.dirname(__file__), "RESULTS.md")
    )
    normalization_shapes, stats_shapes, full_shapes = shapes_for(args.quick)
    header = machine_lines(args.device)
    print("\n".join(header), flush=True)
    print(f"Median of {repeats} runs after one warm-up, each case in its own process.\n")
    norm_lines = normalization_table(normalization_shapes, args.device, repeats)
    print()
    stats_lines = stats_table(stats_shapes, args.device, repeats)
    full_lines = [
        f"- {shape.describe()}: naive logits alone {fmt_bytes(logits_bytes(shape))} "
        f"(with log-probs and probs about {fmt_bytes(3 * logits_bytes(shape))}); "
        f"`logit_lens_stats` needs one chunk of logits, {fmt_bytes(stats_chunk_bytes(shape))}, "
        f"beyond the residual stack of {fmt_bytes(stack_bytes(shape))}."
        for shape in full_shapes
    ]
    print()
    print("\n".join(full_lines))
    report = [
        "# Logit-lens benchmark",
        "",
        *header,
        f"- Median of {repeats} runs after one warm-up; each case in its own subprocess; all "
        "calls under `torch.no_grad()`. Peak extra memory: peak RSS (`VmHWM`, reset before each "
        "run) minus RSS before the run on CPU, `torch.cuda.max_memory_allocated` minus allocated "
        "before the run on CUDA.",
        "- Caches are synthetic (random residuals whose norm grows with depth, keys and shapes of "
        "a real run) on a HookedTransformer with random `ln_final` and unembedding.",
        "",
        "## `accumulated_resid(apply_ln=True)`: cached scale, fresh statistics, Python loop",
        "",
        *norm_lines,
        "",
        "## Logit-lens statistics: `ActivationCache.logit_lens_stats` against naive",
        "",
        "Entropy, KL to the final layer, target probability and rank, top 5; default chunk sizes "
        "(the largest chunk of logits within 256 MiB of float32, at least 8,192 vocabulary "
        "entries by one layer). Positions "
        "are fewer than a full batch so that the naive code fits and a run takes seconds.",
        "",
        *stats_lines,
        "",
        "At full batch (not run: the naive code does not fit, and the unembedding alone takes "
        "minutes on a small CPU):",
        "",
        *full_lines,
        "",
    ]
    with open(output, "w") as results:
        results.write("\n".join(report))
    print(f"\nWrote {output}")


if __name__ == "__main__":
    main()
