"""Benchmark: logit-lens statistics against 4.3.0's tool and against the naive computation.

Statistics: entropy, KL to the final layer, the next token's probability and rank, top 5, for
every stack entry and position of a GPT-2-shaped bridge (random weights, built from a config).
Cases, each run in a fresh subprocess on the same cache, all with 4.3.0's ``chunk_size=64``:

- ``naive``: materialize ``[layers, batch, pos, d_vocab]`` logits, ``log_softmax``, reduce.
- ``4.3.0 targets`` / ``4.3.0 top-5``: the pristine 4.3.0 ``logit_lens`` (loaded by path from the
  release sdist) with per-row targets (entropy and ranks) or ``top_k=5`` (entropy and top 5).
- ``targets``: the same call as ``4.3.0 targets`` on this tree (it now also returns
  ``target_probs``); its outputs are checked ``torch.equal`` to 4.3.0's.
- ``targets + KL``: the same with ``kl_to_final=True``.
- ``statistics_only ...``: the same requests with ``statistics_only=True``.

Time: median of ``--repeats`` runs after one warm-up. Peak extra memory: peak resident set size
(``VmHWM``, reset through ``/proc/self/clear_refs`` before each run) minus the resident size
before the run. The subprocesses run with ``MALLOC_MMAP_THRESHOLD_=65536`` so that glibc returns
every freed block of 64 KiB or more to the system at once: the resident size then follows the
live allocations and a warm-up cannot pre-fault memory that a timed run reuses unseen.

Usage: ``python benchmarks/bench_logit_lens_statistics.py [--quick] [--threads N] [--repeats N]``.
Without ``--quick`` the figures go into the "Logit-lens statistics" section of
``benchmarks/RESULTS.md`` (other sections are left alone).
"""

import argparse
import datetime
import importlib
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SDIST = os.path.join(ROOT, ".cache", "upstream", "transformer_lens-4.3.0.tar.gz")
RESULTS = os.path.join(ROOT, "benchmarks", "RESULTS.md")
SECTION = "## Logit-lens statistics"
MIB = 2**20
NORM_STEP_BYTES = 2**19  # normalize_without_hooks' step: 512 KiB of rows
# Each case, and the 4.3.0 case of the same selector its time is compared with.
CASES = {
    "naive": "4.3.0 targets",
    "4.3.0 targets": "4.3.0 targets",
    "4.3.0 top-5": "4.3.0 top-5",
    "targets": "4.3.0 targets",
    "targets + KL": "4.3.0 targets",
    "statistics_only targets": "4.3.0 targets",
    "statistics_only targets + KL": "4.3.0 targets",
    "statistics_only top-5": "4.3.0 top-5",
}
BOUNDED = "statistics_only targets + KL"
SHAPES = {
    "full": [("GPT-2 small", 50257, 128), ("256k vocabulary", 256000, 128)],
    "quick": [("GPT-2 small, quick", 50257, 16), ("256k vocabulary, quick", 256000, 4)],
}
N_LAYERS, D_MODEL = 12, 768


# ---------------------------------------------------------------------------------------------
# Worker side (one case in a fresh process)


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        match = re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE)
    assert match is not None, field
    return int(match.group(1)) * 1024


