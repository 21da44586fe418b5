"""``recompute_ln=True`` against Hugging Face ground truth at every norm target.

A separate Hugging Face copy of each model runs the same tokens; forward pre-hooks on its norms
capture the pre-norm residuals (``hidden_states[-1]`` is already normalized). The lens at a target
must equal that target's Hugging Face norm on each captured residual. GPT-2 (LayerNorm), GPT-NeoX
(parallel blocks) and Llama (RMSNorm) get random norm weights and biases and outputs that grow
with depth, so that a missing weight or bias, or a stale scale, shows.
"""

import copy
import functools
from typing import Dict, List, Tuple

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

from transformer_lens.ActivationCache import ActivationCache
from transformer_lens.model_bridge.sources import build_bridge_from_module

N_LAYERS = 3
TOKENS = torch.tensor([[5, 17, 33, 2, 60, 41, 8], [9, 12, 3, 3, 50, 27, 1]])
SMALL = dict(vocab_size=64, num_hidden_layers=N_LAYERS, num_attention_heads=4)
SMALL.update(intermediate_size=64, max_position_embeddings=16)
# Each architecture: the model, its blocks, their two norms, the final norm, output projections.
ARCHS = {
    "GPT2LMHeadModel": (
        lambda: GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=N_LAYERS, n_head=4, vocab_size=64)),
        ("transformer.h", "ln_1", "ln_2", "transformer.ln_f", "attn.c_proj", "mlp.c_proj"),
    ),
    "GPTNeoXForCausalLM": (
        lambda: GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=32, **SMALL)),
        ("gpt_neox.layers", "input_layernorm", "post_attention_layernorm")
        + ("gpt_neox.final_layer_norm", "attention.dense", "mlp.dense_4h_to_h"),
    ),
    "LlamaForCausalLM": (
        lambda: LlamaForCausalLM(LlamaConfig(hidden_size=32, num_key_value_heads=2, **SMALL)),
        ("model.layers", "input_layernorm", "post_attention_layernorm", "model.norm")
        + ("self_attn.o_proj", "mlp.down_proj"),
    ),
}


def _norms(hf: torch.nn.Module, blocks: str, ln1: str, ln2: str, final: str) -> Dict:
    """Every norm of a Hugging Face model, keyed ``ln1.L``, ``ln2.L`` and ``final``."""
    norms = {"final": hf.get_submodule(final)}
    for index, block in enumerate(hf.get_submodule(blocks)):
        norms.update(
            {f"ln1.{index}": block.get_submodule(ln1), f"ln2.{index}": block.get_submodule(ln2)}
        )
    return norms


@functools.lru_cache(maxsize=None)
def _case(architecture: str) -> Tuple[ActivationCache, Dict, Dict]:
    """The bridge's cache, the reference copy's norms, and the residuals captured before them."""
    build, (*paths, attention_out, mlp_out) = ARCHS[architecture]
    torch.manual_seed(0)
    hf = build().eval()
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for norm in _norms(hf, *paths).values():
            norm.weight.copy_(torch.rand(norm.weight.shape, generator=generator) * 1.5 + 0.5)
            if getattr(norm, "bias", None) is not None:
                norm.bias.copy_(torch.randn(norm.bias.shape, generator=generator) * 0.5)
        for index, block in enumerate(hf.get_submodule(paths[0])):
            for path in (attention_out, mlp_out):
                block.get_submodule(path).weight.mul_(4.0 ** (index + 1))
    reference = copy.deepcopy(hf)  # the bridge wraps `hf` in place
    norms = _norms(reference, *paths)
    captured: Dict[str, torch.Tensor] = {}
    handles = [
        norm.register_forward_pre_hook(lambda _, args, key=key: captured.update({key: args[0]}))
        for key, norm in norms.items()
    ]
    with torch.no_grad():
        reference(TOKENS)
    for handle in handles:
        handle.remove()
    model = build_bridge_from_module(hf, architecture, hf_config=hf.config)
    _, cache = model.run_with_cache(TOKENS)
    return cache, norms, captured


def _expected(architecture: str, target: str, keys: List[str]) -> torch.Tensor:
    """The target's Hugging Face norm on each captured residual."""
    _, norms, captured = _case(architecture)
    with torch.no_grad():
        return torch.stack([norms[target](captured[key]) for key in keys])


@pytest.mark.parametrize("architecture", ARCHS)
def test_every_target_is_hugging_faces_norm(architecture: str) -> None:
    cache, _, _ = _case(architecture)
    tolerance = dict(atol=5e-5, rtol=5e-5)
    for layer in range(N_LAYERS + 1):
        pre = [f"ln1.{index}" for index in range(layer)]
        target = "final" if layer == N_LAYERS else f"ln1.{layer}"
        actual = cache.accumulated_resid(layer=layer, apply_ln=True, recompute_ln=True)
        expected = _expected(architecture, target, pre + [target])
        torch.testing.assert_close(actual, expected, **tolerance)
        if layer == N_LAYERS:
            break
        if architecture == "GPTNeoXForCausalLM":  # parallel blocks: ln_2 reads resid_pre too
            stack = cache.accumulated_resid(layer=layer)
            actual = cache.apply_ln_to_stack(stack, layer, mlp_input=True, recompute_ln=True)
            expected = _expected(architecture, f"ln2.{layer}", pre + [target])
        else:
            mid = [key for index in range(layer) for key in (f"ln1.{index}", f"ln2.{index}")]
            kwargs = dict(layer=layer, mlp_input=True, incl_mid=True, apply_ln=True)
            actual = cache.accumulated_resid(recompute_ln=True, **kwargs)
            expected = _expected(architecture, f"ln2.{layer}", mid + [target, f"ln2.{layer}"])
        torch.testing.assert_close(actual, expected, **tolerance)
