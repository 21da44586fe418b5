"""``recompute_ln`` on real weights: GPT-2 small (LayerNorm) and Pythia-70M (parallel blocks).

Ground truth is Hugging Face's own norm modules applied to the pre-norm residuals of a separate
Hugging Face copy of the model, captured with forward pre-hooks (``hidden_states[-1]`` is already
normalized, so it is not used). Both models are in CI's model cache; each bridge and each Hugging
Face copy loads once per session (the fixtures below). The bridges are this file's own, not the
root conftest's ``gpt2_bridge``: other acceptance tests of the session change that one's dtype.
"""

from typing import Dict

import pytest
import torch
from transformers import AutoModelForCausalLM

PROMPT = "The Eiffel Tower is located in the city of Paris, which is the capital of"
# Where each model keeps its norms: blocks, pre-attention, pre-MLP (None: parallel), final norm.
NORM_PATHS = {
    "gpt2": ("transformer.h", "ln_1", "ln_2", "transformer.ln_f"),
    "EleutherAI/pythia-70m": (
        "gpt_neox.layers",
        "input_layernorm",
        None,
        "gpt_neox.final_layer_norm",
    ),
}
# The session fixtures of each model: its bridge (raw, float32) and its Hugging Face copy.
FIXTURES = {
    "gpt2": ("gpt2_bridge_float32", "gpt2_hf_model"),
    "EleutherAI/pythia-70m": ("pythia_70m_bridge", "pythia_70m_hf_model"),
}


def _hf_model(name: str):
    return AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32).eval()


def _bridge(name: str):
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_transformers(name, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def gpt2_bridge_float32():
    """TransformerBridge wrapping gpt2, float32, no compatibility mode. Read-only use only."""
    return _bridge("gpt2")


@pytest.fixture(scope="session")
def pythia_70m_bridge():
    """TransformerBridge wrapping EleutherAI/pythia-70m (no compatibility mode). Read-only use."""
    return _bridge("EleutherAI/pythia-70m")


@pytest.fixture(scope="session")
def gpt2_hf_model():
    """Hugging Face's gpt2, float32, eval mode: the reference. Read-only use."""
    return _hf_model("gpt2")


@pytest.fixture(scope="session")
def pythia_70m_hf_model():
    """Hugging Face's EleutherAI/pythia-70m, float32, eval mode: the reference. Read-only use."""
    return _hf_model("EleutherAI/pythia-70m")


@pytest.fixture
def models(name: str, request):
    """The bridge and the Hugging Face copy of model ``name``, from their session fixtures."""
    bridge_fixture, hf_fixture = FIXTURES[name]
    return request.getfixturevalue(bridge_fixture), request.getfixturevalue(hf_fixture)


@pytest.mark.parametrize("name", list(NORM_PATHS))
@torch.no_grad()
def test_recompute_ln_matches_hf_norms_on_hf_residuals(name: str, models):
    """Every target (ln1 and, for GPT-2, ln2 of each block; the unembed) equals the Hugging Face
    norm module on Hugging Face's residuals; the default equals the fresh lens at the unembed."""
    model, hf = models
    assert model.cfg.dtype == torch.float32 and not getattr(model, "compatibility_mode", False)
    tokens = model.to_tokens(PROMPT)
    _, cache = model.run_with_cache(tokens)
    blocks, ln1, ln2, final = NORM_PATHS[name]
    norms = {"final": hf.get_submodule(final)}
    for index, block in enumerate(hf.get_submodule(blocks)):
        norms[f"ln1.{index}"] = block.get_submodule(ln1)
        if ln2 is not None:
            norms[f"ln2.{index}"] = block.get_submodule(ln2)
    inputs: Dict[str, torch.Tensor] = {}
    handles = [
        norm.register_forward_pre_hook(lambda _, args, key=key: inputs.update({key: args[0]}))
        for key, norm in norms.items()
    ]
    try:
        hf.base_model(tokens)  # every norm is in the base model; the logits are not needed
    finally:  # the reference calls below must not overwrite the captures; the model is shared
        for handle in handles:
            handle.remove()

    def expected(target: str, keys: list) -> torch.Tensor:
        return torch.stack([norms[target](inputs[key]) for key in keys])

    tolerance = dict(atol=5e-3, rtol=5e-3)
    pre = [f"ln1.{index}" for index in range(model.cfg.n_layers)]
    for layer in range(model.cfg.n_layers):
        actual = cache.accumulated_resid(layer=layer, apply_ln=True, recompute_ln=True)
        torch.testing.assert_close(actual, expected(f"ln1.{layer}", pre[: layer + 1]), **tolerance)
        if ln2 is not None:
            keys = pre[: layer + 1] + [f"ln2.{layer}"]
            kwargs = dict(layer=layer, mlp_input=True, apply_ln=True, recompute_ln=True)
            actual = cache.accumulated_resid(**kwargs)
            torch.testing.assert_close(actual, expected(f"ln2.{layer}", keys), **tolerance)
    lens = cache.accumulated_resid(apply_ln=True, recompute_ln=True)
    torch.testing.assert_close(lens, expected("final", pre + ["final"]), **tolerance)
    assert torch.equal(lens, cache.accumulated_resid(apply_ln=True))
