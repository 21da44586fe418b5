#!/usr/bin/env python3
"""Fresh normalization walked and in one call, against 4.3.0's per-entry loop and the cached scale.

On GPT-2-small-shaped caches (raw and compatibility mode) and a Llama-shaped one, times
``apply_ln_to_stack`` on the whole accumulated-residual stack, every case interleaved in the same
process:

- walked: ``recompute_ln=True`` as PR 1 runs it (``normalize_without_hooks``: the norm's own
  forward, hooks bypassed, walked a few rows at a time);
- one call: the same code with the walk's step above the stack's size, so the norm's forward runs
  once over the whole stack (what the walk is measured against);
- 4.3.0 loop: pristine 4.3.0's own ``ActivationCache.apply_ln_to_stack(recompute_ln=True)``, loaded
  from the unpacked release, which calls ``ln_final`` once per stack entry (hooks fire);
- cached: ``recompute_ln=False`` (centre, divide by ``ln_final.hook_scale``);
- fused: one ``F.layer_norm`` (or one RMS expression) over the whole stack with the norm's weight
  and bias: not the norm's own arithmetic, so it differs from 4.3.0 in the last bits. Kept only to
  price exactness.

Each time is the median of repeated runs after a warm-up, the cases of a model taking turns in
every repeat. Peak extra memory is the peak resident size during the call minus the size before,
output included. ``--quick`` uses CI sizes and prints only; otherwise the section is written to
benchmarks/RESULTS.md: the table and a line saying how it was measured (what a pull request's
description shows), then bullet lines for this repository only.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from transformer_lens.model_bridge.generalized_components import normalization
from transformer_lens.model_bridge.sources import build_bridge_from_module

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
SECTION = "Fresh normalization"
PRISTINE_CACHE_MODULE = ROOT / "build" / "pristine" / "transformer_lens" / "ActivationCache.py"


def pristine_cache_class() -> type:
    """4.3.0's ActivationCache class, loaded from the unpacked pristine release."""
    if not PRISTINE_CACHE_MODULE.exists():
        subprocess.run(
            [str(ROOT / "tools" / "fork.sh"), "pristine", str(ROOT / "build" / "pristine")],
            check=True,
            cwd=ROOT,
        )
    spec = importlib.util.spec_from_file_location(
        "pristine_activation_cache", PRISTINE_CACHE_MODULE
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ActivationCache


def median_ms(calls: Dict[str, Callable[[], object]], repeats: int) -> Dict[str, float]:
    """Median milliseconds of each call; the calls take turns in every repeat, so that a slow
    spell of a shared machine falls on all of them alike."""
    for call in calls.values():
        call()  # warm-up
    times: Dict[str, List[float]] = {case: [] for case in calls}
    for _ in range(repeats):
        for case, call in calls.items():
            started = time.perf_counter()
            call()
            times[case].append((time.perf_counter() - started) * 1000)
    return {case: statistics.median(values) for case, values in times.items()}


def in_one_call(call: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """``call`` with the row walk's step above any stack's size: the norm runs once over it."""

    def run() -> torch.Tensor:
        step = normalization._ROWS_PER_STEP_BYTES
        normalization._ROWS_PER_STEP_BYTES = 1 << 62
        try:
            return call()
        finally:
            normalization._ROWS_PER_STEP_BYTES = step

    return run


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def return_freed_memory_at_once() -> None:
    """Make glibc map every block above 64 KiB on its own, so that a freed temporary leaves the
    resident size at once and the peak resident size counts every temporary. Slows allocation:
    call it after the timings."""
    ctypes.CDLL("libc.so.6").mallopt(-3, 65536)  # M_MMAP_THRESHOLD


def peak_extra_mib(function: Callable[[], object]) -> float:
    """Peak resident size during the call (its output included) minus the resident size before."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # VmHWM := VmRSS
    before = _status_bytes("VmRSS")
    result = function()
    peak = _status_bytes("VmHWM")
    del result
    return (peak - before) / 2**20


def fused(norm, stack: torch.Tensor) -> torch.Tensor:
    """One fused call over the stack (the earlier PR's arithmetic), for comparison only."""
    module = norm.original_component
    weight = getattr(module, "weight", None)
    eps = getattr(module, "eps", None) or getattr(module, "variance_epsilon", 1e-5)
    if norm.uses_rms_norm:
        x = stack.float()
        out = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return (out * weight if weight is not None else out).to(stack.dtype)
    bias = getattr(module, "bias", None)
    return F.layer_norm(stack, stack.shape[-1:], weight, bias, eps)


def bench_model(
    name: str, model, tokens: torch.Tensor, repeats: int
) -> Callable[[], Tuple[str, str]]:
    """Times every case now; returns what measures memory and writes the row and the note."""
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    stack = cache.accumulated_resid()
    pristine = pristine_cache_class()(cache.cache_dict, model)
    hook_calls = [0]

    def count(tensor, hook):
        hook_calls[0] += 1

    walked = lambda: cache.apply_ln_to_stack(stack, recompute_ln=True)  # noqa: E731
    calls = {
        "walked": walked,
        "one call": in_one_call(walked),
        "loop": lambda: pristine.apply_ln_to_stack(stack, recompute_ln=True),
        "cached": lambda: cache.apply_ln_to_stack(stack, recompute_ln=False),
        "fused": lambda: fused(model.ln_final, stack),
    }
    hooks = {}
    with torch.no_grad():
        ms = median_ms(calls, repeats)
        reference = calls["loop"]()
        same = torch.equal(calls["walked"](), reference)
        same_in_one_call = torch.equal(calls["one call"](), reference)
        fused_off = (calls["fused"]() - reference).abs().max().item()
        # Hook calls per call, counted apart from the timings: with hooks attached, the fresh
        # path also names them in a warning, which is not what a call without hooks pays.
        for hook_point in model.hook_dict.values():
            hook_point.add_hook(count)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for case, call in calls.items():
                before = hook_calls[0]
                call()
                hooks[case] = hook_calls[0] - before
    model.reset_hooks()
    shape = "×".join(str(d) for d in stack.shape)

    def row() -> Tuple[str, str]:
        with torch.no_grad():
            mib = {case: peak_extra_mib(calls[case]) for case in ("walked", "loop")}
        table_row = f"| {name} | {ms['walked']:.1f} | {ms['one call']:.1f} | {ms['loop']:.1f} |"
        note = (
            f"- {name}, stack {shape}: `torch.equal` to 4.3.0 walked {same}, in one call "
            f"{same_in_one_call}; peak extra MiB walked / loop {mib['walked']:.1f} / "
            f"{mib['loop']:.1f}; "
            f"hooks fired walked / one call / loop {hooks['walked']} / {hooks['one call']} / "
            f"{hooks['loop']}; cached {ms['cached']:.1f} ms; fused {ms['fused']:.1f} ms, "
            f"{fused_off:.1e} max abs off 4.3.0."
        )
        return table_row, note

    return row


def gpt2_small() -> object:
    torch.manual_seed(0)
    config = GPT2Config()  # GPT-2 small: 12 layers, d_model 768, vocabulary 50,257
    hf_model = GPT2LMHeadModel(config).eval()
    return build_bridge_from_module(hf_model, "GPT2LMHeadModel", hf_config=config, device="cpu")


def llama_shaped(quick: bool) -> object:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=2048 if not quick else 512,
        intermediate_size=128,
        num_hidden_layers=16 if not quick else 4,
        num_attention_heads=16,
        num_key_value_heads=4,
        max_position_embeddings=512,
    )
    hf_model = LlamaForCausalLM(config).eval()
    return build_bridge_from_module(hf_model, "LlamaForCausalLM", hf_config=config, device="cpu")


def machine() -> Tuple[str, int, str]:
    """The processor, the number of cores and the load average now."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return cpu, os.cpu_count() or 0, ", ".join(f"{value:.1f}" for value in os.getloadavg())


def write_section(text: str) -> None:
    """Replace this benchmark's section of RESULTS.md (up to the next "## "), keep the others."""
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^## {re.escape(SECTION)}\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    if pattern.search(old):
        new = pattern.sub(lambda _: text, old)
    else:
        new = old.rstrip("\n") + "\n\n" + text
    RESULTS.write_text(new.rstrip("\n") + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI sizes, print only")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: a busy machine stalls multi-threaded kernels unevenly)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batch, positions, repeats = (1, 32, 5) if args.quick else (4, 256, 15)
    tokens = torch.randint(0, 1000, (batch, positions))
    header = ["| model | walked | one call | 4.3.0 loop |", "| --- | --- | --- | --- |"]
    compatibility_mode = gpt2_small()
    compatibility_mode.enable_compatibility_mode()
    measured = [
        bench_model("GPT-2", gpt2_small(), tokens, repeats),
        bench_model("GPT-2 folded", compatibility_mode, tokens, repeats),
        bench_model("Llama RMSNorm", llama_shaped(args.quick), tokens, repeats),
    ]
    return_freed_memory_at_once()
    rows, notes = zip(*(row() for row in measured))
    table = "\n".join(header + list(rows)) + "\n"
    print(table)
    print("\n".join(notes))
    if args.quick:
        return
    cpu, cores, load = machine()
    threads = torch.get_num_threads()
    text = (
        f"## {SECTION}\n\n"
        f"ms, median of {repeats} interleaved runs, {batch} × {positions} tokens, float32, "
        f"{threads} thread{'s' if threads > 1 else ''}, {cpu}:\n\n{table}\n"
        f"- Written by `benchmarks/{Path(sys.argv[0]).name}` (`make bench`), `apply_ln_to_stack` "
        f"on the accumulated-residual stack, torch {torch.__version__}, Python "
        f"{platform.python_version()}; {cores} cores, load average {load} at the start. Random-init "
        "models: GPT-2 small, GPT-2 small in compatibility mode (folded), a Llama-shaped one. walked = as PR 1 runs it; one call = "
        "the same code with the walk's step above the stack's size; 4.3.0 loop = pristine "
        "4.3.0's `apply_ln_to_stack`, loaded from the release. Peak extra memory: the peak "
        "resident size during the call minus the size before, output included. Cached: "
        "`recompute_ln=False`; fused: one `F.layer_norm` (or RMS expression) over the stack, not "
        "the norm's own arithmetic, to price exactness.\n" + "\n".join(notes) + "\n\n"
    )
    write_section(text)
    print(f"written to {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
