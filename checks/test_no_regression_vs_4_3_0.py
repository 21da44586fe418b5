"""Every call pristine 4.3.0 answers, each PR's tree answers the same, bit for bit.

Repository-only. The trees are read from ``build/fork`` at run time: tag ``upstream`` (pristine
4.3.0) and ``pr/<name>`` for each PR of ``tools/pull_requests.py``, in stacking order (``make
fork`` sets the tags). Each tree's ``transformer_lens/`` is exported with ``git archive`` and
``checks/_differential_grid.py`` runs on it in a separate interpreter (``PYTHONPATH`` puts the
export ahead of the editable install of the fork; the driver checks where it imported from). A
tree whose ``transformer_lens/`` is identical to the previous tree's is not run again: its answers
are the previous tree's, and the summary says so.

The models are built here once, from configs with a fixed seed, with random norm weights and biases,
and saved with ``save_pretrained``; every tree loads the same files: GPT-2, GPT-NeoX, Llama and
Gemma, in float32, bfloat16 and float16, raw and in compatibility mode. None of the four has an
unembedding bias, so the driver gives each bridge the same random ``b_U`` before use. The grid (see the driver)
covers ``accumulated_resid``, ``apply_ln_to_stack``, ``decompose_resid``, ``stack_head_results``,
``stack_neuron_results``, ``get_full_resid_decomposition``, ``logit_attrs``, the logit-lens tool,
``cache.logit_lens`` and ``logit_readout``, on a normal, a batchless and two ``names_filter``
caches, with layers as Python ints, numpy ints, ``None`` and ``-1``.

The verdict: for every call pristine answers, every tree answers with equal labels and values and
tensors of the same dtype and shape that are ``torch.equal`` (NaN counted equal to NaN at the same
places: ``torch.equal`` is False for NaN even against itself, and float16 overflows). A call that
pristine raises on may do anything. A warning pristine does not emit on a call it answers is a
regression too, unless ``ALLOWED_NEW_WARNINGS`` lists it with the reason. A different answer that
a PR's description lists as a behaviour change is allowed by ``ALLOWED_CHANGES`` (an exception
never is) and counted apart. The summary is printed, and every differing call is written to
``build/checks/no_regression_vs_4_3_0.txt``. About 33,000 calls per tree; about 1.5 to 3 minutes
on a 2-core machine (four trees run, two at a time).
"""

import io
import os
import re
import subprocess
import sys
import tarfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from tools.pull_requests import PULL_REQUESTS

ROOT = Path(__file__).resolve().parent.parent
FORK = ROOT / "build" / "fork"
DRIVER = Path(__file__).resolve().parent / "_differential_grid.py"
D_MODEL, D_VOCAB, N_LAYERS = 32, 64, 3
# New warnings a PR may emit on a call pristine answers silently: (substring of "Category: text",
# why it is allowed). Empty: no PR warns on a 4.3.0 call without hooks or new options. PR 1's
# warnings (a norm's hooks bypassed; recompute_ln=False on an unfolded norm) need hooks or an
# option 4.3.0 lacks, which this grid never uses; should one appear here, it is reported.
ALLOWED_NEW_WARNINGS: List[Tuple[str, str]] = []
# Calls whose answer a PR changes on purpose, as its description lists: (PR, regular expression
# matched against the call, where the description says so). Only a different answer is allowed
# here, never an exception; the summary counts these calls apart ("changed as listed").
ALLOWED_CHANGES: List[Tuple[str, str, str]] = [
    (
        "pr1",
        # A block's ln1/ln2 (layer in 0..n_layers-1, as an int or a numpy int): 4.3.0 kept the
        # cached scale there despite recompute_ln=True; PR 1 normalizes with fresh statistics
        # (and so returns the stack's dtype, not the float32 of the cached scale).
        rf"\] apply_ln_to_stack\(layer=(np\.int64\()?[0-{N_LAYERS - 1}]\)?, .*recompute_ln=True\)",
        "tools/pr1_description.md.in, Behaviour changes 1",
    ),
]
REPORT = ROOT / "build" / "checks" / "no_regression_vs_4_3_0.txt"  # every differing call


def git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(FORK), *args], check=True, capture_output=True, text=True
    ).stdout.strip()


def trees() -> List[Tuple[str, str]]:
    """(tag, tree hash of transformer_lens/) for pristine and each PR, in stacking order."""
    tags = set(git("tag").split())
    wanted = ["upstream"] + [f"pr/{pr.name}" for pr in PULL_REQUESTS]
    missing = [tag for tag in wanted if tag not in tags]
    assert not missing, f"build/fork lacks the tags {missing}: run `make fork`"
    return [(tag, git("rev-parse", f"{tag}:transformer_lens")) for tag in wanted]


