"""``recompute_ln`` in ``ActivationCache.accumulated_resid`` and ``apply_ln_to_stack``.

``None`` (the default) is the target norm on each entry at the unembed and the cached scale
elsewhere, as 4.3.0 computes them; ``True`` is the target norm's own forward on each entry at every
target, for every kind of norm, hook-free; ``False`` is the target's cached scale. The tiny
bridges have random norm weights and a residual that grows with depth.
"""

import warnings
from typing import Tuple

import pytest
import torch
from transformers import (
    Gemma4Config,
    Gemma4ForConditionalGeneration,
    Gemma4TextConfig,
    Gemma4VisionConfig,
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from transformer_lens.ActivationCache import ActivationCache
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.model_bridge.generalized_components import normalization
from transformer_lens.model_bridge.generalized_components.base import (
    GeneralizedComponent,
)
from transformer_lens.model_bridge.sources import build_bridge_from_module

N_LAYERS = 3
TOKENS = torch.tensor([[1, 7, 11, 3, 5, 9], [2, 9, 4, 4, 6, 8]])
# (layer, mlp_input) of every target: ln1 and ln2 of each block, then the unembed.
TARGETS = [(layer, mlp) for layer in range(N_LAYERS) for mlp in (False, True)] + [(N_LAYERS, False)]
SMALL = dict(vocab_size=64, num_hidden_layers=N_LAYERS, num_attention_heads=4, hidden_size=32)
SMALL.update(intermediate_size=64, num_key_value_heads=2)
HF_MODELS = {
    "gpt2": lambda: GPT2LMHeadModel(
        GPT2Config(n_embd=32, n_layer=N_LAYERS, n_head=4, vocab_size=64)
    ),
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**SMALL)),
    "gemma": lambda: GemmaForCausalLM(GemmaConfig(head_dim=8, **SMALL)),  # scales by 1 + w
}


def _bridge(name: str, dtype=torch.float32, compatibility_mode=False) -> TransformerBridge:
    """Random norm weights and biases, and block outputs that grow with depth."""
    torch.manual_seed(0)
    hf_model = HF_MODELS[name]()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key, param in hf_model.named_parameters():
            if "norm" in key or "ln" in key:
                param.copy_(torch.rand(param.shape, generator=generator) + 0.5)
            elif key.endswith(("c_proj.weight", "o_proj.weight", "down_proj.weight")):
                param.mul_(4.0 ** (int(key.split(".")[2]) + 1))
    model = build_bridge_from_module(
        hf_model.to(dtype).eval(), type(hf_model).__name__, hf_config=hf_model.config, dtype=dtype
    )
    if compatibility_mode:  # LayerNorm on processed weights
        model.enable_compatibility_mode()
    return model


MODELS = {
    "gpt2-float32": ("gpt2",),
    "gpt2-bfloat16": ("gpt2", torch.bfloat16),
    "gpt2-compatibility-mode": ("gpt2", torch.float32, True),
    "llama-bfloat16": ("llama", torch.bfloat16),
    "gemma-float32": ("gemma",),
}


@pytest.fixture(scope="module", params=list(MODELS))
def lens(request) -> Tuple[TransformerBridge, ActivationCache]:
    model = _bridge(*MODELS[request.param])
    _, cache = model.run_with_cache(TOKENS)
    return model, cache


def _norm_on_each_entry(norm: torch.nn.Module, stack: torch.Tensor) -> torch.Tensor:
    """4.3.0's apply_ln_to_stack(recompute_ln=True) at the unembed: the norm module per entry."""
    return torch.stack([norm(entry) for entry in stack])


def _name(layer: int, mlp_input: bool) -> str:
    return "ln_final" if layer == N_LAYERS else f"blocks.{layer}.ln{1 + mlp_input}"


def _cached_scale(cache: ActivationCache, stack, layer: int, mlp_input: bool):
    """4.3.0's cached-scale path: centre (LayerNorm models only), divide by hook_scale."""
    if cache.model.cfg.normalization_type in ("LN", "LNPre"):
        stack = stack - stack.mean(dim=-1, keepdim=True)
    return stack / cache[f"{_name(layer, mlp_input)}.hook_scale"]


@pytest.mark.parametrize("incl_mid", [False, True])
def test_default_matches_per_entry_loop_and_cached_scale(lens, incl_mid) -> None:
    model, cache = lens
    for layer, mlp_input in TARGETS:
        kwargs = dict(layer=layer, mlp_input=mlp_input, incl_mid=incl_mid)
        raw = cache.accumulated_resid(**kwargs)
        if layer == N_LAYERS:
            expected = _norm_on_each_entry(model.ln_final, raw)
        else:
            expected = _cached_scale(cache, raw, layer, mlp_input)
        assert torch.equal(cache.accumulated_resid(apply_ln=True, **kwargs), expected)


@pytest.mark.parametrize("rows_per_step", [None, 7])
def test_each_option_at_every_target(lens, rows_per_step, monkeypatch) -> None:
    model, cache = lens
    if rows_per_step:  # many steps, the last one partial
        monkeypatch.setattr(normalization, "_ROWS_PER_STEP_BYTES", rows_per_step * 4 * 32)
    for layer, mlp_input in TARGETS:
        raw = cache.accumulated_resid(layer=layer, mlp_input=mlp_input, incl_mid=True)
        fresh = _norm_on_each_entry(model.get_submodule(_name(layer, mlp_input)), raw)
        kwargs = dict(layer=layer, mlp_input=mlp_input, incl_mid=True, apply_ln=True)
        assert torch.equal(cache.accumulated_resid(recompute_ln=True, **kwargs), fresh)
        assert torch.equal(cache.apply_ln_to_stack(raw, layer, mlp_input, recompute_ln=True), fresh)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # recompute_ln=False on unfolded weights
            cached = cache.accumulated_resid(recompute_ln=False, **kwargs)
        assert torch.equal(cached, _cached_scale(cache, raw, layer, mlp_input))
        # The embeddings' own statistics, not the target's cached scale: far apart once the
        # residual has grown, that is for every target after the first block's ln1.
        if len(raw) > 1:
            assert (fresh[0].float() - cached[0].float()).abs().max() > 0.1


