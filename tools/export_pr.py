#!/usr/bin/env python3
"""Exports the pull requests of tools/pull_requests.py as `git format-patch` series against 4.3.0.

Subcommands:
    export   write dist/<pr>/ for every PR of the manifest: its series, DESCRIPTION.md (upstream's
             PR template, filled from tools/<pr>_description.md.in, with the series' size),
             LEFT_OUT.md
    check    apply each dist/<pr> in the manifest's order with `git am` to a fresh pristine release
             (never build/fork) and run, after each, the tests it adds and upstream's tests of the
             code it touches. Writes dist/<pr>/CHECK.md.

A series is the manifest's commits of the PR, in order. Each PR is stacked on the ones before it.

Each exported commit is authored by the person exporting: PR_AUTHOR_NAME and PR_AUTHOR_EMAIL from
the environment where set, otherwise `git config user.name` and `user.email` as this repository
reads them. Where neither gives a name and an e-mail, `export` stops and says which settings to
make: upstream's history would carry whatever identity the patches have, so there is no fallback.
(patches/ keeps the build's neutral identity, which never reaches dist/.)

Each commit is dated by this repository's history: the author date of the last commit here that
changed the files it is made of (its patches in patches/<pr>/, the files it adds). That is when
the change was made, and it stays the same on a rerun, so one exporter's reruns give the same
bytes. Files with uncommitted changes have no such date: the commit is dated now, and a note says so.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pull_requests import PULL_REQUESTS, Commit, PullRequest  # noqa: E402

# The build's neutral identity, shared with patches/; dist/ commits are the exporter's.
from series import ENV  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "build" / "pr" / "series"
CHECK_TREE = ROOT / "build" / "pr-check" / "tree"


def run(*args: str, cwd: Path, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, **ENV, **kwargs.pop("env", {})}
    return subprocess.run(
        args, cwd=cwd, env=env, check=check, text=True, capture_output=True, **kwargs
    )


def git(tree: Path, *args: str) -> str:
    return run("git", *args, cwd=tree).stdout


def pristine(tree: Path) -> None:
    subprocess.run([str(ROOT / "tools" / "fork.sh"), "pristine", str(tree)], cwd=ROOT, check=True)


def added_files(paths: tuple[str, ...]) -> list[str]:
    """The files of `paths` this repository has (a PR may list a file that is not written yet)."""
    listed = git(ROOT, "ls-files", "--cached", "--others", "--exclude-standard", "--", *paths)
    return sorted(listed.split())


def patch_of(pr: PullRequest, path: str) -> Path:
    """The patch in patches/<pr>/ that edits upstream file `path`."""
    for patch in sorted((ROOT / "patches" / pr.name).glob("*.patch")):
        if re.search(rf"^diff --git a/{re.escape(path)} b/", patch.read_text(), re.M):
            return patch
    raise SystemExit(
        f"{pr.name} lists an edit of {path}, but patches/{pr.name}/ has no patch of it"
    )


AUTHOR_SETTINGS = {
    "name": ("PR_AUTHOR_NAME", "user.name"),
    "email": ("PR_AUTHOR_EMAIL", "user.email"),
}


def exporter() -> tuple[str, str]:
    """(name, e-mail) of the person exporting: PR_AUTHOR_* where set, else this repository's git
    config. Stops, naming the settings, where either is missing."""
    found = {}
    for field, (variable, key) in AUTHOR_SETTINGS.items():
        value = os.environ.get(variable, "").strip()
        if not value:
            config = subprocess.run(
                ["git", "config", key], cwd=ROOT, capture_output=True, text=True, check=False
            )
            value = config.stdout.strip()
        found[field] = value
    missing = [field for field, value in found.items() if not value]
    if missing:
        examples = {"name": "'Your Name'", "email": "you@example.org"}
        commands = "; ".join(
            f"git config {AUTHOR_SETTINGS[field][1]} {examples[field]}" for field in missing
        )
        variables = " and ".join(AUTHOR_SETTINGS[field][0] for field in missing)
        raise SystemExit(
            f"make pr: the exported patches are authored by whoever exports them (upstream's "
            f"history keeps that), and no author {' or '.join(missing)} is set: run `{commands}` "
            f"in this repository, or set {variables} in the environment (PR_AUTHOR_NAME and "
            "PR_AUTHOR_EMAIL take precedence over git's config)"
        )
    return found["name"], found["email"]


def source_files(pr: PullRequest, commit: Commit) -> list[str]:
    """The files of this repository an exported commit is made of: its patches and added files."""
    patches = [str(patch_of(pr, path).relative_to(ROOT)) for path in commit.edits]
    return patches + (added_files(commit.adds) if commit.adds else [])


def commit_date(pr: PullRequest, commit: Commit) -> str:
    """Author date of the last commit of this repository that changed the commit's files; now
    (with a note) where any of them has uncommitted changes."""
    files = source_files(pr, commit)
    dirty = git(ROOT, "status", "--porcelain", "--untracked-files=all", "--", *files)
    last = git(ROOT, "log", "-1", "--format=%aI", "--", *files).strip()
    if dirty.strip() or not last:
        changed = sorted({line[3:] for line in dirty.splitlines() if line} or set(files))
        print(
            f"note: dist/{pr.name}: a commit dated now, as files it is made of have uncommitted "
            f"changes (commit them for the date of their commit): {', '.join(changed)}"
        )
        return datetime.now(timezone.utc).replace(microsecond=0).isoformat()
    return last


def identity_env(author: tuple[str, str], date: str) -> dict[str, str]:
    """Git's environment for a commit authored and committed by `author` at `date`."""
    name, email = author
    return {
        "GIT_AUTHOR_NAME": name,
        "GIT_AUTHOR_EMAIL": email,
        "GIT_AUTHOR_DATE": date,
        "GIT_COMMITTER_NAME": name,
        "GIT_COMMITTER_EMAIL": email,
        "GIT_COMMITTER_DATE": date,
    }