def _randomize_norms(model: torch.nn.Module, weight_offset: bool) -> None:
    """Norm weights away from 1 (Gemma scales by 1 + weight) and biases away from 0."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for module in model.modules():
            if "Norm" not in type(module).__name__:
                continue
            weight = getattr(module, "weight", None)
            if weight is not None:
                scale = torch.rand(weight.shape, generator=generator) * 1.5 + 0.5
                weight.copy_(scale - 1.0 if weight_offset else scale)
            bias = getattr(module, "bias", None)
            if bias is not None:
                bias.copy_(torch.randn(bias.shape, generator=generator) * 0.5)


def save_models(directory: Path) -> None:
    from transformers import (
        GemmaConfig,
        GemmaForCausalLM,
        GPT2Config,
        GPT2LMHeadModel,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
    )

    small = dict(vocab_size=D_VOCAB, num_hidden_layers=N_LAYERS, num_attention_heads=4)
    small.update(hidden_size=D_MODEL, intermediate_size=64, max_position_embeddings=16)
    builders = {
        "gpt2": lambda: GPT2LMHeadModel(
            GPT2Config(
                vocab_size=D_VOCAB,
                n_positions=16,
                n_embd=D_MODEL,
                n_layer=N_LAYERS,
                n_head=4,
                bos_token_id=0,
                eos_token_id=0,
            )
        ),
        "gpt-neox": lambda: GPTNeoXForCausalLM(GPTNeoXConfig(**small)),
        "llama": lambda: LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, **small)),
        "gemma": lambda: GemmaForCausalLM(GemmaConfig(num_key_value_heads=2, head_dim=8, **small)),
    }
    for name, build in builders.items():
        torch.manual_seed(0)
        model = build().eval()
        _randomize_norms(model, weight_offset=name == "gemma")
        norms = [m for m in model.modules() if "Norm" in type(m).__name__]
        identity = 0.0 if name == "gemma" else 1.0
        assert norms and all(not torch.any(m.weight == identity) for m in norms)
        biases = [m.bias for m in norms if getattr(m, "bias", None) is not None]
        assert all(not torch.any(bias == 0) for bias in biases)
        model.save_pretrained(directory / name)


def run_tree(tag: str, workdir: Path, models: Path) -> Path:
    """Export the tag's transformer_lens/ and run the grid on it in a fresh interpreter."""
    export = workdir / tag.replace("/", "-")
    export.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(FORK), "archive", tag, "transformer_lens"],
        check=True,
        capture_output=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(export)
    out = workdir / f"{export.name}.pt"
    env = dict(os.environ, PYTHONPATH=str(export), OMP_NUM_THREADS="1")
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    env.update(TRANSFORMERS_VERBOSITY="error")
    done = subprocess.run(
        [sys.executable, str(DRIVER), str(models), str(export), str(out)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, f"{tag}: the grid failed\n{done.stdout}\n{done.stderr[-4000:]}"
    return out


def same(pristine: Any, other: Any) -> bool:
    """Equal labels and plain values; tensors of one dtype and shape, ``torch.equal``."""
    if isinstance(pristine, torch.Tensor):
        if not isinstance(other, torch.Tensor):
            return False
        if pristine.dtype != other.dtype or pristine.shape != other.shape:
            return False
        if torch.equal(pristine, other):
            return True
        if not pristine.is_floating_point():
            return False
        nan = pristine.isnan()
        return torch.equal(nan, other.isnan()) and torch.equal(pristine[~nan], other[~nan])
    if isinstance(pristine, dict):
        if not isinstance(other, dict):
            return False
        # A dataclass a PR gives new fields (LogitReadout in PR 3) answers with pristine's fields.
        keys_match = (
            pristine.keys() <= other.keys()
            if "__class__" in pristine
            else pristine.keys() == other.keys()
        )
        return keys_match and all(same(pristine[key], other[key]) for key in pristine)
    if isinstance(pristine, list):
        return (
            isinstance(other, list)
            and len(pristine) == len(other)
            and all(same(a, b) for a, b in zip(pristine, other))
        )
    return type(pristine) is type(other) and pristine == other


@dataclass
class Verdict:
    tag: str
    compared: int = 0
    answered: int = 0
    identical: int = 0
    raised_on_pristine: int = 0
    differing: List[str] = field(default_factory=list)
    new_warnings: List[str] = field(default_factory=list)
    reused_from: Optional[str] = None
    changed_as_listed: List[str] = field(default_factory=list)

    def lines(self, limit: Optional[int] = None) -> List[str]:
        """The counts, then the differing calls and new warnings (the first ``limit`` of each)."""
        source = f" (transformer_lens/ identical to {self.reused_from}'s: not re-run, its answers)"
        out = [
            f"{self.tag}{source if self.reused_from else ''}: {self.compared} calls compared, "
            f"{self.answered} answered by pristine, {self.identical} identical, "
            f"{len(self.differing)} differing, {len(self.changed_as_listed)} changed as listed, "
            f"{self.raised_on_pristine} raised on pristine, "
            f"{len(self.new_warnings)} with new warnings"
        ]
        sections = (
            ("DIFFERS", self.differing),
            ("NEW WARNING", self.new_warnings),
            ("CHANGED AS LISTED", self.changed_as_listed),
        )
        for title, items in sections:
            shown = limit if title != "CHANGED AS LISTED" or limit is None else min(limit, 3)
            if items:
                out.append(f"  {title} by call: {dict(Counter(map(call_name, items)))}")
            out += [f"    {title} {line}" for line in items[:shown]]
            if shown is not None and len(items) > shown:
                out.append(f"    ... {len(items) - shown} more in {REPORT.relative_to(ROOT)}")
        return out


def call_name(line: str) -> str:
    """``accumulated_resid`` from ``gpt2/float32/raw [normal] accumulated_resid(layer=...``."""
    return line.split("] ", 1)[-1].split("(", 1)[0].split("[", 1)[0]


def allowed(warning: str) -> bool:
    return any(pattern in warning for pattern, _ in ALLOWED_NEW_WARNINGS)


def listed_change(tag: str, key: str) -> bool:
    """Whether the PR at ``tag``, or one stacked below it, lists this call's change."""
    names = [pr.name for pr in PULL_REQUESTS]
    below = names[: names.index(tag.split("/", 1)[1]) + 1]
    return any(pr in below and re.search(pattern, key) for pr, pattern, _ in ALLOWED_CHANGES)


def judge(tag: str, pristine: Dict[str, Any], answers: Dict[str, Any]) -> Verdict:
    verdict = Verdict(tag, compared=len(pristine))
    for key, expected in pristine.items():
        if "raised" in expected:
            verdict.raised_on_pristine += 1
            continue
        verdict.answered += 1
        got = answers.get(key)
        if got is None or "raised" in got:
            reason = got["raised"] if got else "call missing"
            verdict.differing.append(f"{key}: raises {reason}")
        elif not same(expected["value"], got["value"]):
            line = f"{key}: {describe(expected['value'], got['value'])}"
            if listed_change(tag, key):
                verdict.changed_as_listed.append(line)
            else:
                verdict.differing.append(line)
        else:
            verdict.identical += 1
        fresh = [w for w in (got or {}).get("warnings", []) if w not in expected["warnings"]]
        if fresh:
            tag_ = "" if all(allowed(w) for w in fresh) else "NOT ALLOWED "
            verdict.new_warnings.append(f"{tag_}{key}: {fresh}")
    return verdict


def describe(expected: Any, got: Any) -> str:
    """Where two answers part: the first differing tensor's dtype, shape or largest gap."""
    if isinstance(expected, torch.Tensor) and isinstance(got, torch.Tensor):
        if expected.dtype != got.dtype or expected.shape != got.shape:
            return f"{expected.dtype}{list(expected.shape)} vs {got.dtype}{list(got.shape)}"
        gap = (expected.double() - got.double()).abs().nan_to_num(float("inf")).max().item()
        return f"max |diff| {gap:.3g}"
    if isinstance(expected, dict) and isinstance(got, dict) and expected.keys() <= got.keys():
        for key in expected:
            if not same(expected[key], got[key]):
                return f"{key}: {describe(expected[key], got[key])}"
    if isinstance(expected, list) and isinstance(got, list) and len(expected) == len(got):
        for index, (a, b) in enumerate(zip(expected, got)):
            if not same(a, b):
                return f"[{index}]: {describe(a, b)}"
    return f"{str(expected)[:80]} vs {str(got)[:80]}"


def load(path: Path) -> Dict[str, Any]:
    """A tree's answers, its file deleted (about 90 MB each; pytest keeps its last three runs)."""
    answers = torch.load(path, weights_only=False)
    path.unlink()
    return answers


def test_every_pr_answers_what_4_3_0_answers(tmp_path) -> None:
    start = time.monotonic()
    ordered = trees()
    models = tmp_path / "models"
    save_models(models)
    # A tree whose transformer_lens/ equals the previous tree's is not run again.
    to_run = [tag for i, (tag, tree) in enumerate(ordered) if i == 0 or tree != ordered[i - 1][1]]
    with ThreadPoolExecutor(max_workers=2) as pool:  # this machine's two cores
        outputs = dict(zip(to_run, pool.map(lambda tag: run_tree(tag, tmp_path, models), to_run)))
    pristine = load(outputs["upstream"])
    verdicts: List[Verdict] = []
    last_run, answers = "upstream", pristine
    for tag, _ in ordered[1:]:
        if tag in outputs:
            last_run, answers = tag, load(outputs[tag])
        verdict = judge(tag, pristine, answers)
        verdict.reused_from = None if tag == last_run else last_run
        verdicts.append(verdict)
    title = "Differential grid, each PR's tree against pristine 4.3.0 (tag upstream)"
    title += f", {len(to_run)} trees run in {time.monotonic() - start:.0f} s:"
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text("\n".join([title] + [line for v in verdicts for line in v.lines()]) + "\n")
    summary = "\n".join([title] + [line for v in verdicts for line in v.lines(limit=20)])
    print(summary)
    failures = sum(
        len(v.differing) + sum(w.startswith("NOT ALLOWED") for w in v.new_warnings)
        for v in verdicts
    )
    counts = [line for verdict in verdicts for line in verdict.lines(limit=0)]
    assert (
        failures == 0
    ), f"{failures} regressions (the summary above; all in {REPORT}):\n" + "\n".join(counts)
