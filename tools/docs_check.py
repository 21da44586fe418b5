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

Math is rendered offline by Debian's MathJax (`libjs-mathjax`, /usr/share/javascript/mathjax): the
build fails with the install command when it is missing (`--cdn-math` builds anyway, with Sphinx's
default of MathJax from a CDN, which an offline reader sees as raw TeX), and checks that the built
page loads the local copy.

`--narrow` opens a built page in headless Chromium (Debian's `chromium`) at a phone's width
(390 px) and checks that its first table and first display equation are readable there: the page
itself does not scroll sideways, the math is typeset (no raw TeX), and the table and the equation
either fit or scroll inside a box of their own, with a scroll bar as the cue. It prints what it
measured and writes a screenshot next to the page (`<page>.narrow.png`).

Usage:
    tools/docs_check.py --tree build/fork --out build/docs [--record tools/docs-warnings-4.3.0.txt]
    tools/docs_check.py --narrow build/docs/html/content/logit_lens.html [--width 390]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASELINE = ROOT / "tools" / "docs-warnings-4.3.0.txt"
PAGE = "content/logit_lens"
SYSTEMIC = "WARNING: duplicate object description of"
LOCAL_MATHJAX = Path("/usr/share/javascript/mathjax/MathJax.js")
MATHJAX_HINT = (
    "offline math needs Debian's MathJax: apt-get install libjs-mathjax "
    "(or pass --cdn-math to build with MathJax from a CDN)"
)
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def normalize(line: str, tree: Path) -> str:
    """A warning without the tree's absolute path or line numbers, which shift with edits."""
    line = line.replace(str(tree.resolve()) + "/", "").replace(str(tree) + "/", "")
    line = re.sub(r"^\S*/site-packages/", "site-packages/", line)
    line = re.sub(r"^\S*?/(transformer_lens/)", r"\1", line)
    line = re.sub(r":\d+:", ":", line)
    return re.sub(r"\x1b\[[0-9;]*m", "", line).strip()


def build(tree: Path, out: Path, local_math: bool = True) -> list[str]:
    docs = tree / "docs"
    prepare = "import make_docs; make_docs.copy_demos(); make_docs.generate_bridge_models_page()"
    subprocess.run([sys.executable, "-c", prepare], cwd=docs, check=True)
    out = out.resolve()
    log = out / "warnings.log"
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "sphinx", "-b", "html", "-q", "-w", str(log)]
    command += ["-d", str(out / "doctrees")]
    if local_math:
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


