"""Runs the recipes of docs/source/content/logit_lens.md and checks their printed output.

The page's ``python`` blocks that hold ``>>>`` examples run in order in one namespace, as one
doctest, on a small GPT-2 bridge built from a config (no download).
"""

import doctest
import re
from pathlib import Path

import pytest
import torch

PAGE = Path(__file__).parents[2] / "docs" / "source" / "content" / "logit_lens.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def page_examples() -> str:
    blocks = [b for b in BLOCK.findall(PAGE.read_text(encoding="utf-8")) if ">>>" in b]
    return "\n".join(blocks)


def test_page_has_recipes():
    assert PAGE.is_file(), PAGE
    assert page_examples().count(">>>") > 20


def test_page_recipes_run_with_the_printed_output():
    flags = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS
    test = doctest.DocTestParser().get_doctest(page_examples(), {}, PAGE.name, str(PAGE), 0)
    runner = doctest.DocTestRunner(optionflags=flags)
    failures = []
    # The page turns gradients off globally, as a user session would; later tests need them.
    grad_enabled = torch.is_grad_enabled()
    try:
        runner.run(test, out=failures.append)
    finally:
        torch.set_grad_enabled(grad_enabled)
    if runner.failures:
        pytest.fail("".join(failures), pytrace=False)
