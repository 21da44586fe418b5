"""Runs the recipes of docs/source/content/logit_lens.md and checks their printed output.

The page's ``python`` blocks that hold ``>>>`` examples run in order in one namespace, as one
doctest, on a small GPT-2 bridge built from a config (no download), whose weights the page draws
from a seeded ``torch.Generator``: the printed output does not depend on the ``transformers``
version. The blocks are read out of the Markdown here, rather than by pytest's ``--doctest-glob``:
upstream's test jobs collect ``tests/`` and ``transformer_lens/`` only, and a doctest of the whole
file would read each closing fence as expected output. The page's first recipe (the
lens and its logits) is also run, as the page writes it, on a soft-capped Gemma-2 and on a Granite
with ``logits_scaling``, both built from configs: its last row must give the model's own
log-probabilities there too. The lens and cached-scale recipes also run, as written, on a
bfloat16 model.
"""

import doctest
import re
from pathlib import Path

import pytest
import torch

PAGE = Path(__file__).parents[2] / "docs" / "source" / "content" / "logit_lens.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
# The first recipe: the statements of the page that assign these names, in the page's order.
FIRST_RECIPE = ("lens, labels = ", "lens_logits = ")
# The cached-scale recipe (cumulative DLA read as logits).
CACHED_RECIPE = ("cached = ", "cached_logits = ")
# float32 log-probabilities of a 64-token vocabulary; the lens and the model run the same
# arithmetic, so they agree to rounding (observed: exactly); a missing output transform is off by
# more than 1 nat on both models below.
LOG_PROB_ATOL = 1e-5


def page_examples() -> str:
    """The page's ``python`` blocks that hold ``>>>`` examples, each line at its line of the page
    and every other line blank, so that a failure names the page's line."""
    text = PAGE.read_text(encoding="utf-8")
    lines = [""] * (text.count("\n") + 1)
    for block in BLOCK.finditer(text):
        if ">>>" in block.group(1):
            first = text.count("\n", 0, block.start(1))
            for offset, line in enumerate(block.group(1).splitlines()):
                lines[first + offset] = line
    return "\n".join(lines)


def recipe(prefixes=FIRST_RECIPE) -> str:
    """The page's statements that start with ``prefixes``, one each, in the page's order."""
    examples = doctest.DocTestParser().get_examples(page_examples())
    sources = [e.source for e in examples if e.source.startswith(prefixes)]
    assert [s.split("=")[0] for s in sources] == [p.split("=")[0] for p in prefixes], sources
    return "".join(sources)


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


def test_page_model_weights_do_not_depend_on_hugging_face_initialization():
    # The page builds its model from a config, then draws every weight from its own generator: a
    # different global seed (so different Hugging Face initial weights) gives the same model.
    examples = doctest.DocTestParser().get_examples(page_examples())
    end = next(i for i, e in enumerate(examples) if e.source.startswith("model = "))
    setup = "".join(e.source for e in examples[:end])
    assert "hf_model = " in setup and "torch.Generator()" in setup, setup
    weights = []
    grad_enabled = torch.is_grad_enabled()
    try:
        for seed in (1, 2):
            torch.manual_seed(seed)
            namespace: dict = {}
            exec(setup, namespace)
            weights.append(namespace["hf_model"].state_dict())
    finally:
        torch.set_grad_enabled(grad_enabled)
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name


SMALL = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32,
)


def gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    # A soft cap of 3 rather than Gemma-2's 30, so that these small random logits reach it.
    config = Gemma2Config(**SMALL, head_dim=8, sliding_window=16)
    config.final_logit_softcapping, config.attn_logit_softcapping = 3.0, 50.0
    return config, Gemma2ForCausalLM, "Gemma2ForCausalLM"


def granite():
    from transformers import GraniteConfig, GraniteForCausalLM

    config = GraniteConfig(**SMALL, logits_scaling=8.0)
    return config, GraniteForCausalLM, "GraniteForCausalLM"


@pytest.mark.parametrize("compatibility_mode", [False, True], ids=["raw", "compatibility"])
@pytest.mark.parametrize("make", [gemma2, granite], ids=["gemma2-softcap", "granite-scaling"])
def test_first_recipe_gives_the_models_log_probs_with_an_output_transform(make, compatibility_mode):
    from transformer_lens.model_bridge.sources import build_bridge_from_module

    config, hf_class, architecture = make()
    with torch.no_grad():
        torch.manual_seed(0)
        hf_model = hf_class(config).eval()
        for weight in hf_model.parameters():
            if weight.dim() > 1:
                weight.normal_(0.0, 0.5)  # logits large enough for the transform to matter
        model = build_bridge_from_module(hf_model, architecture, hf_config=config)
        if compatibility_mode:
            model.enable_compatibility_mode(disable_warnings=True)
        logits, cache = model.run_with_cache(torch.tensor([[1, 5, 9, 3, 7, 2, 11, 4]]))
        namespace = {"torch": torch, "model": model, "cache": cache}
        exec(recipe(), namespace)
        lens, lens_logits = namespace["lens"], namespace["lens_logits"]
        expected = logits.log_softmax(-1)
        got = lens_logits[-1].log_softmax(-1)
        assert torch.allclose(got, expected, atol=LOG_PROB_ATOL), (got - expected).abs().max()
        # The transform is what makes it right: without it the last row is off.
        untransformed = (lens[-1] @ model.W_U + model.b_U).log_softmax(-1)
        assert (untransformed - expected).abs().max() > 1.0


def test_lens_and_cached_recipes_run_as_written_in_bfloat16():
    # The cached scale is float32, so the cached stack comes back float32 on a bfloat16 model (as
    # in 4.3.0); the page's cast makes its matmul with W_U work there.
    from transformers import GPT2Config, GPT2LMHeadModel

    from transformer_lens.model_bridge.sources import build_bridge_from_module

    config = GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=4)
    with torch.no_grad():
        torch.manual_seed(0)
        hf_model = GPT2LMHeadModel(config).eval().to(torch.bfloat16)
        model = build_bridge_from_module(hf_model, "GPT2LMHeadModel", hf_config=config)
        model.enable_compatibility_mode(disable_warnings=True)
        logits, cache = model.run_with_cache(torch.tensor([[0, 14, 15, 9, 26, 5, 35, 8]]))
        namespace = {"torch": torch, "model": model, "cache": cache}
        exec(recipe(FIRST_RECIPE) + recipe(CACHED_RECIPE), namespace)
    # bfloat16 keeps 8 bits of mantissa: half a percent of the largest logit.
    atol = 5e-3 * logits.abs().max().item()
    for name in ("lens_logits", "cached_logits"):
        got = namespace[name]
        assert got.dtype == torch.bfloat16, (name, got.dtype)
        error = (got[-1].float() - logits.float()).abs().max().item()
        assert error <= atol, (name, error, atol)
