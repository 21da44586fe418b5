"""Run every code block of the logit lens docs page and check the output it shows.

The page, ``docs/source/content/logit_lens.md``, writes its examples as doctests inside
``python`` fences. They run here in page order, in one namespace, offline, and each printed
result is compared with the page (floats numerically, as pytest-doctestplus's FLOAT_CMP does), so
the page cannot drift from the code.
"""

import doctest
import io
from pathlib import Path
from typing import List, NamedTuple

import pytest
import torch
from markdown_it import MarkdownIt
from pytest_doctestplus.output_checker import (  # type: ignore[import-untyped]
    FLOAT_CMP,
    OutputChecker,
)

PAGE = Path(__file__).resolve().parents[2] / "docs" / "source" / "content" / "logit_lens.md"
CODE_LANGUAGES = {"python", "py", "pycon"}
# MyST directives that hold no code (math, admonitions) and so are not run.
NON_CODE_DIRECTIVES = {"{math}", "{note}", "{warning}", "{figure}", "{image}"}
OPTIONFLAGS = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS | FLOAT_CMP


class CodeBlock(NamedTuple):
    source: str
    line: int  # 1-based line of the opening fence


def extract_code_blocks(markdown: str) -> List[CodeBlock]:
    """Return the page's code blocks in order, failing on a fence that would go unchecked."""
    blocks = []
    for token in MarkdownIt("commonmark").parse(markdown):
        if token.type not in ("fence", "code_block"):
            continue
        line = token.map[0] + 1 if token.map else 0
        info = token.info.strip().split(" ")[0] if token.type == "fence" else ""
        if info in NON_CODE_DIRECTIVES:
            continue
        if info not in CODE_LANGUAGES:
            raise AssertionError(
                f"line {line}: code block with language {info!r} would not be run; write it as "
                f"a doctest in a python fence, or allow it in NON_CODE_DIRECTIVES"
            )
        blocks.append(CodeBlock(token.content, line))
    return blocks


def run_page(markdown: str) -> str:
    """Run every code block of ``markdown`` in one namespace; return the failure report."""
    parser = doctest.DocTestParser()
    runner = doctest.DocTestRunner(checker=OutputChecker(), optionflags=OPTIONFLAGS)
    namespace: dict = {}
    report = io.StringIO()
    grad_enabled = torch.is_grad_enabled()  # the page turns autograd off for its analysis
    try:
        for block in extract_code_blocks(markdown):
            # Doctest counts lines from the fence: its content starts on the line after it.
            test = parser.get_doctest(block.source, {}, PAGE.name, str(PAGE), block.line)
            test.globs = namespace  # DocTest copies its globals; every block shares one namespace
            if not test.examples:
                report.write(f"line {block.line}: code block without '>>>' examples\n")
            runner.run(test, out=report.write, clear_globs=False)
    finally:
        torch.set_grad_enabled(grad_enabled)
    return report.getvalue()


@pytest.fixture(scope="module")
def page() -> str:
    return PAGE.read_text(encoding="utf-8")


def test_page_has_code_blocks(page: str) -> None:
    blocks = extract_code_blocks(page)
    assert len(blocks) >= 10, f"expected the page's recipes, found {len(blocks)} code blocks"


def test_every_code_block_runs_and_prints_what_the_page_shows(page: str) -> None:
    report = run_page(page)
    assert report == "", report


@pytest.mark.parametrize(
    "shown, wrong",
    [("\nLayerNormPre\n", "\nLayerNorm\n"), ("largest shift 0.34", "largest shift 0.35")],
    ids=["text", "float"],
)
def test_a_wrong_output_on_the_page_is_caught(page: str, shown: str, wrong: str) -> None:
    assert shown in page, f"the page no longer shows {shown!r}: pick another output to alter"
    report = run_page(page.replace(shown, wrong, 1))
    assert "Failed example:" in report and wrong.strip() in report, report
