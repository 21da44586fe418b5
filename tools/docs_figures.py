"""Make this repository's logit-lens figures (repository-only; no pull request carries them).

Runs the demo script ``examples/logit_lens_demo.py`` on the trained reference model
(``reference_model/weights``: a 4-layer GPT-2 trained on the docstrings and comments of the Python
standard library) over windows of text it was **not** trained on: the held-out files of its
corpus (every 10th standard-library file, see ``reference_model/README.md``), extracted the way
training extracted them. Usage, from the repository root::

    HF_HUB_OFFLINE=1 .venv/bin/python tools/docs_figures.py            # rewrite the committed figures
    HF_HUB_OFFLINE=1 .venv/bin/python tools/docs_figures.py --out DIR  # draw them into DIR instead
    HF_HUB_OFFLINE=1 .venv/bin/python tools/docs_figures.py --check    # redraw and compare (make figures-check)

It writes ``entropy_per_layer.svg``, ``kl_to_final_per_layer.svg``,
``temperature_per_layer.svg`` and ``logit_lens_stats.csv`` to ``examples/figures`` (or ``--out``).
Entropy and KL are in nats there (the unit of the logit-lens tool), as the figures' axes and the
CSV's column names say.

``--check`` draws them into a temporary folder, leaves the committed files alone, and compares the
numbers behind the figures rather than the SVG bytes, which change with the CPU (float rounding in
the 4th-6th decimal, and the SVG element ids that hash the drawn paths). It fails if:

* the redrawn CSV lacks a column or a (convention, layer) row of the committed one, or has extra
  ones, or the text cells (convention, layer, sequences) differ;
* a number differs from the committed one by more than ``--atol`` (default 1e-3) in the plotted
  units (nats for entropy and KL, a ratio for the temperature);
* a committed SVG is not redrawn.

Why an absolute 1e-3: the CSV is written with 4 decimals, so a last-digit flip from rounding alone
is 1e-4; float32 reductions in another order (another CPU, another thread count) move the unrounded
statistics by a few 1e-5 at the largest values here (temperatures near 24). 1e-3 leaves ten times
the rounding step for that, and is far below anything one can see in the figures, whose y-axes span
several nats (or a decade of temperature). The worst difference found is printed.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

import logit_lens_demo  # noqa: E402

from reference_model.train import build_corpus  # noqa: E402

WEIGHTS = ROOT / "reference_model" / "weights"
OUT_DIR = ROOT / "examples" / "figures"
WINDOWS = 256
WINDOW_LEN = 64
CSV_NAME = "logit_lens_stats.csv"
TEXT_COLUMNS = ("convention", "layer", "sequences")
DEFAULT_ATOL = 1e-3


def read_stats(path: Path) -> tuple:
    """The CSV's header and its rows keyed by (convention, layer)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
        header = list(rows[0].keys()) if rows else []
    keyed = {}
    for row in rows:
        key = (row["convention"], row["layer"])
        if key in keyed:
            raise ValueError(f"{path}: row {key} appears twice")
        keyed[key] = row
    return header, keyed


def compare(committed_dir: Path, drawn_dir: Path, atol: float) -> list:
    """Problems found comparing the figures drawn into ``drawn_dir`` with the committed ones."""
    problems = []
    for svg in sorted(committed_dir.glob("*.svg")):
        if not (drawn_dir / svg.name).is_file():
            problems.append(f"{svg.name} is committed but was not redrawn")
    committed_header, committed = read_stats(committed_dir / CSV_NAME)
    drawn_path = drawn_dir / CSV_NAME
    if not drawn_path.is_file():
        return problems + [f"{CSV_NAME} was not redrawn"]
    drawn_header, drawn = read_stats(drawn_path)
    if drawn_header != committed_header:
        problems.append(f"columns differ: committed {committed_header}, redrawn {drawn_header}")
    if list(drawn) != list(committed):
        missing = [k for k in committed if k not in drawn]
        extra = [k for k in drawn if k not in committed]
        problems.append(
            f"rows differ: missing {missing}, extra {extra}"
            if missing or extra
            else f"rows in another order: committed {list(committed)}, redrawn {list(drawn)}"
        )
    worst = (0.0, None)
    columns = [c for c in committed_header if c in drawn_header]
    for key in (k for k in committed if k in drawn):
        for column in columns:
            old, new = committed[key][column], drawn[key][column]
            if column in TEXT_COLUMNS:
                if old != new:
                    problems.append(f"{key} {column}: committed {old!r}, redrawn {new!r}")
                continue
            diff = abs(float(new) - float(old))
            if not diff <= atol:  # also catches nan
                problems.append(
                    f"{key} {column}: committed {old}, redrawn {new} (|diff| {diff:.2g})"
                )
            if diff > worst[0] or worst[1] is None:
                worst = (diff, f"{key[0]} {key[1]} {column}: committed {old}, redrawn {new}")
    n_values = len([c for c in columns if c not in TEXT_COLUMNS]) * len(
        [k for k in committed if k in drawn]
    )
    where = f" at {worst[1]}" if worst[0] > 0 else ": every number equal"
    print(
        f"figures-check: {n_values} numbers of {CSV_NAME} compared with atol {atol:g}; "
        f"worst |diff| {worst[0]:.2g}{where}"
    )
    return problems


def draw(out_dir: Path) -> int:
    train_docs, heldout_docs = build_corpus()
    digest = hashlib.sha256("\x00".join(train_docs + heldout_docs).encode()).hexdigest()
    expected = json.loads((WEIGHTS / "training_info.json").read_text()).get("corpus_sha256")
    if expected and digest != expected:
        print(
            "error: this Python's standard library gives a different corpus than the one the "
            "reference model was trained on, so the held-out split is not held out; use the "
            "Python version named in reference_model/README.md",
            file=sys.stderr,
        )
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        text_file = Path(tmp) / "stdlib_heldout_docstrings.txt"
        text_file.write_text("\n\n".join(heldout_docs), encoding="utf-8")
        return logit_lens_demo.main(
            [
                "--model",
                str(WEIGHTS),
                "--model-label",
                "4-layer GPT-2 trained on Python stdlib docstrings",
                "--text-file",
                str(text_file),
                "--windows",
                str(WINDOWS),
                "--window-len",
                str(WINDOW_LEN),
                "--out-dir",
                str(out_dir),
            ]
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", type=Path, default=OUT_DIR, help=f"folder to draw into ({OUT_DIR})")
    where.add_argument(
        "--check",
        action="store_true",
        help="draw into a temporary folder and compare with the committed figures",
    )
    parser.add_argument(
        "--atol",
        type=float,
        default=DEFAULT_ATOL,
        help=f"--check: largest absolute difference allowed, in plotted units ({DEFAULT_ATOL:g})",
    )
    args = parser.parse_args(argv)
    if not args.check:
        return draw(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        status = draw(Path(tmp))
        if status != 0:
            return status
        problems = compare(OUT_DIR, Path(tmp), args.atol)
    for problem in problems:
        print(f"figures-check: {problem}", file=sys.stderr)
    if problems:
        print(
            f"figures-check: the redrawn figures differ from {OUT_DIR.relative_to(ROOT)}; "
            "if the change is intended, run `make figures` and commit the result",
            file=sys.stderr,
        )
        return 1
    print(f"figures-check: the redrawn figures match {OUT_DIR.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
