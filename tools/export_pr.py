#!/usr/bin/env python3
"""Exports the two pull requests as `git format-patch` series against TransformerLens 4.3.0.

Subcommands:
    export   write dist/pr1/ and dist/pr2/: each series, DESCRIPTION.md (upstream's PR template,
             filled from tools/prN_description.md.in, with the series' size), LEFT_OUT.md
    check    apply dist/pr1 with `git am` to a fresh pristine release (never build/fork) and run
             the tests it adds plus upstream's tests of the code it touches; then apply dist/pr2 on
             top and do the same for it. Writes dist/prN/CHECK.md.

A series is: the PR's edits to upstream files (patches/prN/, one commit per file), then one commit
each for the groups of files the PR adds (tests, docs, demo). The second PR is stacked on the first.
Identity, dates and git configuration are fixed, so a rerun gives the same bytes.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from series import ENV  # noqa: E402  (fixed git identity and dates, shared with patches/)

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "build" / "pr" / "series"
CHECK_TREE = ROOT / "build" / "pr-check" / "tree"


@dataclass(frozen=True)
class Group:
    """Files a PR adds, committed together."""

    paths: tuple[str, ...]
    message: str
    # Upstream files whose patch belongs in this commit rather than before it (the toctree line
    # goes with the page it lists, so that every commit of the series builds its docs).
    edits: tuple[str, ...] = ()


@dataclass(frozen=True)
class PullRequest:
    name: str
    title: str
    groups: tuple[Group, ...]
    # Upstream's tests of the code the PR touches, run on the patched pristine tree by `check`.
    upstream_tests: tuple[str, ...]


PR1 = PullRequest(
    "pr1",
    "Fresh normalization at every norm target, hook-free (extends #1180)",
    (
        Group(
            (
                "tests/unit/test_activation_cache_recompute_ln.py",
                "tests/unit/model_bridge/generalized_components/test_normalize_without_hooks.py",
                "tests/integration/test_recompute_ln_hf_ground_truth.py",
                "tests/acceptance/test_recompute_ln_pretrained.py",
            ),
            "Test recompute_ln against Hugging Face's own norm modules\n\n"
            "Ground truth is independent of the new code: Hugging Face's norm modules applied\n"
            "to Hugging Face's own pre-norm residuals, on GPT-2, GPT-NeoX, Llama and Gemma\n"
            "built from configs with randomized norm weights and a residual that grows with\n"
            "depth, raw and compatibility mode, float32 and bfloat16. Unit tests pin the\n"
            "default to 4.3.0's results, count hooks, and check the cache is untouched.\n"
            "gpt2 and pythia-70m run where their weights are cached and skip otherwise.",
        ),
        Group(
            (
                "docs/source/content/logit_lens.md",
                "docs/source/_static/logit_lens/entropy_per_layer.svg",
                "docs/source/_static/logit_lens/kl_to_final_per_layer.svg",
                "docs/source/_static/logit_lens/temperature_per_layer.svg",
                "tests/unit/test_logit_lens_docs_page.py",
            ),
            "Docs: the logit lens and direct logit attribution, side by side\n\n"
            "Which question each normalization answers, why the cached scale acts as a\n"
            "softmax temperature on early layers, recipes on TransformerBridge (run by the\n"
            "test suite with their output checked) and a migration note per release line.",
            edits=("docs/source/index.md",),
        ),
        Group(
            ("demos/Logit_Lens_Demo.ipynb", "demos/logit_lens_demo.py"),
            "Demo: the logit lens with fresh normalization, notebook and script\n\n"
            "The notebook is self-contained and Colab-ready (pretrained GPT-2 there, a small\n"
            "model built from a config offline) and committed with outputs for nbval. The\n"
            "script averages the lens over many windows of a text file and draws the docs\n"
            "page's figures; its arguments are validated and it writes where it is told.",
        ),
    ),
    (
        "tests/unit/test_activation_cache.py",
        "tests/unit/test_activation_cache_batch_dim.py",
        "tests/unit/model_bridge/test_mixed_norm_decomposition.py",
        "tests/unit/model_bridge/generalized_components/test_normalization_bridge.py",
        "tests/unit/model_bridge/generalized_components/test_normalization_hook_semantics.py",
        "tests/unit/model_bridge/generalized_components/test_layernorm_weight_offset.py",
        "tests/unit/tools/test_logit_lens.py",
        "tests/integration/test_logit_lens.py",
    ),
)
PR2 = PullRequest(
    "pr2",
    "Logit lens: KL to the final layer, target probability, bounded memory",
    (
        Group(
            ("tests/unit/tools/test_logit_lens_statistics.py",),
            "Test the logit-lens statistics against the naive full computation\n\n"
            "log_softmax of the materialized logits is the reference: soft-capped and\n"
            "bfloat16 models, odd chunk sizes, a vocabulary not divisible by the chunk.",
        ),
    ),
    ("tests/unit/tools/test_logit_lens.py", "tests/integration/test_logit_lens.py"),
)
PULL_REQUESTS = (PR1, PR2)


def run(*args: str, cwd: Path, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, **ENV, **kwargs.pop("env", {})}
    return subprocess.run(
        args, cwd=cwd, env=env, check=check, text=True, capture_output=True, **kwargs
    )


def git(tree: Path, *args: str) -> str:
    return run("git", *args, cwd=tree).stdout


def pristine(tree: Path) -> None:
    subprocess.run([str(ROOT / "tools" / "fork.sh"), "pristine", str(tree)], cwd=ROOT, check=True)


def added_files(pr: PullRequest, group: Group) -> list[str]:
    listed = git(ROOT, "ls-files", "--cached", "--others", "--exclude-standard", "--", *group.paths)
    return sorted(listed.split())


def commit_pr(tree: Path, pr: PullRequest) -> None:
    """Apply the PR's patches to tree, then commit each group of the files it adds."""
    with_group = {path: group for group in pr.groups for path in group.edits}
    deferred: dict[Group, list[Path]] = {}
    for patch in sorted((ROOT / "patches" / pr.name).glob("*.patch")):
        edited = re.findall(r"^diff --git a/(\S+) b/", patch.read_text(), re.M)
        if edited and edited[0] in with_group:
            deferred.setdefault(with_group[edited[0]], []).append(patch)
        else:
            git(tree, "am", "--quiet", "--committer-date-is-author-date", str(patch))
    for group in pr.groups:
        files = added_files(pr, group)
        for patch in deferred.get(group, []):
            git(tree, "apply", "--index", str(patch))
        if not files and group not in deferred:
            continue
        for path in files:
            target = tree / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes((ROOT / path).read_bytes())
        git(tree, "add", "--", *files)
        git(tree, "commit", "--quiet", "-m", group.message)


