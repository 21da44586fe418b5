#!/usr/bin/env python3
"""Writes patches/ from build/fork: one `git am` patch per edited upstream file, grouped by PR.

The series of each pull request is one commit per upstream file it edits, in the order the
manifest (tools/pull_requests.py) lists them. A file edited by several stacked PRs has one version
per PR: the last PR that edits it takes HEAD's content, every earlier one the content at tag
`pr/<name>` in build/fork (tools/fork.sh sets the tags as it applies each PR's patches; move a tag
to change that PR's version). A patch keeps the commit message it already has in patches/ (edit
the message in the patch file itself); a new one gets a placeholder message to rewrite. An edited
file the manifest does not list stops the export. Dates and identity are fixed, so the same edits
give the same bytes.

Usage: tools/series.py build/fork patches
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pull_requests import PULL_REQUESTS, PullRequest, pull_requests_editing  # noqa: E402

# The build's neutral identity, for patches/ and build/fork only: `make pr` (tools/export_pr.py)
# writes dist/ authored by the person exporting.
ENV = {
    "GIT_AUTHOR_NAME": "transformer-lens fork build",
    "GIT_AUTHOR_EMAIL": "fork-build@localhost",
    "GIT_AUTHOR_DATE": "2026-11-25T00:00:00+00:00",
    "GIT_COMMITTER_NAME": "transformer-lens fork build",
    "GIT_COMMITTER_EMAIL": "fork-build@localhost",
    "GIT_COMMITTER_DATE": "2026-11-25T00:00:00+00:00",
}


def git(fork: Path, *args: str, env: dict[str, str] | None = None, stdin: str = "") -> str:
    full_env = {**os.environ, **ENV, **(env or {})}
    result = subprocess.run(
        ["git", "-C", str(fork), *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=full_env,
        check=True,
    )
    return result.stdout


def existing_messages(patch_dir: Path) -> dict[str, str]:
    """{file: commit message} of each patch already in patch_dir."""
    found = {}
    for patch in sorted(patch_dir.glob("*.patch")):
        text = patch.read_text()
        header, _, rest = text.partition("\n\n")
        subject = re.search(r"^Subject: (?:\[PATCH[^\]]*\] )?(.*(?:\n .*)*)", header, re.M)
        body = rest.split("\n---\n", 1)[0]
        files = re.findall(r"^diff --git a/(\S+) b/", text, re.M)
        if subject and files:
            message = subject.group(1).replace("\n ", " ") + "\n\n" + body.strip() + "\n"
            found[files[0]] = message
    return found


def version_of(fork: Path, pr: PullRequest, path: str) -> str:
    """The ref holding `pr`'s version of `path`: HEAD, unless a later PR edits the file too."""
    if pull_requests_editing(path)[-1] is pr:
        return "HEAD"
    tag = f"pr/{pr.name}"
    if (
        subprocess.run(
            ["git", "-C", str(fork), "rev-parse", "--verify", "--quiet", tag], capture_output=True
        ).returncode
        != 0
    ):
        raise SystemExit(
            f"{path} is edited by {', '.join(p.name for p in pull_requests_editing(path))}: "
            f"{pr.name}'s version is read from tag {tag} in build/fork, which does not exist. "
            "Rebuild the fork (`make fork`) or tag the commit that holds that version."
        )
    return tag


def commit_files(
    fork: Path, parent: str, pr: PullRequest, files: list[str], messages: dict[str, str]
) -> str:
    """Chain one commit per file on top of parent, each taking `pr`'s version of the file."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
        git(fork, "read-tree", parent, env=env)
        for path in files:
            entry = git(fork, "ls-tree", version_of(fork, pr, path), "--", path).split()
            before = git(fork, "ls-tree", parent, "--", path).split()
            if before and before[2] == entry[2]:
                raise SystemExit(
                    f"{pr.name} lists {path} in its edits, but its version ({version_of(fork, pr, path)}) "
                    "is the same as the PR before it: drop it from the manifest or edit it."
                )
            git(fork, "update-index", "--cacheinfo", f"{entry[0]},{entry[2]},{path}", env=env)
            tree = git(fork, "write-tree", env=env).strip()
            message = messages.get(path, f"Update {path}\n\nDescribe this change.\n")
            parent = git(fork, "commit-tree", tree, "-p", parent, stdin=message).strip()
    return parent


def main(fork: Path, patches: Path) -> None:
    edited = git(fork, "diff", "--name-only", "upstream", "HEAD", "--diff-filter=M").split()
    for path in edited:
        pull_requests_editing(path)
    base = "upstream"
    for pr in PULL_REQUESTS:
        out = patches / pr.name
        out.mkdir(parents=True, exist_ok=True)
        order = [path for path in pr.edits if path in edited]
        tip = commit_files(
            fork, git(fork, "rev-parse", base).strip(), pr, order, existing_messages(out)
        )
        for old in out.glob("*.patch"):
            old.unlink()
        if order:
            git(
                fork,
                "format-patch",
                "--quiet",
                "--zero-commit",
                "--no-numbered",
                "--no-signature",
                "--output-directory",
                str(out.resolve()),
                f"{git(fork, 'rev-parse', base).strip()}..{tip}",
            )
        print(f"patches/{pr.name}: " + (", ".join(order) or "no edits"))
        base = tip


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
