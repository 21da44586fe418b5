"""``NormalizationBridge.normalize_without_hooks`` against the component's own forward pass.

Ground truth is the bridge's forward (what the model computes) for every normalization type a
native bridge builds (LayerNorm, LayerNormPre, RMSNorm, RMSNormPre) and for a LayerNorm without
affine parameters; the hook-free path must equal it, fire no hook, and keep autograd.
"""

from types import SimpleNamespace

import pytest
import torch

from transformer_lens.config import TransformerBridgeConfig
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.model_bridge.generalized_components import NormalizationBridge


@pytest.fixture(scope="module", params=["LN", "LNPre", "RMS", "RMSPre"])
def native_model(request) -> TransformerBridge:
    config = TransformerBridgeConfig(
        d_model=16,
        d_head=8,
        n_heads=2,
        n_layers=2,
        n_ctx=8,
        d_vocab=32,
        d_mlp=24,
        act_fn="gelu",
        normalization_type=request.param,
        seed=3,
    )
    model = TransformerBridge.boot_native(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "ln" in name:  # weights away from 1 and biases away from 0, so that both show
                noise = torch.rand(param.shape) + 0.5 if name.endswith("weight") else None
                param.copy_(noise if noise is not None else torch.randn(param.shape) * 0.3)
    return model


@pytest.mark.parametrize("target", ["ln_final", "blocks.1.ln1", "blocks.1.ln2"])
def test_equals_the_forward_pass_and_fires_no_hook(native_model, target) -> None:
    norm = native_model.get_submodule(target)
    stack = torch.randn(3, 2, 5, 16) * torch.tensor([0.1, 1.0, 30.0])[:, None, None, None]
    calls = []
    for hook_point in native_model.hook_dict.values():
        hook_point.add_hook(lambda tensor, hook: calls.append(hook.name))
    try:
        normalized = norm.normalize_without_hooks(stack)
        assert calls == []
        expected = norm(stack)
    finally:
        native_model.reset_hooks()
    torch.testing.assert_close(normalized, expected, atol=1e-5, rtol=1e-5)


def test_keeps_autograd(native_model) -> None:
    stack = torch.randn(2, 3, 16, requires_grad=True)
    native_model.ln_final.normalize_without_hooks(stack).square().sum().backward()
    assert stack.grad is not None and stack.grad.abs().sum() > 0


def test_layer_norm_without_affine_parameters() -> None:
    norm = NormalizationBridge("ln_final", SimpleNamespace(eps=1e-5, uses_rms_norm=False))
    norm.set_original_component(torch.nn.LayerNorm(16, elementwise_affine=False))
    stack = torch.randn(4, 3, 16) * 5
    expected = torch.nn.functional.layer_norm(stack, (16,), eps=1e-5)
    torch.testing.assert_close(norm.normalize_without_hooks(stack), expected)


def test_half_precision_is_normalized_in_float32(native_model) -> None:
    stack = (torch.randn(3, 4, 16) * 40).to(torch.bfloat16)
    normalized = native_model.ln_final.normalize_without_hooks(stack)
    expected = native_model.ln_final.normalize_without_hooks(stack.float()).to(torch.bfloat16)
    assert normalized.dtype == torch.bfloat16
    torch.testing.assert_close(normalized, expected, atol=0, rtol=0)