def description(pr: PullRequest, base: str, tree: Path, patches: list[Path]) -> str:
    """The PR text: the template with the series and its size filled in."""
    template = (ROOT / "tools" / f"{pr.name}_description.md.in").read_text()
    stat = git(tree, "diff", "--shortstat", base, "HEAD").strip()
    code_stat = git(tree, "diff", "--shortstat", base, "HEAD", "--", "transformer_lens").strip()
    commits = git(tree, "rev-list", "--reverse", f"{base}..HEAD").split()
    series = "\n".join(
        f"{i}. `{p.name}`: {git(tree, 'diff', '--shortstat', f'{c}~', c).strip()}"
        for i, (p, c) in enumerate(zip(patches, commits), 1)
    )
    return (
        template.replace("@SIZE@", f"{stat}; library code only: {code_stat}")
        .replace("@BENCH@", benchmark_table())
        .replace("@SERIES@", series)
        .replace("@TITLE@", pr.title)
    )


def benchmark_table() -> str:
    """The statistics benchmark's tables from benchmarks/RESULTS.md, if it has been run."""
    results = ROOT / "benchmarks" / "RESULTS.md"
    text = results.read_text() if results.exists() else ""
    match = re.search(r"^## Logit-lens statistics\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    if not match:
        return "(run `make bench` to fill this table)"
    return "\n".join(line for line in match.group(1).splitlines() if not line.startswith("- "))


def left_out() -> str:
    exported = {
        path for pr in PULL_REQUESTS for group in pr.groups for path in added_files(pr, group)
    }
    ours = git(ROOT, "ls-files", "--cached", "--others", "--exclude-standard").split()
    rest = [path for path in ours if path not in exported]
    lines = ["# Files of this repository that no pull request exports", ""]
    lines += [
        "Build, pins, repository-only checks (the trained reference model and its acceptance",
        "test), benchmarks and tooling stay here; `patches/` is exported as the edits to",
        "upstream files of each series.",
        "",
    ]
    lines += [f"- `{path}`" for path in rest]
    return "\n".join(lines) + "\n"


def export() -> None:
    tree = WORK
    pristine(tree)
    for pr in PULL_REQUESTS:
        out = ROOT / "dist" / pr.name
        if out.exists():
            for old in out.iterdir():
                old.unlink()
        out.mkdir(parents=True, exist_ok=True)
        start = git(tree, "rev-parse", "HEAD").strip()
        commit_pr(tree, pr)
        git(
            tree,
            "format-patch",
            "--quiet",
            "--zero-commit",
            "--no-signature",
            "--output-directory",
            str(out),
            f"{start}..HEAD",
        )
        patches = sorted(out.glob("*.patch"))
        (out / "DESCRIPTION.md").write_text(description(pr, start, tree, patches))
        (out / "LEFT_OUT.md").write_text(left_out())
        print(f"dist/{pr.name}: {len(patches)} patches, {git(tree, 'diff', '--shortstat', start)}")


def check(python: str) -> int:
    """Apply each series to a fresh pristine tree; run its tests and upstream's there."""
    tree = CHECK_TREE
    pristine(tree)
    pristine_tree = ROOT / "build" / "pristine"
    if not (pristine_tree / ".git").exists():
        pristine(pristine_tree)
    status = 0
    for pr in PULL_REQUESTS:
        out = ROOT / "dist" / pr.name
        for patch in sorted(out.glob("*.patch")):
            git(tree, "am", "--quiet", str(patch))
        on = "pristine 4.3.0" + (" + pr1" if pr is PR2 else "")
        ours = [
            path
            for group in pr.groups
            for path in added_files(pr, group)
            if re.match(r"tests/.*\.py$", path)
        ]
        offline = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        command = [python, "-m", "pytest", "-p", "no:cacheprovider", "-q", *ours]
        result = run(*command, cwd=tree, check=False, env=offline)
        imported = run(
            python, "-c", "import transformer_lens; print(transformer_lens.__file__)", cwd=tree
        ).stdout.strip()
        tail = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else "(no output)"
        # Upstream's tests, against their outcomes on pristine 4.3.0 (some fail there already).
        compare = run(
            python,
            str(ROOT / "tools" / "compare_suites.py"),
            "--pristine",
            str(pristine_tree),
            "--fork",
            str(tree),
            "--report-dir",
            str(ROOT / "build" / "pr-check" / pr.name),
            "-m",
            "not slow",
            *pr.upstream_tests,
            cwd=ROOT,
            check=False,
        )
        report = (
            f"# {pr.name}: applied with `git am` to {on}\n\n"
            f"transformer_lens imported from: {imported}\n\n"
            f"The tests this series adds: `pytest {' '.join(ours)}`\n\n{tail}\n\n"
            f"Upstream's tests of the code it touches, against pristine 4.3.0:\n\n"
            f"```\n{compare.stdout.strip()}\n```\n"
        )
        (out / "CHECK.md").write_text(report)
        print(f"{pr.name} on {on}: its tests: {tail}")
        print(compare.stdout.strip())
        if result.returncode != 0:
            print(result.stdout[-4000:])
            status = 1
        if compare.returncode != 0:
            status = 1
    return status


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("export")
    check_parser = sub.add_parser("check")
    check_parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args()
    if args.command == "export":
        export()
        return 0
    return check(args.python)


if __name__ == "__main__":
    sys.exit(main())
