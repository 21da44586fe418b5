#!/usr/bin/env python3
"""Exports the pull request as a `git format-patch` series against upstream's layout, and checks it.

Subcommands:
    export   write dist/pr/: the series, DESCRIPTION.md, LEFT_OUT.md, DOCS_INDEX.md, figures/
    check    apply dist/pr/*.patch with `git am` to a fresh pristine release and run the tests the
             series adds against that tree (not build/fork), writing dist/pr/CHECK.md

The series is built on the pristine sdist (`tools/fork.sh pristine`), which holds every upstream file
our patches touch; the files we add are new, so the same series applies to upstream's git tree at
the release tag. Dates, identity and git configuration are fixed so that a rerun gives the same
bytes for the same inputs.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "dist" / "pr"
WORK = ROOT / "build" / "pr" / "series"
CHECK_DIR = ROOT / "build" / "pr-check"
FIGURES_SRC = ROOT / "docs" / "source" / "_static" / "logit_lens"
BENCHMARK_RESULTS = ROOT / "benchmarks" / "RESULTS.md"
DESCRIPTION_TEMPLATE = ROOT / "tools" / "pr_description.md.in"
IDENTITY = ("transformer-lens fork build", "fork-build@localhost")

# Groups of added files, in series order, with the commit message of each. The package files come
# before patches/ (see `build_series`) so that every commit of the series imports.
GROUPS: dict[str, tuple[tuple[str, ...], str]] = {
    "package": (
        ("transformer_lens/",),
        "Add the helpers behind ActivationCache's recompute_ln\n\n"
        "New modules that the ActivationCache changes in the next commit build on. Nothing\n"
        "imports them yet, so on their own they change no existing behaviour.",
    ),
    "tests": (
        ("tests/",),
        "Test fresh normalization against the models' own norm modules\n\n"
        "Tests of recompute_ln and the code around it. Ground truth is independent of the\n"
        "new code: the norm modules themselves, and Hugging Face models (built offline with\n"
        "random weights, converted by TransformerLens's own weight converters) whose final\n"
        "norm and unembedding are applied to their own residuals. The cached path is checked\n"
        "against the old formula, computed separately, so existing results stay bit-for-bit.",
    ),
    "docs": (
        ("docs/source/content/", "docs/source/_static/"),
        "Docs: the logit lens and direct logit attribution, side by side\n\n"
        "A page for researchers who reach for apply_ln=True: which question each\n"
        "normalization answers, why the cached scale acts as a softmax temperature on early\n"
        "layers, runnable recipes for both with recompute_ln, and a migration note.\n\n"
        "docs/source/index.md needs one toctree line for the page (see the PR description).",
    ),
    "demo": (
        ("demos/",),
        "Demo: the logit lens with fresh normalization against the cached scale\n\n"
        "Per layer, for a prompt: top tokens and probabilities, entropy, and KL to the final\n"
        "layer, with both normalizations, as a table and as plots.",
    ),
}
ADDED_PREFIXES = tuple(p for prefixes, _ in GROUPS.values() for p in prefixes)

# Why each repository-only path stays out of the series (first matching prefix wins).
LEFT_OUT_REASONS: list[tuple[str, str]] = [
    ("patches/", "exported as commits of the series, not as files"),
    ("docs-shim/", "our minimal Sphinx configuration; upstream builds docs with its own conf.py"),
    ("docs/", "only docs/source/content/ (and figures the pages use) is upstream's docs layout"),
    ("Makefile", "our build; upstream has its own makefile"),
    ("mk/", "make fragments of our build"),
    ("requirements/", "pinned virtualenv of this repository; upstream pins with poetry"),
    ("pytest.ini", "mirrors upstream's pytest options from its pyproject.toml"),
    ("tools/", "fork, patch and export tooling of this repository"),
    (".ci/", "our CI entry point"),
    (".github/", "our CI; upstream has its own workflows (checks.yml)"),
    ("upstream.env", "pin of the upstream release this repository builds on"),
    (
        "reference_model/",
        "shipped trained weights, tokenizer and training script: a binary fixture upstream would "
        "not take in the package repository",
    ),
    ("benchmarks/", "benchmark script; its results are quoted in DESCRIPTION.md"),
    ("examples/", "the README's offline quickstart of this repository"),
    ("README.md", "this repository's README (the PR text is DESCRIPTION.md)"),
    ("docs-maintainers.md", "this repository's maintainer notes"),
    (".gitignore", "this repository's ignore rules"),
]

# A file under an upstream path that mentions one of these serves only our build: left out.
BUILD_ONLY_MARKERS = re.compile(r"docs-shim|build/fork|upstream\.env|\bmk/|tools/fork\.sh")
# A file that imports one of these is exported but needs a repository-only module: warned about.
REPO_ONLY_IMPORTS = re.compile(r"^\s*(?:from|import)\s+(reference_model|benchmarks)\b", re.M)


@dataclass
class Plan:
    groups: dict[str, list[str]] = field(default_factory=dict)
    left_out: list[tuple[str, str]] = field(default_factory=list)
    needs_repo_only: dict[str, list[str]] = field(default_factory=dict)


def run(*args: str | Path, cwd: Path = ROOT, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, check=True, capture_output=True, text=True
    )
    return result.stdout


def git_env(date: str) -> dict[str, str]:
    """An environment in which git ignores user configuration and commits reproducibly."""
    env = dict(os.environ)
    env.update(
        GIT_CONFIG_GLOBAL=os.devnull,
        GIT_CONFIG_NOSYSTEM="1",
        GIT_AUTHOR_NAME=IDENTITY[0],
        GIT_AUTHOR_EMAIL=IDENTITY[1],
        GIT_COMMITTER_NAME=IDENTITY[0],
        GIT_COMMITTER_EMAIL=IDENTITY[1],
        GIT_AUTHOR_DATE=date,
        GIT_COMMITTER_DATE=date,
    )
    return env


def repo_files() -> list[str]:
    """Files of this repository, committed or not (ignored ones excluded), that exist on disk."""
    listed = run("git", "ls-files", "--cached", "--others", "--exclude-standard").splitlines()
    return sorted(f for f in set(listed) if (ROOT / f).is_file())


def patch_files() -> list[Path]:
    return sorted((ROOT / "patches").glob("*.patch"))


def series_date() -> str:
    """The latest Date: of patches/, so added-file commits get a date fixed by the inputs."""
    dates = [
        line[len("Date: ") :]
        for patch in patch_files()
        for line in patch.read_text().splitlines()[:6]
        if line.startswith("Date: ")
    ]
    if not dates:
        return "Thu, 1 Jan 2026 00:00:00 +0000"
    return max(dates, key=lambda d: run("date", "-u", "-d", d, "+%s").strip())


def referenced_by_docs(path: str, docs_pages: list[str]) -> bool:
    """Whether a docs/source/_static file is used by one of the exported docs pages."""
    relative = path[len("docs/source/_static/") :]
    return any(relative in (ROOT / page).read_text(errors="replace") for page in docs_pages)


def plan_series() -> Plan:
    plan = Plan(groups={name: [] for name in GROUPS})
    files = repo_files()
    docs_pages = [
        f for f in files if f.startswith("docs/source/content/") and f.endswith((".md", ".rst"))
    ]
    for path in files:
        group = next((g for g, (pfx, _) in GROUPS.items() if path.startswith(pfx)), None)
        if group is None:
            reason = next((r for p, r in LEFT_OUT_REASONS if path.startswith(p)), None)
            plan.left_out.append((path, reason or "not under an upstream path the PR adds to"))
            continue
        text = (ROOT / path).read_text(errors="replace")
        marker = BUILD_ONLY_MARKERS.search(text)
        if path.startswith("docs/source/_static/") and not referenced_by_docs(path, docs_pages):
            plan.left_out.append((path, "figure or asset that no exported docs page references"))
        elif marker:
            plan.left_out.append((path, f"serves only our build (mentions `{marker.group(0)}`)"))
        else:
            plan.groups[group].append(path)
            for module in sorted(set(REPO_ONLY_IMPORTS.findall(text))):
                plan.needs_repo_only.setdefault(module, []).append(path)
    return plan


def copy_into(tree: Path, path: str) -> None:
    target = tree / path
    if target.exists() or target.is_symlink():
        sys.exit(f"export_pr: {path} exists in the pristine release: change it with a patch")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ROOT / path, target)
    shutil.copymode(ROOT / path, target)


def commit_group(tree: Path, name: str, paths: list[str], env: dict[str, str]) -> None:
    for path in paths:
        copy_into(tree, path)
    run("git", "add", "--", *paths, cwd=tree, env=env)
    message = GROUPS[name][1] + "\n\nFiles:\n" + "".join(f"  {p}\n" for p in paths)
    run("git", "commit", "--quiet", "--no-verify", "-m", message, cwd=tree, env=env)


def build_series(plan: Plan) -> list[Path]:
    """Commits package files, patches/, then tests, docs and demo on a pristine tree; exports them."""
    env = git_env(series_date())
    run("tools/fork.sh", "pristine", WORK)
    if plan.groups["package"]:
        commit_group(WORK, "package", plan.groups["package"], env)
    for patch in patch_files():
        run("git", "am", "--quiet", "--committer-date-is-author-date", patch, cwd=WORK, env=env)
    for name in ("tests", "docs", "demo"):
        if plan.groups[name]:
            commit_group(WORK, name, plan.groups[name], env)
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    run(
        "git", "format-patch", "--quiet", "--zero-commit", "--no-signature", "--full-index",
        "--output-directory", OUT, "upstream..HEAD", cwd=WORK, env=env,
    )  # fmt: skip
    return sorted(OUT.glob("*.patch"))


def series_digest(patches: list[Path]) -> str:
    digest = hashlib.sha256()
    for patch in patches:
        digest.update(patch.name.encode() + b"\0" + patch.read_bytes())
    return digest.hexdigest()


def subject_of(patch: Path) -> str:
    match = re.search(r"^Subject: \[PATCH[^\]]*\] (.*(?:\n .*)*)", patch.read_text(), re.M)
    return " ".join(match.group(1).split()) if match else patch.name


def copy_figures() -> list[str]:
    figures = sorted(FIGURES_SRC.rglob("*.png")) if FIGURES_SRC.is_dir() else []
    if figures:
        (OUT / "figures").mkdir()
    for figure in figures:
        shutil.copyfile(figure, OUT / "figures" / figure.name)
    return [f.name for f in figures]


def docs_index_lines(plan: Plan) -> list[str]:
    return [
        "content/" + Path(p).relative_to("docs/source/content").with_suffix("").as_posix()
        for p in plan.groups["docs"]
        if p.startswith("docs/source/content/") and p.endswith((".md", ".rst"))
    ]


def benchmark_table() -> str:
    if not BENCHMARK_RESULTS.is_file():
        return "_No benchmark results yet: `benchmarks/RESULTS.md` does not exist._"
    return BENCHMARK_RESULTS.read_text().strip()


def tick(done: bool) -> str:
    return "[x]" if done else "[ ]"


def write_docs_index(lines: list[str]) -> str:
    """DOCS_INDEX.md: the toctree lines that must be added to upstream's docs/source/index.md."""
    if not lines:
        text = "No docs page in the series: docs/source/index.md needs no change.\n"
    else:
        text = (
            "# docs/source/index.md: one manual edit\n\n"
            "Upstream's `docs/source/index.md` is not in the sdist this series is built on, so the\n"
            "series cannot patch it with real context lines. Add this line to the toctree that lists\n"
            "`content/special_cases` (under it) and commit it with the docs page:\n\n"
            "```\n" + "\n".join(lines) + "\n```\n"
        )
    (OUT / "DOCS_INDEX.md").write_text(text)
    return text