# Measures, in the page as Chromium lays it out, the first table and the first display equation.
# MathJax 2 (Debian's) is waited for through its queue; MathJax 3 through its startup promise.
NARROW_PROBE = r"""
<script>
(function () {
  function box(el) {
    for (let p = el.parentElement; p; p = p.parentElement) {
      const o = getComputedStyle(p).overflowX;
      if (o === "auto" || o === "scroll") return p;
    }
    return null;
  }
  function measure(el, inner) {
    if (!el) return null;
    const scroller = box(el);
    const w = (inner || el).getBoundingClientRect().width;
    return {
      width: Math.round(w),
      fits: w <= (scroller || el.parentElement).clientWidth + 1,
      scroll_box: scroller ? scroller.className || scroller.tagName : null,
      scroll_box_width: scroller ? scroller.clientWidth : null,
      scrolls: scroller ? scroller.scrollWidth > scroller.clientWidth + 1 : false,
      scroll_bar: scroller ? scroller.offsetHeight - scroller.clientHeight > 0 : false,
      font_px: parseFloat(getComputedStyle(el).fontSize),
    };
  }
  function report() {
    const article = document.querySelector("article") || document.body;
    const math = article.querySelector("div.math");
    const typeset = math && (math.querySelector("span.MathJax, mjx-container") || math.querySelector(".MathJax_Display"));
    const raw = math ? /\\mathrm|\\frac/.test(math.innerText) : null;
    const result = {
      viewport: window.innerWidth,
      page_scroll_width: document.documentElement.scrollWidth,
      mathjax: window.MathJax ? (window.MathJax.version || "loaded") : null,
      table: measure(article.querySelector("table")),
      equation: math ? Object.assign(measure(math, typeset), {typeset: !!typeset, raw_tex: raw}) : null,
    };
    window.parent.postMessage(JSON.stringify(result), "*");
  }
  window.addEventListener("load", function () {
    const mj = window.MathJax;
    if (mj && mj.Hub && mj.Hub.Queue) mj.Hub.Queue(report);
    else if (mj && mj.startup && mj.startup.promise) mj.startup.promise.then(report);
    else setTimeout(report, 2000);
  });
})();
</script>
"""
# Headless Chromium's window is at least 500 px wide, so the page is laid out in a frame of the
# width asked for, as a phone's browser would lay it out; the probe posts what it measured here.
NARROW_FRAME = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><style>body {{ margin: 0 }} iframe {{ border: 0 }}</style></head>
<body><iframe src="{src}" width="{width}" height="2400"></iframe>
<script>
window.addEventListener("message", function (event) {{
  const pre = document.createElement("pre");
  pre.id = "narrow-check";
  pre.textContent = event.data;
  document.body.appendChild(pre);
}});
</script></body></html>
"""


def chromium() -> str | None:
    return next((path for path in map(shutil.which, CHROMIUM_NAMES) if path), None)


def narrow(page: Path, width: int) -> int:
    """Checks the page's first table and display equation at ``width`` px in headless Chromium."""
    browser = chromium()
    if browser is None:
        print("narrow: no Chromium here: apt-get install chromium")
        return 1
    if not page.is_file():
        print(f"narrow: no page {page}: run make docs first")
        return 1
    html = page.read_text(encoding="utf-8")
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu",
             "--allow-file-access-from-files", f"--window-size={max(width, 500) + 20},2400",
             "--virtual-time-budget=20000"]  # fmt: skip
    # The probe and the frame go beside the page, so that its relative links still resolve.
    made = []
    try:
        with tempfile.NamedTemporaryFile("w", suffix=".html", dir=page.parent, delete=False) as f:
            made.append(Path(f.name))
            f.write(html.replace("</body>", NARROW_PROBE + "</body>"))
        with tempfile.NamedTemporaryFile("w", suffix=".html", dir=page.parent, delete=False) as f:
            made.append(Path(f.name))
            f.write(NARROW_FRAME.format(src=made[0].name, width=width))
        dom = subprocess.run(
            flags + ["--dump-dom", made[1].as_uri()], capture_output=True, text=True, timeout=120
        ).stdout
        with tempfile.NamedTemporaryFile("w", suffix=".html", dir=page.parent, delete=False) as f:
            made.append(Path(f.name))
            f.write(NARROW_FRAME.format(src=page.name, width=width))
        shot = page.with_suffix(".narrow.png")
        subprocess.run(
            flags + [f"--screenshot={shot}", made[2].as_uri()], capture_output=True, timeout=120
        )
    finally:
        for path in made:
            path.unlink()
    found = re.search(r'<pre id="narrow-check">(.*?)</pre>', dom, re.DOTALL)
    if not found:
        print("narrow: the probe did not report (the page did not finish loading in Chromium)")
        return 1
    m = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    print(f"narrow: {page} at {m['viewport']} px in {Path(browser).name}, MathJax {m['mathjax']}")
    print(f"  page: scroll width {m['page_scroll_width']} px")
    problems = []
    if m["page_scroll_width"] > m["viewport"] + 1:
        problems.append("the page itself scrolls sideways")
    if m["mathjax"] is None:
        problems.append("MathJax did not load")
    for name in ("table", "equation"):
        item = m[name]
        if item is None:
            problems.append(f"no {name} on the page")
            continue
        how = "fits" if item["fits"] else (
            f"scrolls inside {item['scroll_box']} ({item['scroll_box_width']} px)"
            + (", scroll bar shown" if item["scroll_bar"] else ", no scroll bar")
            if item["scrolls"] else "overflows with no scroll box")  # fmt: skip
        extra = ""
        if name == "equation":
            extra = f", typeset {item['typeset']}, raw TeX visible {item['raw_tex']}"
            if not item["typeset"] or item["raw_tex"]:
                problems.append("the first display equation is not typeset")
        print(f"  first {name}: {item['width']} px wide, {how}, font {item['font_px']:g} px{extra}")
        if not item["fits"] and not item["scrolls"]:
            problems.append(f"the first {name} overflows the page")
        if item["font_px"] < 12:
            problems.append(f"the first {name}'s font is {item['font_px']:g} px")
    print(f"  screenshot: {shot}")
    for problem in problems:
        print(f"  PROBLEM: {problem}")
    if not problems:
        print("  readable: the page does not scroll sideways; table and equation fit or scroll")
    return 1 if problems else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--record", type=Path, help="write the warnings as the baseline and stop")
    parser.add_argument(
        "--cdn-math", action="store_true", help="build without Debian's MathJax (math from a CDN)"
    )
    parser.add_argument("--narrow", type=Path, help="check this built page at --width px instead")
    parser.add_argument("--width", type=int, default=390)
    args = parser.parse_args()
    if args.narrow:
        return narrow(args.narrow, args.width)
    if args.tree is None or args.out is None:
        parser.error("--tree and --out are required (or --narrow PAGE)")
    local_math = LOCAL_MATHJAX.exists()
    if not local_math and not args.cdn_math:
        print(f"error: {MATHJAX_HINT}")
        return 1
    warnings = build(args.tree, args.out, local_math)
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
    elif local_math and f"file://{LOCAL_MATHJAX}" not in page.read_text(encoding="utf-8"):
        print(f"  {page} does not load {LOCAL_MATHJAX}: its math would need the network")
        status = 1
    index = (args.tree / "docs" / "source" / "index.md").read_text()
    if PAGE not in index:
        print(f"  {PAGE} is not in docs/source/index.md's toctree")
        status = 1
    if status == 0:
        math = f"math from {LOCAL_MATHJAX}" if local_math else "math from a CDN (--cdn-math)"
        print(f"  no new warning; {PAGE} is built and in the toctree; {math}")
    return status


if __name__ == "__main__":
    sys.exit(main())