def test_cached_scale_on_unfolded_weights_warns() -> None:
    """Without folded weights the cached scale is not the norm's output, even at the last row."""
    for folded in (False, True):
        model = _bridge("gpt2", compatibility_mode=folded)
        _, cache = model.run_with_cache(TOKENS)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            cache.accumulated_resid(layer=1, apply_ln=True, recompute_ln=False)
        messages = [str(warning.message) for warning in record]
        assert folded or any("enable_compatibility_mode()" in m for m in messages), messages
        assert not folded or not any("recompute_ln=False" in m for m in messages), messages


def test_no_hook_fires_and_hooks_left_on_the_norm_are_named() -> None:
    """4.3.0 ran every ln_final hook once per stack entry: a leftover hook changed the lens."""
    model = _bridge("gpt2")
    _, cache = model.run_with_cache(TOKENS)
    targets = [
        dict(layer=layer, mlp_input=mlp, apply_ln=True, recompute_ln=True) for layer, mlp in TARGETS
    ]
    expected = [cache.accumulated_resid(**kwargs) for kwargs in targets]
    calls = []
    for hook_point in model.hook_dict.values():  # each edits what it sees
        hook_point.add_hook(lambda tensor, hook: calls.append(hook.name) or 2 * tensor)
    try:
        model(TOKENS)
        assert calls, "the hooks are not live"
        calls.clear()
        for kwargs, before in zip(targets, expected):
            name = _name(kwargs["layer"], kwargs["mlp_input"]).replace(".", r"\.")
            with pytest.warns(UserWarning, match=rf"{name}\.hook_normalized.*do not run"):
                assert torch.equal(cache.accumulated_resid(**kwargs), before)
    finally:
        model.reset_hooks()
    assert calls == []


def test_cache_is_not_mutated(lens) -> None:
    _, cache = lens
    before = {key: value.clone() for key, value in cache.items()}
    for recompute_ln in (True, False):
        for layer, mlp_input in TARGETS:
            kwargs = dict(layer=layer, mlp_input=mlp_input, apply_ln=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cache.accumulated_resid(recompute_ln=recompute_ln, **kwargs).mul_(0)
    assert sorted(cache.keys()) == sorted(before)
    assert all(torch.equal(cache[key], value) for key, value in before.items())


def test_recompute_ln_without_apply_ln_raises(lens) -> None:
    _, cache = lens
    with pytest.raises(ValueError, match="together with apply_ln=True"):
        cache.accumulated_resid(recompute_ln=True)


def _gemma4(dtype: torch.dtype) -> TransformerBridge:
    """Gemma 4, whose adapter wraps every norm as a plain GeneralizedComponent."""
    text = Gemma4TextConfig(
        head_dim=8, vocab_size_per_layer_input=64, hidden_size_per_layer_input=4, **SMALL
    )
    vision = Gemma4VisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4
    )
    torch.manual_seed(0)
    hf_model = Gemma4ForConditionalGeneration(
        Gemma4Config(text_config=text, vision_config=vision, audio_config=None)
    )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key, param in hf_model.named_parameters():
            if "norm" in key:
                param.copy_(torch.rand(param.shape, generator=generator) + 0.5)
    return build_bridge_from_module(
        hf_model.to(dtype).eval(),
        "Gemma4ForConditionalGeneration",
        hf_config=hf_model.config,
        dtype=dtype,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norms_wrapped_generically(dtype) -> None:
    """The same contract where the adapter wraps a norm as a plain GeneralizedComponent: its
    forward on each entry, in that forward's dtype; its hooks do not run and are named."""
    model = _gemma4(dtype)
    _, cache = model.run_with_cache(TOKENS)
    for layer, mlp_input in TARGETS:
        norm = model.get_submodule(_name(layer, mlp_input))
        assert type(norm) is GeneralizedComponent
        kwargs = dict(layer=layer, mlp_input=mlp_input, incl_mid=True)
        expected = _norm_on_each_entry(norm, cache.accumulated_resid(**kwargs))
        fresh = cache.accumulated_resid(apply_ln=True, recompute_ln=True, **kwargs)
        assert expected.dtype == dtype and fresh.dtype == dtype
        assert torch.equal(fresh, expected)
    default = cache.accumulated_resid(apply_ln=True)
    assert torch.equal(default, _norm_on_each_entry(model.ln_final, cache.accumulated_resid()))
    calls = []
    for hook_point in (model.ln_final.hook_in, model.ln_final.hook_out):
        hook_point.add_hook(lambda tensor, hook: calls.append(hook.name) or 2 * tensor)
    try:
        with pytest.warns(UserWarning, match=r"ln_final\.hook_in, ln_final\.hook_out do not run"):
            assert torch.equal(cache.accumulated_resid(apply_ln=True), default)
    finally:
        model.reset_hooks()
    assert calls == []