def upstream_version() -> str:
    match = re.search(r"^UPSTREAM_VERSION=(\S+)", (ROOT / "upstream.env").read_text(), re.M)
    return match.group(1) if match else "?"


def write_left_out(plan: Plan) -> None:
    lines = [
        "# Left out of the pull request\n",
        "Files of this repository that the series does not contain, and why. Everything else under",
        "`transformer_lens/`, `tests/`, `docs/source/content/`, `docs/source/_static/` (figures the",
        "pages use) and `demos/` is in the series. No CHANGELOG entry: upstream keeps no",
        f"CHANGELOG.md at v{upstream_version()} as far as we know (the release sdist has none).\n",
        "| path | why |",
        "| --- | --- |",
    ]
    rows: dict[str, tuple[list[str], str]] = {}
    for path, reason in plan.left_out:
        prefix = next((p for p, r in LEFT_OUT_REASONS if path.startswith(p) and r == reason), "")
        key = prefix if prefix.endswith("/") else path
        rows.setdefault(key, ([], reason))[0].append(path)
    for key, (paths, reason) in rows.items():
        listed = "" if paths == [key] else " (" + ", ".join(f"`{p}`" for p in paths) + ")"
        lines.append(f"| `{key}`{listed} | {reason} |")
    if plan.needs_repo_only:
        lines += [
            "\n## Exported, but importing a module that stays in this repository\n",
            "These files are in the series yet import a module the series leaves out, so upstream",
            "would need that module (or the files adapted) before they run there. `make pr-check`",
            "puts only these modules on PYTHONPATH, after the applied tree.\n",
        ]
        for module, paths in sorted(plan.needs_repo_only.items()):
            lines += [f"- `{module}`: " + ", ".join(f"`{p}`" for p in paths)]
    (OUT / "LEFT_OUT.md").write_text("\n".join(lines) + "\n")


