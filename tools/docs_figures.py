"""Make the figures of docs/source/content/logit_lens.md (repository-only; not part of the series).

Runs the demo script ``demos/logit_lens_demo.py`` on the trained reference model
(``reference_model/weights``: a 4-layer GPT-2 trained on the docstrings and comments of the Python
standard library) over windows of text it was **not** trained on: the held-out files of its
corpus (every 10th standard-library file, see ``reference_model/README.md``), extracted the way
training extracted them. Usage, from the repository root::

    HF_HUB_OFFLINE=1 .venv/bin/python tools/docs_figures.py

It writes ``entropy_per_layer.svg``, ``kl_to_final_per_layer.svg``,
``temperature_per_layer.svg`` and ``logit_lens_stats.csv`` to ``docs/source/_static/logit_lens``.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "demos"))

import logit_lens_demo  # noqa: E402

from reference_model.train import build_corpus  # noqa: E402

WEIGHTS = ROOT / "reference_model" / "weights"
OUT_DIR = ROOT / "docs" / "source" / "_static" / "logit_lens"
WINDOWS = 256
WINDOW_LEN = 64


def main() -> int:
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
                "--model", str(WEIGHTS),
                "--model-label", "4-layer GPT-2 trained on Python stdlib docstrings",
                "--text-file", str(text_file),
                "--windows", str(WINDOWS),
                "--window-len", str(WINDOW_LEN),
                "--out-dir", str(OUT_DIR),
            ]
        )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
