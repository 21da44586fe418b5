"""The logit lens demo runs offline: the script prints its table and writes its figures, and the
notebook ``demos/Logit_Lens.ipynb`` executes (from ``demos/``, and finds the demo module from the
repository root too).

Both run on the reference model shipped in ``reference_model/``; the notebook runs in a
``python3`` kernel of this virtualenv with nbclient (requirements/demo.txt).
"""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import nbformat
import pytest
from nbclient import NotebookClient

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMOS_DIR = REPO_ROOT / "demos"
NOTEBOOK = DEMOS_DIR / "Logit_Lens.ipynb"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# A figure of axes, curves and labels at 100 dpi is tens of kB; a blank canvas is a few kB.
MIN_FIGURE_BYTES = 10_000
NOTEBOOK_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def demo() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "logit_lens_demo", DEMOS_DIR / "logit_lens_demo.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def assert_figures_written(directory: Path, names) -> None:
    for name in names:
        path = directory / f"{name}.png"
        assert path.is_file(), f"{path} was not written"
        content = path.read_bytes()
        assert content.startswith(PNG_SIGNATURE), f"{path} is not a PNG"
        assert len(content) > MIN_FIGURE_BYTES, f"{path} has only {len(content)} bytes"


def test_script_prints_the_table_and_writes_the_figures(demo, tmp_path: Path, capsys) -> None:
    assert demo.main(["--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "fresh normalization (recompute_ln=True)" in out
    assert "cached final scale (recompute_ln=False)" in out
    assert out.count("final_post") == 2  # one table per convention, every layer down to the last
    assert_figures_written(tmp_path, demo.FIGURE_NAMES)


def test_script_says_what_to_do_when_weights_are_not_cached(
    demo, tmp_path: Path, capsys, monkeypatch
) -> None:
    # Pretend the cache is empty, so the test means the same on a machine that has GPT-2 cached.
    monkeypatch.setattr(demo, "weights_are_cached", lambda name: False)
    assert demo.main(["--model", "gpt2", "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not in the local Hugging Face cache" in err
    assert "HookedTransformer.from_pretrained('gpt2')" in err
    assert not any(tmp_path.iterdir()), "no figures without a model"


def execute(notebook: nbformat.NotebookNode, working_dir: Path) -> None:
    client = NotebookClient(
        notebook,
        kernel_name="python3",
        timeout=NOTEBOOK_TIMEOUT_S,
        resources={"metadata": {"path": str(working_dir)}},
    )
    client.execute()  # raises CellExecutionError, with the traceback, if a cell fails


def test_notebook_runs_from_demos(demo) -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert all(
        not cell.get("outputs") and cell.get("execution_count") is None
        for cell in notebook.cells
        if cell.cell_type == "code"
    ), "commit the notebook with its outputs stripped"
    execute(notebook, DEMOS_DIR)  # Jupyter's working directory: the notebook's folder
    outputs = [output for cell in notebook.cells for output in cell.get("outputs", [])]
    images = [output for output in outputs if "image/png" in output.get("data", {})]
    assert len(images) == len(demo.FIGURE_NAMES)
    text = "".join(output.get("text", "") for output in outputs)
    assert "fresh normalization (recompute_ln=True)" in text
    assert text.rstrip().endswith("True"), "the temperature identity does not hold"


def test_notebook_finds_the_demo_module_from_the_repo_root() -> None:
    # Running the whole notebook a second time would cost another 15 s of imports; the working
    # directory only matters to the cell that puts demos/ on sys.path, so run that cell alone.
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    path_cell = next(cell for cell in notebook.cells if cell.get("id") == "demo-path")
    probe = nbformat.v4.new_code_cell(
        'import importlib.util; print(importlib.util.find_spec("logit_lens_demo").origin)'
    )
    notebook.cells = [path_cell, probe]
    execute(notebook, REPO_ROOT)
    assert probe.outputs[0]["text"].strip() == str(DEMOS_DIR / "logit_lens_demo.py")
