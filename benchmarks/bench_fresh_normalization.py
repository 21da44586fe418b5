#!/usr/bin/env python3
"""Fresh normalization against the cached scale and against 4.3.0's per-entry loop, side by side.

On one GPT-2-small-shaped cache (a random-init GPT-2 small in a TransformerBridge), times
``apply_ln_to_stack`` on the whole accumulated-residual stack three ways in the same process:

- cached: the fork's ``recompute_ln=False`` (centre, divide by ``ln_final.hook_scale``);
- fresh: the fork's ``recompute_ln=True`` (``normalize_without_hooks``, one call, no hook);
- 4.3.0 loop: pristine 4.3.0's own ``ActivationCache.apply_ln_to_stack(recompute_ln=True)``, loaded
  from the unpacked release, which calls ``ln_final`` once per stack entry (hooks fire).

Each figure is the median of repeated runs after a warm-up. A Llama-shaped RMSNorm row is added
for information. ``--quick`` uses CI sizes and prints only; otherwise the table and the machine are
written to the "Fresh normalization" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from transformer_lens import ActivationCache
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
    spec = importlib.util.spec_from_file_location("pristine_activation_cache", PRISTINE_CACHE_MODULE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ActivationCache


def median_ms(function: Callable[[], object], repeats: int) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def bench_model(name: str, model, tokens: torch.Tensor, repeats: int) -> list[str]:
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    stack = cache.accumulated_resid()
    pristine = pristine_cache_class()(cache.cache_dict, model)
    hook_calls = [0]

    def count(tensor, hook):
        hook_calls[0] += 1

    for hook_point in model.hook_dict.values():
        hook_point.add_hook(count)
    with torch.no_grad():
        cached = median_ms(lambda: cache.apply_ln_to_stack(stack, recompute_ln=False), repeats)
        calls_before = hook_calls[0]
        fresh = median_ms(lambda: cache.apply_ln_to_stack(stack, recompute_ln=True), repeats)
        fresh_hooks = hook_calls[0] - calls_before
        calls_before = hook_calls[0]
        loop = median_ms(lambda: pristine.apply_ln_to_stack(stack, recompute_ln=True), repeats)
        loop_hooks = (hook_calls[0] - calls_before) // (repeats + 1)
        same = torch.allclose(
            cache.apply_ln_to_stack(stack, recompute_ln=True),
            pristine.apply_ln_to_stack(stack, recompute_ln=True),
            atol=1e-5,
        )
    model.reset_hooks()
    shape = "×".join(str(d) for d in stack.shape)
    return [
        f"| {name} | {shape} | {cached:.1f} | {fresh:.1f} | {loop:.1f} | "
        f"{fresh / cached:.2f}× | {loop / fresh:.1f}× | {fresh_hooks} / {loop_hooks} | {same} |"
    ]


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


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
        f"Python {platform.python_version()}"
    )


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
    header = [
        "| model | stack | cached (ms) | fresh (ms) | 4.3.0 loop (ms) | fresh / cached | "
        "loop / fresh | hooks fired: fresh / loop | fresh = 4.3.0 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    rows = []
    model = gpt2_small()
    rows += bench_model("GPT-2 small, raw", model, tokens, repeats)
    model.enable_compatibility_mode()
    rows += bench_model("GPT-2 small, compatibility mode", model, tokens, repeats)
    del model
    rows += bench_model("Llama-shaped RMSNorm, raw", llama_shaped(args.quick), tokens, repeats)
    table = "\n".join(header + rows) + "\n"
    print(table)
    if args.quick:
        return
    text = (
        f"## {SECTION}\n\n"
        f"`{Path(sys.argv[0]).name}` (`make bench`), median of {repeats} runs after a warm-up, "
        f"`apply_ln_to_stack` on the accumulated-residual stack of a random-init model with "
        f"batch {batch} × {positions} positions, float32, no grad.\n\n"
        f"Machine: {machine()}.\n\n{table}\n"
        "cached = the fork's `recompute_ln=False`; fresh = the fork's `recompute_ln=True`; "
        "4.3.0 loop = pristine 4.3.0's `apply_ln_to_stack(recompute_ln=True)`, loaded from the "
        "release, which calls `ln_final` once per stack entry. Hooks fired = calls of hooks "
        "registered on every hook point, per call of `apply_ln_to_stack`.\n\n"
    )
    write_section(text)
    print(f"written to {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