def _pristine_logit_lens() -> Callable[..., Any]:
    """4.3.0's ``logit_lens``, imported by path from the release sdist."""
    target = os.path.join(tempfile.gettempdir(), "tl-4.3.0-logit-lens")
    path = os.path.join(target, "logit_lens.py")
    if not os.path.exists(path):
        os.makedirs(target, exist_ok=True)
        with tarfile.open(SDIST) as sdist:
            member = next(
                m for m in sdist.getmembers() if m.name.endswith("tools/analysis/logit_lens.py")
            )
            extracted = sdist.extractfile(member)
            assert extracted is not None
            with open(path, "wb") as out:
                out.write(extracted.read())
    spec = importlib.util.spec_from_file_location("logit_lens_430", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.logit_lens


def build(d_vocab: int, pos: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    from transformer_lens.model_bridge.sources import build_bridge_from_module

    torch.manual_seed(0)
    # n_inner only shortens the set-up: the lens reads the residual stream, not the MLPs.
    cfg = GPT2Config(
        vocab_size=d_vocab,
        n_positions=pos,
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
    tokens = torch.randint(d_vocab, (1, pos + 1))
    _, cache = model.run_with_cache(tokens[:, :-1])
    return model, cache, tokens[:, 1:]


def naive(model, cache, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
    stack = cache.accumulated_resid(apply_ln=True)  # recomputed at the unembed in 4.x
    logits = model.adapter.apply_output_logits_transform(stack @ model.W_U + model.b_U)
    log_probs = logits.float().log_softmax(-1)
    probs = log_probs.exp()
    index = targets.expand(logits.shape[:-1])[..., None]
    return {
        "entropy": -(probs * log_probs).sum(-1),
        "kl_to_final": (probs[-1] * (log_probs[-1] - log_probs)).sum(-1),
        "target_probs": probs.gather(-1, index),
        "target_ranks": (logits > logits.gather(-1, index)).sum(-1, keepdim=True),
        "top_ids": logits.topk(5, dim=-1).indices,
    }


def case_function(case: str, model, cache, targets) -> Callable[[], Any]:
    from transformer_lens.tools.analysis import logit_lens

    if case == "naive":
        return lambda: naive(model, cache, targets)
    lens = _pristine_logit_lens() if case.startswith("4.3.0") else logit_lens
    kwargs: Dict[str, Any] = {"top_k": 5} if case.endswith("top-5") else {"targets": targets}
    if case.endswith("+ KL"):
        kwargs["kl_to_final"] = True
    if case.startswith("statistics_only"):
        kwargs["statistics_only"] = True
    return lambda: lens(cache, positions=None, **kwargs)


def tensor_peak(function: Callable[[], Any]) -> int:
    """Peak bytes of the tensors the call has allocated and not freed, its output included.

    From the profiler's allocation events (each op's own allocations, and the frees), so it
    counts tensors only, not the interpreter's or the allocator's own memory that RSS also sees.
    """
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        result = function()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    live = peak = 0
    for event in events:
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    del result
    return peak


def result_bytes(readout: Any) -> int:
    """Bytes of the per-row tensors a readout returns."""
    fields = ("values", "entropy", "top_ids", "target_ranks", "target_probs", "kl_to_reference")
    return sum(
        getattr(readout, f).numel() * getattr(readout, f).element_size()
        for f in fields
        if getattr(readout, f) is not None
    )


def worker(case: str, d_vocab: int, pos: int, repeats: int, threads: int) -> Dict[str, Any]:
    torch.set_num_threads(threads)
    model, cache, targets = build(d_vocab, pos)
    function = case_function(case, model, cache, targets)
    runs = []
    with torch.no_grad():
        function()  # warm-up
        for _ in range(repeats):
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")  # VmHWM := VmRSS
            before = _status_bytes("VmRSS")
            start = time.perf_counter()
            result = function()
            seconds = time.perf_counter() - start
            runs.append((seconds, _status_bytes("VmHWM") - before))
            del result
        out: Dict[str, Any] = {
            "seconds": statistics.median(r[0] for r in runs),
            "peak_extra": max(r[1] for r in runs),
        }
        if case == "targets":
            ours = function().readout
            theirs = case_function("4.3.0 targets", model, cache, targets)().readout
            out["equal_to_4.3.0"] = all(
                torch.equal(getattr(ours, f), getattr(theirs, f))
                for f in ("values", "entropy", "target_ranks")
            )
        if case.startswith("statistics_only"):
            readout = function().readout
            expected = naive(model, cache, targets)
            fields = {"kl_to_final": "kl_to_reference"}  # the readout's name of the field
            out["max_abs_diff"] = {
                name: float((getattr(readout, field).float() - value.float()).abs().max())
                for name, value in expected.items()
                for field in [fields.get(name, name)]
                if getattr(readout, field) is not None
            }
            module = importlib.import_module("transformer_lens.tools.analysis.logit_lens")
            rows = (N_LAYERS + 1) * pos
            width = min(module._VOCAB_CHUNK, d_vocab)
            out["chunk"] = [min(64, rows), width]
            # One chunk of logits and its float32 temporaries (shifted, weights, their
            # product, the comparison, KL's difference); the guessed target logits are smaller.
            out["buffer_bytes"] = 6 * min(64, rows) * width * 4
            out["result_bytes"] = result_bytes(readout)
            out["tensor_peak"] = tensor_peak(function)
    return out


# ---------------------------------------------------------------------------------------------
# Driver side


def run_case(case: str, d_vocab: int, pos: int, repeats: int, threads: int) -> Dict[str, Any]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", HF_HUB_OFFLINE="1")
    args = json.dumps([case, d_vocab, pos, repeats, threads])
    done = subprocess.run(
        [sys.executable, __file__, "--worker", args],
        env=env,
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine_lines(threads: int, repeats: int) -> List[str]:
    with open("/proc/cpuinfo") as cpuinfo:
        match = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read(), re.MULTILINE)
    with open("/proc/meminfo") as meminfo:
        total = re.search(r"^MemTotal:\s+(\d+) kB", meminfo.read(), re.MULTILINE)
    assert total is not None
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return [
        f"- Date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- Machine: {match.group(1) if match else platform.processor()}, "
        f"{os.cpu_count()} cores, {int(total.group(1)) / 2**20:.0f} GiB RAM, "
        f"{platform.platform()}; load average at start {load} (the cores are shared)",
        f"- torch {torch.__version__}, CPU, {threads} thread(s) per process; median of "
        f"{repeats} runs after a warm-up, each case in a fresh process",
        "- Peak extra memory: peak RSS (`VmHWM`, reset via `/proc/self/clear_refs`) minus RSS "
        "before the call, glibc run with `MALLOC_MMAP_THRESHOLD_=65536` so freed blocks leave "
        "the RSS at once",
        "- Command: `"
        + " ".join(["python", f"benchmarks/{os.path.basename(__file__)}", *sys.argv[1:]])
        + "`",
    ]


def write_section(lines: List[str]) -> None:
    text = open(RESULTS).read() if os.path.exists(RESULTS) else "# Benchmark results\n"
    section = "\n".join([SECTION, "", *lines]) + "\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text).rstrip("\n") + "\n"
    else:
        text = text.rstrip("\n") + "\n\n" + section
    with open(RESULTS, "w") as out:
        out.write(text)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI sizes; writes nothing")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(*json.loads(args.worker))))
        return
    repeats = args.repeats or (1 if args.quick else 3)
    header = machine_lines(args.threads, repeats)
    print("\n".join(header), flush=True)
    lines = [
        "Entropy and the next token's rank (and, on this tree, its probability), KL to the "
        "final layer, or top 5, over 13 stack entries (12 layers + final) of a random "
        "GPT-2-shaped bridge, d_model 768, batch 1, `chunk_size=64` (rows per unembedding "
        "matmul) in every case. `targets` is the same call as `4.3.0 targets`; `+ KL` adds "
        "`kl_to_final=True`; each time is compared with the 4.3.0 call of the same selector.",
        "",
        *header,
        "",
    ]
    for name, d_vocab, pos in SHAPES["quick" if args.quick else "full"]:
        rows = (N_LAYERS + 1) * pos
        results = {case: run_case(case, d_vocab, pos, repeats, args.threads) for case in CASES}
        ours = results[BOUNDED]
        chunk_rows, vocab_chunk = ours["chunk"]
        stack_bytes = rows * D_MODEL * 4

        # Normalizing: the raw and the normalized stacks, and the norm's three temporaries
        # over one step of rows (normalize_without_hooks walks the stack 512 KiB at a time).
        norm_step = min(stack_bytes, NORM_STEP_BYTES)
        normalizing = 2 * stack_bytes + 3 * norm_step

        def bound(r: Dict[str, Any]) -> int:
            # Reading: the normalized stack, the chunk and its temporaries, one chunk of
            # gathered rows and its normalized copy, and what any implementation
            # returns, twice (the per-chunk parts and their concatenation), plus 64 bytes a row
            # of row indices (targets, chunk rows, their order and its inverse).
            gathered = 2 * chunk_rows * D_MODEL * 4
            results = 2 * r["result_bytes"] + 64 * rows
            return max(normalizing, stack_bytes + r["buffer_bytes"] + gathered + results)

        bounded = [case for case in CASES if "buffer_bytes" in results[case]]
        under = all(results[case]["tensor_peak"] <= bound(results[case]) for case in bounded)
        lines += [
            f"### {name}: {rows:,} rows x {d_vocab:,} vocabulary",
            "",
            f"Naive logits alone: {rows * d_vocab * 4 / MIB:.0f} MiB. Bound of a "
            "`statistics_only` call: the larger of what normalizing holds (the raw and the "
            f"normalized stack, {stack_bytes / MIB:.1f} MiB each, and the norm's temporaries "
            f"over one step of rows, {3 * norm_step / MIB:.2f} MiB) and what reading holds (the "
            f"normalized stack, one chunk of {chunk_rows} x {vocab_chunk:,} float32 logits with "
            f"its temporaries, {ours['buffer_bytes'] / MIB:.2f} MiB, the chunk's gathered and "
            "normalized rows, and "
            "the per-row results twice, the parts and their concatenation, with 64 bytes a row "
            "of row indices). "
            "Tensor peak: the most bytes of tensors the call held at once, its output "
            "included (torch profiler's allocation events); the resident size also counts the "
            "interpreter's and the allocator's own memory. Every `statistics_only` tensor peak "
            f"under its bound: {under}.",
            "",
            "| case | time | peak extra memory (RSS) | tensor peak / bound "
            "| time / 4.3.0, same selector |",
            "|---|---|---|---|---|",
        ]
        for case, baseline in CASES.items():
            r = results[case]
            limit = ""
            if case in bounded:
                limit = f"{r['tensor_peak'] / MIB:.2f} / {bound(r) / MIB:.2f} MiB"
            lines.append(
                f"| {case} | {r['seconds']:.2f} s | {r['peak_extra'] / MIB:.2f} MiB | {limit} | "
                f"{r['seconds'] / results[baseline]['seconds']:.2f}x |"
            )
        diffs = ", ".join(f"{k} {v:.1e}" for k, v in ours["max_abs_diff"].items())
        top = results["statistics_only top-5"]["max_abs_diff"]["top_ids"]
        lines += [
            "",
            f"`targets` outputs `torch.equal` to 4.3.0's: {results['targets']['equal_to_4.3.0']}. "
            f"`{BOUNDED}` against naive, max abs difference: {diffs}; "
            f"`statistics_only top-5` top_ids: {top:.1e}.",
            "",
        ]
        print("\n".join(lines[-(len(CASES) + 9) :]), flush=True)
    if not args.quick:
        write_section(lines)
        print(f"Wrote the section to {RESULTS}")


if __name__ == "__main__":
    main()