def fill_description(plan: Plan, patches: list[Path], figures: list[str], index: list[str]) -> None:
    series = "\n".join(f"{i}. `{p.name}`: {subject_of(p)}" for i, p in enumerate(patches, 1))
    if figures:
        figure_text = "\n\n".join(f"![{name}](figures/{name})" for name in figures)
        figure_text = (
            "Files in `dist/pr/figures/` (attach them when opening the PR), from the demo:\n\n"
            + figure_text
        )
    else:
        figure_text = (
            "_No figures yet: nothing under `docs/source/_static/logit_lens/`. The demo writes them;"
            " rerun `make pr` after it has run._"
        )
    tests_touched = any(
        re.search(r"^diff --git a/tests/", p.read_text(), re.M) for p in patch_files()
    )
    repo_only = "".join(
        f"\n- `{m}` is used by {', '.join(f'`{p}`' for p in ps)} but is not in this PR"
        " (see LEFT_OUT.md)."
        for m, ps in sorted(plan.needs_repo_only.items())
    )
    values = {
        "UPSTREAM_VERSION": upstream_version(),
        "SERIES": series,
        "FIGURES": figure_text,
        "BENCHMARK": benchmark_table(),
        "DOCS_INDEX": ", ".join(f"`{line}`" for line in index) or "none (no docs page yet)",
        "TICK_DOCS": tick(bool(plan.groups["docs"])),
        "TICK_TESTS": tick(bool(plan.groups["tests"])),
        "TICK_NOT_REWRITTEN": tick(not tests_touched),
        "REPO_ONLY": repo_only or "\n- None.",
    }
    text = DESCRIPTION_TEMPLATE.read_text()
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    leftover = re.findall(r"@[A-Z_]+@", text)
    if leftover:
        sys.exit(f"export_pr: unfilled placeholders in {DESCRIPTION_TEMPLATE.name}: {leftover}")
    (OUT / "DESCRIPTION.md").write_text(text)


