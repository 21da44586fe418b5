#!/usr/bin/env python3
"""Runs upstream's own tests on pristine upstream and on the fork, and compares the outcomes.

Both trees run the same pytest selection with the same interpreter (pytest puts each tree's root
first on sys.path, so each imports its own `transformer_lens`). The check fails, naming the tests,
if any test that passes on pristine does not pass on the fork. Tests that exist only in the fork
(the ones the pull requests add) are counted separately.

Usage:
    tools/compare_suites.py --pristine build/pristine --fork build/fork [pytest args...]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path


def run_suite(tree: Path, pytest_args: list[str], report: Path) -> dict[str, str]:
    """Run pytest in tree; return {test id: outcome} from its JUnit report."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q"]
    command += ["--continue-on-collection-errors"]
    command += ["--junitxml", str(report), *pytest_args]
    started = time.monotonic()
    subprocess.run(command, cwd=tree, env=env, stdout=subprocess.DEVNULL, check=False)
    print(f"  {tree}: {time.monotonic() - started:.0f} s")
    return read_report(report)


def read_report(report: Path) -> dict[str, str]:
    """{test id: outcome} from a JUnit report."""
    outcomes: dict[str, str] = {}
    for case in ET.parse(report).iter("testcase"):
        test_id = f"{case.get('classname')}::{case.get('name')}"
        tags = {child.tag for child in case}
        if "failure" in tags or "error" in tags:
            outcome = "failed"
        elif "skipped" in tags:
            outcome = "skipped"
        else:
            outcome = "passed"
        # A test that errors at teardown appears twice: keep the worst outcome.
        if outcomes.get(test_id) != "failed":
            outcomes[test_id] = outcome
    return outcomes


def selection_prefixes(pytest_args: list[str]) -> list[str]:
    """The JUnit class-name prefix of each test file or folder in pytest_args."""
    prefixes = []
    for arg in pytest_args:
        path = arg.split("::")[0]
        if path.endswith(".py"):
            prefixes.append(path[: -len(".py")].replace("/", ".") + ".")
            prefixes.append(path[: -len(".py")].replace("/", ".") + "::")
        elif "/" in path or Path(path).is_dir():
            prefixes.append(path.rstrip("/").replace("/", ".") + ".")
    return prefixes


def summary(outcomes: dict[str, str]) -> str:
    counts = Counter(outcomes.values())
    return ", ".join(f"{counts[k]} {k}" for k in ("passed", "failed", "skipped"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pristine", type=Path, required=True)
    parser.add_argument("--fork", type=Path, required=True)
    parser.add_argument("--report-dir", type=Path, default=Path("build/compare"))
    parser.add_argument(
        "--reuse-pristine",
        action="store_true",
        help="read pristine.xml from an earlier run of the same selection instead of rerunning",
    )
    args, pytest_args = parser.parse_known_args()
    args.report_dir.mkdir(parents=True, exist_ok=True)
    print(f"upstream suites, pristine against fork: pytest {' '.join(pytest_args)}")
    pristine_report = args.report_dir.resolve() / "pristine.xml"
    if args.reuse_pristine and pristine_report.exists():
        # The earlier run may have covered more files than this selection: keep this selection's.
        selected = tuple(selection_prefixes(pytest_args))
        pristine = {t: o for t, o in read_report(pristine_report).items() if t.startswith(selected)}
    else:
        pristine = run_suite(args.pristine, pytest_args, pristine_report)
    fork = run_suite(args.fork, pytest_args, args.report_dir.resolve() / "fork.xml")
    shared = pristine.keys() & fork.keys()
    print(f"  pristine: {summary(pristine)}")
    print(f"  fork:     {summary({t: fork[t] for t in shared})} (the same tests)")
    added = {t: fork[t] for t in fork.keys() - pristine.keys()}
    if added:
        print(f"  fork only (tests the pull requests add): {summary(added)}")
    lost = sorted(t for t in shared if pristine[t] == "passed" and fork[t] != "passed")
    missing = sorted(t for t in pristine.keys() - fork.keys() if pristine[t] == "passed")
    for test_id in lost:
        print(f"  LOST: {test_id} ({fork[test_id]} on the fork)")
    for test_id in missing:
        print(f"  MISSING on the fork: {test_id}")
    if lost or missing:
        return 1
    print("  every test that passes on pristine passes on the fork")
    return 0


if __name__ == "__main__":
    sys.exit(main())
