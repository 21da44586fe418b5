"""The command-line demo script: bad arguments get clear messages, the caller's environment stays.

Repository-only: it runs ``demos/logit_lens_demo.py`` on the shipped reference model.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "demos" / "logit_lens_demo.py"
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
