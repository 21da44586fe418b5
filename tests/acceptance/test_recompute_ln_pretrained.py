"""``recompute_ln`` on real weights: GPT-2 small (LayerNorm) and Pythia-70M (parallel blocks).

Ground truth is Hugging Face's own norm modules applied to the pre-norm residuals of a separate
Hugging Face copy of the model, captured with forward pre-hooks (``hidden_states[-1]`` is already
normalized, so it is not used). Both models are loaded as the rest of this tier loads them; the
CI caches their weights.
"""

import functools
from typing import Dict, List, Tuple

import pytest
import torch

from transformer_lens.model_bridge import TransformerBridge

PROMPT = "The Eiffel Tower is located in the city of Paris, which is the capital of"
TOLERANCE = dict(atol=5e-3, rtol=5e-3)

# Where each model keeps its norms (block list, pre-attention, pre-MLP, final norm).
NORM_PATHS = {
    "gpt2": ("transformer.h", "ln_1", "ln_2", "transformer.ln_f"),
    "EleutherAI/pythia-70m": (
        "gpt_neox.layers",
        "input_layernorm",
        "post_attention_layernorm",
        "gpt_neox.final_layer_norm",
    ),
}


@functools.lru_cache(maxsize=None)
def _hf_reference(name: str, prompt_tokens: Tuple[int, ...]):
    """A plain Hugging Face copy: its norms, the captured pre-norm residuals and its log-probs."""
    from transformers import AutoModelForCausalLM

    tokens = torch.tensor([prompt_tokens])
    hf = AutoModelForCausalLM.from_pretrained(name, torch_dtype=torch.float32).eval()
    blocks_path, ln1, ln2, final = NORM_PATHS[name]
    norms: Dict[str, torch.nn.Module] = {"final": hf.get_submodule(final)}
    for index, block in enumerate(hf.get_submodule(blocks_path)):
        norms[f"ln1.{index}"] = block.get_submodule(ln1)
        norms[f"ln2.{index}"] = block.get_submodule(ln2)

    captured: Dict[str, torch.Tensor] = {}
    handles = []
    for key, norm in norms.items():

        def capture(module, args, key=key):
            captured[key] = args[0].detach().clone()

        handles.append(norm.register_forward_pre_hook(capture))
    with torch.no_grad():
        log_probs = torch.log_softmax(hf(tokens).logits, -1)
    for handle in handles:
        handle.remove()
    return hf, norms, captured, log_probs


def _apply(norm: torch.nn.Module, inputs: Dict[str, torch.Tensor], keys: List[str]):
    with torch.no_grad():
        return torch.stack([norm(inputs[key]) for key in keys])


def _lens_log_probs(model: TransformerBridge, lens: torch.Tensor) -> torch.Tensor:
    logits = lens @ model.W_U
    if getattr(model, "b_U", None) is not None:
        logits = logits + model.b_U
    return torch.log_softmax(logits, -1)


def _bridge_and_reference(name: str):
    model = TransformerBridge.boot_transformers(name, device="cpu", dtype=torch.float32)
    tokens = model.to_tokens(PROMPT)
    return model, tokens, _hf_reference(name, tuple(tokens[0].tolist()))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(NORM_PATHS))
@torch.no_grad()
def test_recompute_ln_matches_hf_norms_on_hf_residuals(name: str):
    """Every target (ln1 and, for GPT-2, ln2 of each block; the unembed) equals the Hugging Face
    norm module on Hugging Face's residuals; the default equals the fresh lens at the unembed, bit
    for bit; and the last lens entry reproduces the model's log-probabilities.
    """
    model, tokens, (hf, norms, inputs, hf_log_probs) = _bridge_and_reference(name)
    n_layers = model.cfg.n_layers
    parallel = bool(model.cfg.parallel_attn_mlp)

    _, cache = model.run_with_cache(tokens)
    pre = [f"ln1.{index}" for index in range(n_layers)]
    for layer in range(n_layers):
        actual = cache.accumulated_resid(layer=layer, apply_ln=True, recompute_ln=True)
        expected = _apply(norms[f"ln1.{layer}"], inputs, pre[: layer + 1])
        torch.testing.assert_close(actual, expected, **TOLERANCE)
        if not parallel:
            actual = cache.accumulated_resid(
                layer=layer, mlp_input=True, apply_ln=True, recompute_ln=True
            )
            expected = _apply(norms[f"ln2.{layer}"], inputs, pre[: layer + 1] + [f"ln2.{layer}"])
            torch.testing.assert_close(actual, expected, **TOLERANCE)
    lens = cache.accumulated_resid(apply_ln=True, recompute_ln=True)
    torch.testing.assert_close(lens, _apply(norms["final"], inputs, pre + ["final"]), **TOLERANCE)
    assert torch.equal(lens, cache.accumulated_resid(apply_ln=True))
    torch.testing.assert_close(_lens_log_probs(model, lens)[-1], hf_log_probs, **TOLERANCE)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(NORM_PATHS))
@torch.no_grad()
def test_recompute_ln_in_compatibility_mode(name: str):
    """Compatibility mode folds the norms into the next layers and centres the unembedding: the
    log-probabilities of every lens entry are what is invariant."""
    model, tokens, (hf, norms, inputs, hf_log_probs) = _bridge_and_reference(name)
    pre = [f"ln1.{index}" for index in range(model.cfg.n_layers)]
    expected_log_probs = torch.log_softmax(
        hf.get_output_embeddings()(_apply(norms["final"], inputs, pre + ["final"])), -1
    )
    model.enable_compatibility_mode()
    _, compat_cache = model.run_with_cache(tokens)
    compat_lens = compat_cache.accumulated_resid(apply_ln=True, recompute_ln=True)
    compat_log_probs = _lens_log_probs(model, compat_lens)
    torch.testing.assert_close(compat_log_probs, expected_log_probs, **TOLERANCE)
    torch.testing.assert_close(compat_log_probs[-1], hf_log_probs, **TOLERANCE)