def commit_one(tree: Path, pr: PullRequest, commit: Commit, author: tuple[str, str]) -> None:
    """An edits-only commit takes each patch's message; otherwise one commit with our message.
    Either way the commit is the exporter's, dated by this repository's history."""
    env = identity_env(author, commit_date(pr, commit))
    if not commit.adds:
        for path in commit.edits:
            git(tree, "am", "--quiet", str(patch_of(pr, path)))
            # `git am` takes the patch's author (the build's neutral one): make it the exporter's.
            run(
                "git",
                "commit",
                "--quiet",
                "--amend",
                "--no-edit",
                "--reset-author",
                cwd=tree,
                env=env,
            )
        return
    for path in commit.edits:
        git(tree, "apply", "--index", str(patch_of(pr, path)))
    files = added_files(commit.adds)
    for path in files:
        target = tree / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((ROOT / path).read_bytes())
    git(tree, "add", "--", *files)
    run("git", "commit", "--quiet", "-m", commit.message, cwd=tree, env=env)


def category(path: str) -> str:
    if path.startswith("transformer_lens/"):
        return "library"
    if path.startswith("tests/"):
        return "tests"
    if path.startswith(("docs/", "demos/")):
        return "docs and demos"
    return "other"


def size_by_category(tree: Path, base: str) -> str:
    changed: Counter[str] = Counter()
    for line in git(tree, "diff", "--numstat", base, "HEAD").splitlines():
        added, deleted, path = line.split("\t")
        if added != "-":
            changed[category(path)] += int(added) + int(deleted)
    return ", ".join(f"{kind} {count}" for kind, count in sorted(changed.items()))


def description(pr: PullRequest, base: str, tree: Path, patches: list[Path]) -> str:
    """The PR text: the template with the series and its size filled in."""
    template = (ROOT / pr.description_template).read_text()
    stat = git(tree, "diff", "--shortstat", base, "HEAD").strip()
    commits = git(tree, "rev-list", "--reverse", f"{base}..HEAD").split()
    series = "\n".join(
        f"{i}. `{p.name}`: {git(tree, 'diff', '--shortstat', f'{c}~', c).strip()}"
        for i, (p, c) in enumerate(zip(patches, commits), 1)
    )
    size = f"{stat}; changed lines (added + removed) by category: {size_by_category(tree, base)}"
    text = template.replace("@SIZE@", size).replace("@SERIES@", series).replace("@TITLE@", pr.title)
    # @BENCH:<section>@ is that section of benchmarks/RESULTS.md; @BENCH@ the statistics one.
    return re.sub(
        r"@BENCH(?::([^@]+))?@",
        lambda match: benchmark_table(match.group(1) or "Logit-lens statistics"),
        text,
    )