def export() -> None:
    plan = plan_series()
    patches = build_series(plan)
    figures = copy_figures()
    index = docs_index_lines(plan)
    write_docs_index(index)
    write_left_out(plan)
    fill_description(plan, patches, figures, index)
    (OUT / "SHA256SUMS").write_text(
        "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n" for p in patches)
    )
    print(f"dist/pr: {len(patches)} patches (series sha256 {series_digest(patches)[:16]})")
    for patch in patches:
        print(f"  {patch.name}")
    print(f"  figures: {len(figures)}; left out: {len(plan.left_out)} files (LEFT_OUT.md)")
    for module, paths in sorted(plan.needs_repo_only.items()):
        print(f"  warning: {len(paths)} exported file(s) import repo-only `{module}`")


GUARD_PLUGIN = '''\
"""pytest plugin of `make pr-check`: fails the run unless transformer_lens came from the tree."""
import os
import sys

import pytest


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    import transformer_lens  # already imported by the tests; imported here if none did

    where = os.path.realpath(transformer_lens.__file__)
    print(f"\\npr-check: transformer_lens imported from {where}")
    if not where.startswith(os.environ["PR_CHECK_TREE"] + os.sep):
        print("pr-check: NOT the applied tree", file=sys.stderr)
        session.exitstatus = 1
'''


