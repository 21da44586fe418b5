#!/usr/bin/env python3
"""Builds upstream's docs for a tree and checks that the pull requests add no Sphinx warning.

Upstream's `docs/make_docs.py` copies the demo notebooks, generates the bridge-models page and runs
Sphinx with `-W` commented out: pristine 4.3.0 gives several hundred warnings (duplicate object
descriptions in the generated API pages, docstring markup), so "warnings as errors" can only mean
"no warning that pristine does not have" (apart from the duplicate object description that
upstream's setup gives every documented object, new ones included). This script runs those same steps, writes every warning
to a log, and compares it, with paths made relative, to the baseline recorded from pristine 4.3.0
(`--record` writes that baseline). It fails, listing them, on any new warning, and it fails if the
logit-lens page is missing from the built site or from the index's toctree.

Usage:
    tools/docs_check.py --tree build/fork --out build/docs [--record tools/docs-warnings-4.3.0.txt]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASELINE = ROOT / "tools" / "docs-warnings-4.3.0.txt"
PAGE = "content/logit_lens"
SYSTEMIC = "WARNING: duplicate object description of"
LOCAL_MATHJAX = Path("/usr/share/javascript/mathjax/MathJax.js")


def normalize(line: str, tree: Path) -> str:
    """A warning without the tree's absolute path or line numbers, which shift with edits."""
    line = line.replace(str(tree.resolve()) + "/", "").replace(str(tree) + "/", "")
    line = re.sub(r"^\S*/site-packages/", "site-packages/", line)
    line = re.sub(r"^\S*?/(transformer_lens/)", r"\1", line)
    line = re.sub(r":\d+:", ":", line)
    return re.sub(r"\x1b\[[0-9;]*m", "", line).strip()


def build(tree: Path, out: Path) -> list[str]:
    docs = tree / "docs"
    prepare = "import make_docs; make_docs.copy_demos(); make_docs.generate_bridge_models_page()"
    subprocess.run([sys.executable, "-c", prepare], cwd=docs, check=True)
    out = out.resolve()
    log = out / "warnings.log"
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "sphinx", "-b", "html", "-q", "-w", str(log)]
    command += ["-d", str(out / "doctrees")]
    if LOCAL_MATHJAX.exists():
        # Renders the math of an offline build; the hosted docs keep Sphinx's CDN default.
        command += ["-D", f"mathjax_path=file://{LOCAL_MATHJAX}?config=TeX-AMS-MML_HTMLorMML"]
    command += ["source", str(out / "html")]
    started = time.monotonic()
    # autodoc must document this tree's package, not whichever transformer_lens is installed.
    env = {**os.environ, "PYTHONPATH": str(tree.resolve())}
    subprocess.run(command, cwd=docs, env=env, check=True, stderr=subprocess.DEVNULL)
    print(f"sphinx on {tree}: {time.monotonic() - started:.0f} s, html in {out / 'html'}")
    lines = [normalize(line, tree) for line in log.read_text().splitlines()]
    return [line for line in lines if "WARNING" in line or "ERROR" in line]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--record", type=Path, help="write the warnings as the baseline and stop")
    args = parser.parse_args()
    warnings = build(args.tree, args.out)
    if args.record:
        args.record.write_text("\n".join(sorted(warnings)) + "\n")
        print(f"{len(warnings)} warnings recorded in {args.record}")
        return 0
    baseline = Counter(BASELINE.read_text().splitlines())
    new = Counter(warnings) - baseline
    print(f"warnings: {sum(baseline.values())} on pristine 4.3.0, {len(warnings)} on this tree")
    status = 0
    for line in sorted(new.elements()):
        if SYSTEMIC in line:
            # Upstream's build documents every object twice (apidoc pages and the package page),
            # so each new public attribute adds one of these, as each existing one does.
            print(f"  new, of the kind every object has on pristine: {line}")
        else:
            print(f"  NEW: {line}")
            status = 1
    page = args.out / "html" / f"{PAGE}.html"
    if not page.exists():
        print(f"  missing: {page}")
        status = 1
    index = (args.tree / "docs" / "source" / "index.md").read_text()
    if PAGE not in index:
        print(f"  {PAGE} is not in docs/source/index.md's toctree")
        status = 1
    if status == 0:
        print(f"  no new warning; {PAGE} is built and in the toctree")
    return status


if __name__ == "__main__":
    sys.exit(main())
