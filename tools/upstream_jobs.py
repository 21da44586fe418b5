#!/usr/bin/env python3
"""Runs upstream's docstring, mypy and format jobs on two trees and compares what fails.

Usage: upstream_jobs.py --pristine DIR --stacked DIR --report-dir DIR [JOB ...]

JOB is any of `docstring` (upstream's `make docstring-test`: `pytest transformer_lens/`), `mypy`
(upstream's `uv run mypy .`, the tree's own configuration) and `format` (upstream's `make
check-format`: pycln, isort and black with the tree's configuration); all three by default. Each
runs in the tree, with the interpreter running this script (build/lock-venv: upstream's locked
versions). Compared are sets, not counts: the failing doctests by id, mypy's errors by file and
message (line numbers move when a file is edited), and the files each formatter would change.
Exit status 1 if the stacked tree has one that pristine lacks; everything else is printed.

Not as upstream: no `--reruns 2 --reruns-delay 5` (upstream's guard against Hub timeouts; here the
Hub is offline, so a test that needs it fails at once, in both trees alike).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "PYTHONDONTWRITEBYTECODE": "1",
}
MYPY_ERROR = re.compile(r"^(?P<path>[^:\s]+):(?P<line>\d+): error: (?P<message>.*)$")


def run(tree: Path, *args: str) -> subprocess.CompletedProcess:
    started = time.monotonic()
    done = subprocess.run(args, cwd=tree, env=ENV, text=True, capture_output=True)
    print(
        f"  {tree}: `{' '.join(args[1:])}` exit {done.returncode}, "
        f"{time.monotonic() - started:.0f} s"
    )
    return done


def docstring(tree: Path, report: Path) -> tuple[Counter, str]:
    xml = report.with_suffix(".xml")
    done = run(
        tree,
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "-q",
        f"--junitxml={xml.resolve()}",
        "transformer_lens/",
    )
    report.write_text(done.stdout + done.stderr)
    failing: Counter = Counter()
    totals: Counter = Counter()
    for case in ET.parse(xml).iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        outcome = next(
            (child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed"
        )
        totals[outcome] += 1
        if outcome in ("failure", "error"):
            failing[f"{outcome}: {name}"] += 1
    return failing, ", ".join(f"{count} {outcome}" for outcome, count in sorted(totals.items()))


def mypy(tree: Path, report: Path) -> tuple[Counter, str]:
    # One cache for both trees: most of the work is torch and transformers, the same in both; mypy
    # rechecks a module whose file differs from the cached one (its hash is in the cache).
    cache = report.with_name("mypy-cache").resolve()
    done = run(tree, sys.executable, "-m", "mypy", "--cache-dir", str(cache), ".")
    report.write_text(done.stdout + done.stderr)
    errors: Counter = Counter()
    for line in done.stdout.splitlines():
        if match := MYPY_ERROR.match(line):
            errors[f"{match['path']}: {match['message']}"] += 1
    summary = (done.stdout.strip().splitlines() or ["no output"])[-1]
    if done.returncode != 0 and not errors:  # a crash, not a type error: fail, never compare
        errors[f"mypy exited {done.returncode} with no error line (see {report})"] += 1
    return errors, summary


def format_check(tree: Path, report: Path) -> tuple[Counter, str]:
    commands = {
        "pycln": ("pycln", "--check", "--all", ".", "--exclude", "__init__.py"),
        "isort": ("isort", "--check-only", "."),
        "black": ("black", "--check", "."),
    }
    flagged: Counter = Counter()
    log = []
    statuses = []
    for tool, args in commands.items():
        done = run(tree, sys.executable, "-m", *args)
        output = done.stdout + done.stderr
        log.append(f"$ {' '.join(args)}\n{output}")
        statuses.append(f"{tool} exit {done.returncode}")
        for line in output.splitlines():
            if re.search(r"would reformat|ERROR:|would be changed|is not|error", line, re.I):
                flagged[f"{tool}: {line.strip()}"] += 1
        if done.returncode != 0 and not any(key.startswith(tool) for key in flagged):
            flagged[f"{tool}: exit {done.returncode}"] += 1
    report.write_text("\n".join(log))
    return flagged, ", ".join(statuses)


JOBS = {"docstring": docstring, "mypy": mypy, "format": format_check}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pristine", type=Path, required=True)
    parser.add_argument("--stacked", type=Path, required=True)
    parser.add_argument("--report-dir", type=Path, required=True)
    parser.add_argument("jobs", nargs="*", help=f"any of {', '.join(JOBS)} (default: all)")
    args = parser.parse_args()
    args.report_dir.mkdir(parents=True, exist_ok=True)
    unknown = set(args.jobs) - set(JOBS)
    if unknown:
        parser.error(f"unknown job(s) {', '.join(sorted(unknown))}: choose from {', '.join(JOBS)}")
    status = 0
    for job in args.jobs or list(JOBS):
        print(f"{job}:")
        results = {}
        for label, tree in (("pristine", args.pristine), ("stacked", args.stacked)):
            found, summary = JOBS[job](tree, args.report_dir / f"{job}-{label}.log")
            results[label] = found
            print(f"  {label}: {sum(found.values())} failing ({summary})")
        new = results["stacked"] - results["pristine"]
        gone = results["pristine"] - results["stacked"]
        for item in sorted(gone):
            print(f"  pristine only (fixed or moved): {item}")
        for item in sorted(new):
            print(f"  NEW in the stacked tree: {item}")
        print(
            f"  {job}: {sum(new.values())} new against pristine 4.3.0"
            f" (logs in {args.report_dir}/{job}-*.log)"
        )
        status |= bool(new)
    return status


if __name__ == "__main__":
    sys.exit(main())
