"""``NormalizationBridge.normalize_without_hooks`` is the norm's own forward, bit for bit, hook-free.

The reference is the component's ``forward`` (what the model computes, and what 4.3.0's logit lens
called once per stack entry), compared with ``torch.equal``: for every kind of norm the bridge
wraps (LayerNorm on the from-scratch path, LayerNorm after weight processing, RMSNorm, Gemma's
``1 + w`` RMSNorm, the native LN / LNPre / RMS / RMSPre, a LayerNorm without affine parameters and
an ``Identity`` slot), in float32 and bfloat16, on inputs walked in one step and in many.
"""

from types import SimpleNamespace
from typing import Callable, Dict, List, Optional, Tuple

import pytest
import torch
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from transformer_lens.config import TransformerBridgeConfig
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.model_bridge.generalized_components import NormalizationBridge
from transformer_lens.model_bridge.generalized_components import (
    normalization as normalization_module,
)
from transformer_lens.model_bridge.sources import build_bridge_from_module

D_MODEL = 16
SMALL = dict(vocab_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
TARGETS = ("ln_final", "blocks.1.ln1", "blocks.1.ln2")


def _randomize_norms(model: torch.nn.Module) -> None:
    """Weights away from 1 and biases away from 0, so that a misapplied one shows."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "ln" in name:
                param.copy_(torch.rand(param.shape, generator=generator) + 0.5)


def _from_hf(hf_model: torch.nn.Module, architecture: str, dtype: torch.dtype) -> TransformerBridge:
    _randomize_norms(hf_model)
    hf_model.to(dtype)
    return build_bridge_from_module(
        hf_model.eval(), architecture, hf_config=hf_model.config, dtype=dtype, device="cpu"
    )


def _gpt2(dtype: torch.dtype) -> TransformerBridge:
    config = GPT2Config(n_embd=D_MODEL, n_layer=2, n_head=2, vocab_size=48, n_positions=16)
    return _from_hf(GPT2LMHeadModel(config), "GPT2LMHeadModel", dtype)


def _gpt2_compat(dtype: torch.dtype) -> TransformerBridge:
    model = _gpt2(dtype)
    model.enable_compatibility_mode()
    return model


def _llama(dtype: torch.dtype) -> TransformerBridge:
    config = LlamaConfig(hidden_size=D_MODEL, num_key_value_heads=2, **SMALL)
    return _from_hf(LlamaForCausalLM(config), "LlamaForCausalLM", dtype)


def _gemma(dtype: torch.dtype) -> TransformerBridge:
    config = GemmaConfig(hidden_size=D_MODEL, num_key_value_heads=1, head_dim=8, **SMALL)
    return _from_hf(GemmaForCausalLM(config), "GemmaForCausalLM", dtype)


def _native(normalization_type: str) -> Callable[[torch.dtype], TransformerBridge]:
    def build(dtype: torch.dtype) -> TransformerBridge:
        config = TransformerBridgeConfig(
            d_model=D_MODEL,
            d_head=8,
            n_heads=2,
            n_layers=2,
            n_ctx=16,
            d_vocab=48,
            d_mlp=32,
            act_fn="gelu",
            normalization_type=normalization_type,
            dtype=dtype,
        )
        model = TransformerBridge.boot_native(config).eval()
        _randomize_norms(model)
        return model.to(dtype)

    return build


MODELS: Dict[str, Callable[[torch.dtype], TransformerBridge]] = {
    "gpt2-layernorm-from-scratch": _gpt2,
    "gpt2-layernorm-processed-weights": _gpt2_compat,
    "llama-rmsnorm": _llama,
    "gemma-rmsnorm-1-plus-w": _gemma,
    "native-LN": _native("LN"),
    "native-LNPre": _native("LNPre"),
    "native-RMS": _native("RMS"),
    "native-RMSPre": _native("RMSPre"),
}
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(scope="module", params=[(m, d) for m in MODELS for d in DTYPES], ids=str)
def model(request) -> TransformerBridge:
    name, dtype = request.param
    return MODELS[name](dtype)


def _stack(dtype: torch.dtype, shape: Tuple[int, ...] = (3, 2, 5, D_MODEL)) -> torch.Tensor:
    """Entries at very different scales, as a residual stream that grows with depth is."""
    generator = torch.Generator().manual_seed(1)
    scales = torch.tensor([0.1, 1.0, 300.0])[:, None, None, None]
    return (torch.randn(shape, generator=generator) * scales + 0.5).to(dtype)


ROWS_PER_STEP = [None, 7]  # one step over the whole input; many steps of 7 rows, with a remainder


def _walking(monkeypatch, rows: Optional[int]) -> None:
    bytes_per_step = 7 * 4 * D_MODEL if rows else 1 << 19
    monkeypatch.setattr(normalization_module, "_ROWS_PER_STEP_BYTES", bytes_per_step)


@pytest.mark.parametrize("rows", ROWS_PER_STEP)
def test_equals_the_forward_entry_by_entry(model, rows, monkeypatch) -> None:
    _walking(monkeypatch, rows)
    stack = _stack(model.cfg.dtype)
    for target in TARGETS:
        norm = model.get_submodule(target)
        with torch.no_grad():
            normalized = norm.normalize_without_hooks(stack)
            entry_by_entry = torch.stack([norm(entry) for entry in stack])
            whole = norm(stack)
        assert normalized.dtype == model.cfg.dtype and normalized.shape == stack.shape
        assert torch.equal(normalized, entry_by_entry), target
        assert torch.equal(normalized, whole), target


@pytest.mark.parametrize("shape", [(D_MODEL,), (5, D_MODEL), (2, 1, 3, 4, D_MODEL)])
def test_any_leading_shape(model, shape, monkeypatch) -> None:
    _walking(monkeypatch, 7)
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 5).to(model.cfg.dtype)
    with torch.no_grad():
        assert torch.equal(model.ln_final.normalize_without_hooks(x), model.ln_final(x))


def test_fires_no_hook(model, monkeypatch) -> None:
    _walking(monkeypatch, 7)
    calls: List[str] = []
    for hook_point in model.hook_dict.values():
        hook_point.add_hook(lambda tensor, hook: calls.append(hook.name))
    handles = [
        model.get_submodule(target).register_forward_hook(lambda *args: calls.append("bridge"))
        for target in TARGETS
    ]
    stack = _stack(model.cfg.dtype)
    try:
        with torch.no_grad():
            model.ln_final(stack)
            assert calls, "the counting hooks are not live"
            calls.clear()
            for target in TARGETS:
                model.get_submodule(target).normalize_without_hooks(stack)
    finally:
        model.reset_hooks()
        for handle in handles:
            handle.remove()
    assert calls == []


@pytest.mark.parametrize("name", MODELS)
def test_keeps_autograd(name, monkeypatch) -> None:
    _walking(monkeypatch, 7)
    norm = MODELS[name](torch.float32).blocks[1].ln1
    weights = torch.randn(3, 2, 5, D_MODEL, generator=torch.Generator().manual_seed(2))
    grads = []
    for normalize in (norm.normalize_without_hooks, norm):
        stack = _stack(torch.float32).requires_grad_(True)
        (normalize(stack) * weights).sum().backward()
        grads.append(stack.grad)
    assert grads[0] is not None and grads[0].abs().sum() > 0
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "module", [torch.nn.LayerNorm(D_MODEL, elementwise_affine=False), torch.nn.Identity()], ids=str
)
def test_modules_without_parameters(module, dtype, monkeypatch) -> None:
    """A LayerNorm without weight or bias, and a slot that does not normalize (ModernBERT's
    first decoder layer), both on the path that runs the wrapped module."""
    _walking(monkeypatch, 7)
    norm = NormalizationBridge("ln", SimpleNamespace(eps=1e-5), use_native_layernorm_autograd=True)
    norm.set_original_component(module)
    stack = _stack(dtype)
    with torch.no_grad():
        assert torch.equal(norm.normalize_without_hooks(stack), norm(stack))


def test_unset_component_raises() -> None:
    norm = NormalizationBridge("ln", SimpleNamespace(eps=1e-5))
    with pytest.raises(RuntimeError, match="set_original_component"):
        norm.normalize_without_hooks(torch.ones(2, D_MODEL))