def check(python: str, doctests: list[str]) -> None:
    patches = sorted(OUT.glob("*.patch"))
    if not patches:
        sys.exit("export_pr: no dist/pr/*.patch: run `make pr` first")
    tree = CHECK_DIR / "tree"
    env = git_env(series_date())
    run("tools/fork.sh", "pristine", tree)
    am = subprocess.run(
        ["git", "am", "--committer-date-is-author-date", *map(str, patches)],
        cwd=tree, env=env, capture_output=True, text=True,
    )  # fmt: skip
    if am.returncode:
        sys.exit(f"pr-check: git am failed on the pristine release:\n{am.stdout}{am.stderr}")
    print(f"pr-check: {len(patches)} patches applied with git am to a pristine release in {tree}")
    if subprocess.run(["tools/fork.sh", "patches-check"], capture_output=True).returncode:
        print("pr-check: note: build/fork holds edits that patches/ lacks (make patches-check);"
              " this check tests patches/ as exported, not build/fork")  # fmt: skip

    # Only the modules that LEFT_OUT.md names go on the path, after the tree, from a separate dir.
    extra = CHECK_DIR / "path"
    shutil.rmtree(extra, ignore_errors=True)
    extra.mkdir(parents=True)
    (extra / "pr_check_guard.py").write_text(GUARD_PLUGIN)
    for module in sorted(plan_series().needs_repo_only):
        (extra / module).symlink_to(ROOT / module)
        print(f"pr-check: exposing repo-only `{module}` (see dist/pr/LEFT_OUT.md)")
    test_env = dict(
        os.environ, PYTHONPATH=f"{tree}{os.pathsep}{extra}", PR_CHECK_TREE=os.path.realpath(tree)
    )
    test_env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    where = run(python, "-c", "import transformer_lens; print(transformer_lens.__file__)",
                cwd=tree, env=test_env).strip()  # fmt: skip
    print(f"pr-check: python -c 'import transformer_lens' -> {where}")
    if not os.path.realpath(where).startswith(os.path.realpath(tree) + os.sep):
        sys.exit("pr-check: transformer_lens does not come from the applied tree")

    targets = (["tests"] if (tree / "tests").is_dir() else []) + [
        d for d in doctests if (tree / d.split("::")[0]).exists()
    ]
    command = [
        python, "-m", "pytest", "-c", str(ROOT / "pytest.ini"), "--rootdir", str(tree),
        "-p", "no:cacheprovider", "-p", "pr_check_guard", "--doctest-modules", *targets,
    ]  # fmt: skip
    print("pr-check: (cd " + str(tree) + " && " + " ".join(command) + ")", flush=True)
    output = []
    with subprocess.Popen(
        command, cwd=tree, env=test_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as pytest_run:
        assert pytest_run.stdout is not None
        for line in pytest_run.stdout:
            sys.stdout.write(line)
            output.append(line.rstrip("\n"))
    returncode = pytest_run.returncode
    summary = next(
        (line.strip("= ") for line in reversed(output) if line.startswith("=") and " in " in line),
        "no summary",
    )
    (OUT / "CHECK.md").write_text(
        "# make pr-check\n\n"
        f"- series sha256: `{series_digest(patches)}` ({len(patches)} patches)\n"
        "- applied with `git am` to a pristine upstream release (`tools/fork.sh pristine`)\n"
        f"- transformer_lens imported from: `{os.path.relpath(where, ROOT)}`\n"
        f"- pytest targets: {' '.join(f'`{t}`' for t in targets)}\n"
        f"- result (exit {returncode}): {summary}\n"
    )
    if returncode:
        sys.exit(f"pr-check: tests failed on the applied tree (exit {returncode})")
    print("pr-check: the series applies to the pristine release and its tests pass")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("export")
    check_parser = sub.add_parser("check")
    check_parser.add_argument("--python", default=str(ROOT / ".venv" / "bin" / "python"))
    check_parser.add_argument("doctests", nargs="*", help="doctest targets, tree-relative")
    args = parser.parse_args()
    os.chdir(ROOT)
    if args.command == "export":
        export()
    else:
        check(args.python, args.doctests)


if __name__ == "__main__":
    main()