def benchmark_table(section: str) -> str:
    """A section of benchmarks/RESULTS.md without its bullet lines, if it has been run."""
    results = ROOT / "benchmarks" / "RESULTS.md"
    text = results.read_text() if results.exists() else ""
    match = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    if not match:
        return "(run `make bench` to fill this table)"
    return "\n".join(line for line in match.group(1).splitlines() if not line.startswith("- "))


def left_out() -> str:
    exported = {path for pr in PULL_REQUESTS for path in added_files(pr.adds)}
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
    author = exporter()
    tree = WORK
    pristine(tree)
    for pr in PULL_REQUESTS:
        out = ROOT / "dist" / pr.name
        if out.exists():
            for old in out.iterdir():
                old.unlink()
        out.mkdir(parents=True, exist_ok=True)
        start = git(tree, "rev-parse", "HEAD").strip()
        for commit in pr.commits:
            commit_one(tree, pr, commit, author)
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
    # Upstream's tests of every PR, once on pristine 4.3.0; each PR is compared on its own files.
    union = sorted({path for pr in PULL_REQUESTS for path in pr.upstream_tests})
    pristine_report = ROOT / "build" / "pr-check" / "pristine.xml"
    pristine_report.parent.mkdir(parents=True, exist_ok=True)
    run(
        python,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "-q",
        "--continue-on-collection-errors",
        "--junitxml",
        str(pristine_report),
        "-m",
        "not slow",
        *union,
        cwd=pristine_tree,
        check=False,
        env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )
    status = 0
    applied: list[str] = []
    for pr in PULL_REQUESTS:
        out = ROOT / "dist" / pr.name
        for patch in sorted(out.glob("*.patch")):
            git(tree, "am", "--quiet", str(patch))
        on = " + ".join(["pristine 4.3.0", *applied])
        applied.append(pr.name)
        ours = [path for path in added_files(pr.adds) if re.match(r"tests/.*\.py$", path)]
        # Acceptance tests load pretrained weights from the Hub, which upstream's CI caches and
        # this offline check cannot reach: deselected here, and said so in CHECK.md.
        acceptance = [path for path in ours if path.startswith("tests/acceptance/")]
        ours = [path for path in ours if path not in acceptance]
        offline = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        command = [python, "-m", "pytest", "-p", "no:cacheprovider", "-q", *ours]
        result = run(*command, cwd=tree, check=False, env=offline)
        imported = run(
            python, "-c", "import transformer_lens; print(transformer_lens.__file__)", cwd=tree
        ).stdout.strip()
        tail = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else "(no output)"
        # Upstream's tests, against their outcomes on pristine 4.3.0 (some fail there already).
        compare = subprocess.CompletedProcess([], 0, "no library code touched: not run", "")
        if pr.upstream_tests:
            report_dir = ROOT / "build" / "pr-check" / pr.name
            report_dir.mkdir(parents=True, exist_ok=True)
            (report_dir / "pristine.xml").write_bytes(pristine_report.read_bytes())
            compare = run(
                python,
                str(ROOT / "tools" / "compare_suites.py"),
                "--pristine",
                str(pristine_tree),
                "--fork",
                str(tree),
                "--report-dir",
                str(report_dir),
                "--reuse-pristine",
                "-m",
                "not slow",
                *pr.upstream_tests,
                cwd=ROOT,
                check=False,
            )
        deselected = (
            f"Deselected: {', '.join(acceptance)}. They load pretrained weights from the Hub, "
            "which upstream's CI caches and this offline check cannot reach.\n\n"
            if acceptance
            else ""
        )
        report = (
            f"# {pr.name}: applied with `git am` to {on}\n\n"
            f"transformer_lens imported from: {imported}\n\n"
            f"The tests this series adds: `pytest {' '.join(ours)}`\n\n{tail}\n\n{deselected}"
            f"Upstream's tests of the code it touches, against pristine 4.3.0:\n\n"
            f"```\n{compare.stdout.strip()}\n```\n"
        )
        if acceptance:
            print(f"{pr.name}: {deselected.strip()}")
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
