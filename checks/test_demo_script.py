"""The command-line demo script: bad arguments get clear messages, the caller's environment stays.

Repository-only: it runs ``examples/logit_lens_demo.py`` on the shipped reference model.
"""

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "logit_lens_demo.py"
MODEL = ROOT / "reference_model" / "weights"


def run(*args: str, env_extra: dict = {}) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **env_extra}
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--model", str(MODEL), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", ""], "prompt"),
        (["--prompt", "   "], "prompt"),
        (["--prompt", "Return the", "--top-k", "0"], "top-k"),
        (["--prompt", "Return the", "--top-k", "100000"], "top-k"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(args, message) -> None:
    result = run(*args)
    assert result.returncode == 2, result.stderr
    assert "error:" in result.stderr and message in result.stderr.lower(), result.stderr
    assert "Traceback" not in result.stderr


def test_output_folder_that_is_a_file_is_refused(tmp_path: Path) -> None:
    occupied = tmp_path / "file.txt"
    occupied.write_text("not a folder")
    result = run("--prompt", "Return the", "--out-dir", str(occupied))
    assert result.returncode == 2 and "error:" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_long_prompt_warns_and_writes_where_asked(tmp_path: Path) -> None:
    out = tmp_path / "figures"
    result = run("--prompt", "Return the number of items. " * 60, "--out-dir", str(out))
    assert result.returncode == 0, result.stderr
    assert "only its first 128 tokens are read" in result.stderr, result.stderr
    written = sorted(p.name for p in out.iterdir())
    assert "entropy_per_layer.svg" in written and "kl_to_final_per_layer.svg" in written


def test_importing_the_script_changes_no_environment() -> None:
    code = (
        "import os, sys; before = dict(os.environ); sys.path.insert(0, sys.argv[1]); "
        "import logit_lens_demo; assert dict(os.environ) == before; print('unchanged')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(SCRIPT.parent)], capture_output=True, text=True
    )
    assert result.stdout.strip() == "unchanged", result.stderr


def run_script(*args: str, cwd: Path, env_extra: dict = {}, timeout: int = 300):
    """The script as a user runs it: from ``cwd``, offline, with only the arguments given.

    The timeout only stops a hung run: a loaded 2-core machine takes about 50 s for a default run.
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **env_extra}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *words: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def test_help_imports_neither_torch_nor_transformers() -> None:
    code = (
        "import runpy, sys; sys.argv = [sys.argv[1], '--help']\n"
        "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "except SystemExit as e:\n    assert e.code in (0, None), e.code\n"
        "heavy = [m for m in ('torch', 'transformers', 'transformer_lens') if m in sys.modules]\n"
        "assert not heavy, heavy\nprint('light')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(SCRIPT)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout and result.stdout.strip().endswith("light"), result.stdout


def test_default_run_uses_the_shipped_model_offline(tmp_path: Path) -> None:
    empty_cache = tmp_path / "hf"  # nothing from the Hub, even if this machine has it cached
    result = run_script(
        cwd=tmp_path, env_extra={"HF_HOME": str(empty_cache), "HF_HUB_CACHE": str(empty_cache)}
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "prompt 'Return the list of'" in result.stdout, result.stdout
    out = tmp_path / "logit_lens_output"
    written = sorted(p.name for p in out.iterdir())
    assert "logit_lens_stats.csv" in written and "entropy_per_layer.svg" in written, written
    # One prompt: every label says so, and the title names the model, not its folder's path.
    labels = svg_texts(out / "temperature_per_layer.svg")
    assert "mean over the prompt's positions" in labels, labels
    assert not any("window" in text for text in labels), labels
    for svg in out.glob("*.svg"):
        texts = svg_texts(svg)
        assert "reference model (4-layer GPT-2 trained on Python stdlib docstrings)" in texts
        assert not any(str(MODEL) in text or "/" + MODEL.name in text for text in texts), texts
    assert {row["sequences"] for row in csv_rows(out / "logit_lens_stats.csv")} == {"1"}


def svg_texts(path: Path) -> list:
    """The text elements of an SVG the script drew (matplotlib keeps text as text there)."""
    return [t for t in re.findall(r">([^<>]+)</text>", path.read_text()) if t.strip()]


def csv_rows(path: Path) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_windows_of_a_text_file_are_labelled_as_windows(tmp_path: Path) -> None:
    text = tmp_path / "text.txt"
    text.write_text(SCRIPT.read_text(encoding="utf-8"), encoding="utf-8")  # varied English
    out = tmp_path / "figures"
    result = run(
        "--text-file", str(text), "--windows", "4", "--window-len", "16", "--out-dir", str(out)
    )
    assert result.returncode == 0, result.stderr
    assert "mean over 4 windows" in svg_texts(out / "temperature_per_layer.svg")
    title = "4 windows of 16 tokens from text.txt; band: 10th-90th percentile over windows"
    assert title in svg_texts(out / "entropy_per_layer.svg")
    assert {row["sequences"] for row in csv_rows(out / "logit_lens_stats.csv")} == {"4"}
    # The KL figure explains its first point where the fresh lens has the larger KL there.
    rows = {(r["convention"], r["layer"]): r for r in csv_rows(out / "logit_lens_stats.csv")}
    fresh = float(rows["fresh", "0_pre"]["kl_nats_mean"])
    cached = float(rows["cached", "0_pre"]["kl_nats_mean"])
    temperature = float(rows["fresh", "0_pre"]["temperature_mean"])
    caption = " ".join(svg_texts(out / "kl_to_final_per_layer.svg"))
    assert ("At 0_pre the residual is the embedding" in caption) == (
        fresh > cached and temperature > 1
    ), caption


def test_hub_model_offline_is_one_line_naming_it_and_how_to_run_offline(tmp_path: Path) -> None:
    empty_cache = tmp_path / "hf"  # so that a machine with gpt2 cached gives the same answer
    result = run_script(
        "--model",
        "openai-community/gpt2",
        cwd=tmp_path,
        env_extra={"HF_HOME": str(empty_cache), "HF_HUB_CACHE": str(empty_cache)},
    )
    assert_one_line_error(result, "openai-community/gpt2", "--model", "HF_HUB_OFFLINE=1")
    assert not (tmp_path / "logit_lens_output").exists(), "output folder created before loading"


def test_model_that_fails_to_load_is_one_line_and_creates_no_folder(tmp_path: Path) -> None:
    broken = tmp_path / "not_a_model"  # a folder, so the script really tries to load it
    broken.mkdir()
    out = tmp_path / "figures" / "nested"
    result = run_script("--model", str(broken), "--out-dir", str(out), cwd=tmp_path)
    assert_one_line_error(result, str(broken), "--model")
    assert not (tmp_path / "figures").exists(), "output folder created before the model loaded"


def test_missing_cuda_device_is_one_line_and_creates_no_folder(tmp_path: Path) -> None:
    out = tmp_path / "figures"
    result = run_script(
        "--model",
        str(MODEL),
        "--device",
        "cuda",
        "--out-dir",
        str(out),
        cwd=tmp_path,
        env_extra={"CUDA_VISIBLE_DEVICES": ""},
    )
    assert_one_line_error(result, "--device cuda", "--device cpu")
    assert not out.exists()


def test_missing_matplotlib_is_named_before_any_work(tmp_path: Path) -> None:
    # matplotlib made unimportable, as on a machine without it; the script is run as `python
    # logit_lens_demo.py` would run it. Before any work: no table printed, no folder, no torch.
    out = tmp_path / "figures"
    code = (
        "import runpy, sys; sys.modules['matplotlib'] = None\n"
        "sys.argv = [sys.argv[1], '--model', sys.argv[2], '--out-dir', sys.argv[3]]\n"
        "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "except SystemExit as e:\n    status = e.code\n"
        "heavy = [m for m in ('torch', 'transformers', 'transformer_lens') if m in sys.modules]\n"
        "assert not heavy, heavy\nsys.exit(status)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(SCRIPT), str(MODEL), str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        cwd=tmp_path,
        timeout=60,
    )
    assert_one_line_error(result, "matplotlib is not installed", "pip install matplotlib")
    assert result.stdout == "", result.stdout
    assert not out.exists()
