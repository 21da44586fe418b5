"""``recompute_ln`` in ``ActivationCache.accumulated_resid`` and ``apply_ln_to_stack``.

* ``None`` (the default) is 4.3.0, bit for bit: the final norm's forward on each stack entry at the
  unembed (4.3.0's loop, written out below), the cached ``hook_scale`` at ``ln1``/``ln2`` targets.
* ``True`` is the target norm's own forward on each entry, at every target.
* ``False`` divides by the target's cached scale at every target, the unembed included (DLA).

The models are tiny bridges built from configs, with random norm weights and a residual that grows
with depth, so that a missing weight or bias or a stale scale shows. Every comparison is
``torch.equal``. Hugging Face ground truth is in ``tests/integration/test_recompute_ln_hf_ground_truth.py``.
"""

import inspect
from typing import Dict, List, Optional, Tuple

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    RecurrentGemmaConfig,
    RecurrentGemmaForCausalLM,
)

from transformer_lens.ActivationCache import ActivationCache
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.model_bridge.sources import build_bridge_from_module

D_MODEL = 32
N_LAYERS = 3
TOKENS = torch.tensor([[1, 7, 11, 3, 5, 9], [2, 9, 4, 4, 6, 8]])
RECOMPUTE = [None, True, False]
# (layer, mlp_input) of every target: ln1 and ln2 of each block, then the unembed.
TARGETS = [(layer, mlp) for layer in range(N_LAYERS) for mlp in (False, True)] + [(N_LAYERS, False)]
SMALL = dict(vocab_size=64, num_hidden_layers=N_LAYERS, num_attention_heads=4, intermediate_size=64)


def _bridge(hf_model: torch.nn.Module, architecture: str, dtype=torch.float32) -> TransformerBridge:
    """Random norm weights and biases, and block outputs that grow with depth."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in hf_model.named_parameters():
            if "norm" in name or "ln" in name:
                param.copy_(torch.rand(param.shape, generator=generator) + 0.5)
            elif name.endswith(("c_proj.weight", "o_proj.weight", "down_proj.weight")):
                param.mul_(4.0 ** (int(name.split(".")[2]) + 1))
    hf_model.to(dtype)
    return build_bridge_from_module(
        hf_model.eval(), architecture, hf_config=hf_model.config, dtype=dtype, device="cpu"
    )


def _gpt2(dtype=torch.float32) -> TransformerBridge:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=D_MODEL, n_layer=N_LAYERS, n_head=4)
    return _bridge(GPT2LMHeadModel(config), "GPT2LMHeadModel", dtype)


def _gpt2_compat() -> TransformerBridge:
    model = _gpt2()
    model.enable_compatibility_mode()
    return model


def _llama(dtype=torch.float32) -> TransformerBridge:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=D_MODEL, num_key_value_heads=2, **SMALL)
    return _bridge(LlamaForCausalLM(config), "LlamaForCausalLM", dtype)


MODELS = {
    "gpt2-float32": _gpt2,
    "gpt2-bfloat16": lambda: _gpt2(torch.bfloat16),
    "gpt2-compatibility-mode": _gpt2_compat,
    "llama-float32": _llama,
    "llama-bfloat16": lambda: _llama(torch.bfloat16),
}


@pytest.fixture(scope="module", params=list(MODELS))
def lens(request) -> Tuple[TransformerBridge, ActivationCache]:
    model = MODELS[request.param]()
    _, cache = model.run_with_cache(TOKENS)
    return model, cache


@pytest.fixture(scope="module")
def gpt2() -> Tuple[TransformerBridge, ActivationCache]:
    model = _gpt2()
    _, cache = model.run_with_cache(TOKENS)
    return model, cache


def _norm(model: TransformerBridge, layer: int, mlp_input: bool) -> torch.nn.Module:
    if layer == model.cfg.n_layers:
        return model.ln_final
    return model.blocks[layer].ln2 if mlp_input else model.blocks[layer].ln1


def _loop_of_4_3_0(norm: torch.nn.Module, stack: torch.Tensor, has_batch_dim=True) -> torch.Tensor:
    """4.3.0's apply_ln_to_stack(recompute_ln=True): the norm module called on each entry."""
    results = []
    for entry in stack:
        x = entry if has_batch_dim else entry.unsqueeze(0)
        results.append(norm(x.unsqueeze(1) if x.ndim == 2 else x).reshape(entry.shape))
    return torch.stack(results)


def _cached_scale_of_4_3_0(cache, stack, layer: int, mlp_input: bool, pos_slice=None):
    """4.3.0's cached-scale path: centre (LayerNorm models only), divide by hook_scale."""
    name = "ln_final" if layer == cache.model.cfg.n_layers else f"blocks.{layer}.ln{1 + mlp_input}"
    scale = cache[f"{name}.hook_scale"]
    if pos_slice is not None:
        scale = scale[..., pos_slice, :]
    if cache.model.cfg.normalization_type in ("LN", "LNPre"):
        stack = stack - stack.mean(dim=-1, keepdim=True)
    return stack / scale


@pytest.mark.parametrize("pos_slice", [None, -1])
@pytest.mark.parametrize("incl_mid", [False, True])
def test_default_is_4_3_0_bit_for_bit(lens, incl_mid, pos_slice) -> None:
    model, cache = lens
    for layer, mlp_input in TARGETS:
        kwargs = dict(layer=layer, mlp_input=mlp_input, incl_mid=incl_mid, pos_slice=pos_slice)
        raw = cache.accumulated_resid(**kwargs)
        if layer == N_LAYERS:
            expected = _loop_of_4_3_0(model.ln_final, raw)
        else:
            index = -1 if pos_slice == -1 else None
            expected = _cached_scale_of_4_3_0(cache, raw, layer, mlp_input, index)
        assert torch.equal(cache.accumulated_resid(apply_ln=True, **kwargs), expected)
        assert torch.equal(
            cache.accumulated_resid(apply_ln=True, recompute_ln=None, **kwargs), expected
        )


def test_recompute_true_is_the_target_norms_forward_at_every_target(lens) -> None:
    model, cache = lens
    for layer, mlp_input in TARGETS:
        raw = cache.accumulated_resid(layer=layer, mlp_input=mlp_input, incl_mid=True)
        expected = _loop_of_4_3_0(_norm(model, layer, mlp_input), raw)
        kwargs = dict(layer=layer, mlp_input=mlp_input, incl_mid=True, apply_ln=True)
        assert torch.equal(cache.accumulated_resid(recompute_ln=True, **kwargs), expected)
        assert torch.equal(
            cache.apply_ln_to_stack(raw, layer, mlp_input=mlp_input, recompute_ln=True), expected
        )
        # The embeddings' own statistics, not the target's cached scale: far apart once the
        # residual has grown, that is for every target after the first block's ln1.
        cached = cache.accumulated_resid(recompute_ln=False, **kwargs)
        if len(raw) > 1:
            assert (expected[0].float() - cached[0].float()).abs().max() > 0.1


def test_recompute_false_is_the_cached_scale_at_every_target(lens) -> None:
    _, cache = lens
    for layer, mlp_input in TARGETS:
        raw = cache.accumulated_resid(layer=layer, mlp_input=mlp_input)
        expected = _cached_scale_of_4_3_0(cache, raw, layer, mlp_input)
        actual = cache.accumulated_resid(
            layer=layer, mlp_input=mlp_input, apply_ln=True, recompute_ln=False
        )
        assert torch.equal(actual, expected)


@pytest.mark.parametrize("selector", [dict(top_k=5), dict(targets=[3, 9]), dict()])
def test_logit_lens_tool_is_4_3_0_bit_for_bit(lens, selector, monkeypatch) -> None:
    """The tool normalizes through apply_ln_to_stack: its values, entropy, ranks and top-k are
    those of the same call with 4.3.0's loop put back in."""
    model, cache = lens
    ours = cache.logit_lens(positions=None, incl_mid=True, return_type="log_probs", **selector)

    def apply_ln_to_stack_of_4_3_0(self, stack, *args, has_batch_dim=True, **kwargs):
        return _loop_of_4_3_0(model.ln_final, stack, has_batch_dim)

    monkeypatch.setattr(ActivationCache, "apply_ln_to_stack", apply_ln_to_stack_of_4_3_0)
    theirs = cache.logit_lens(positions=None, incl_mid=True, return_type="log_probs", **selector)
    for field in ("values", "entropy", "top_ids", "target_ranks"):
        mine, reference = getattr(ours.readout, field), getattr(theirs.readout, field)
        assert (mine is None and reference is None) or torch.equal(mine, reference), field


def test_apply_ln_to_stack_with_batch_slice_and_a_stack_of_its_own(gpt2) -> None:
    model, cache = gpt2
    stack = torch.randn(4, *TOKENS.shape, D_MODEL, generator=torch.Generator().manual_seed(3))
    actual = cache.apply_ln_to_stack(stack * 9, layer=2, batch_slice=[1], recompute_ln=True)
    assert torch.equal(actual, _loop_of_4_3_0(model.blocks[2].ln1, stack[:, 1:2] * 9))


@pytest.mark.parametrize("recompute_ln", RECOMPUTE)
def test_batchless_cache_is_the_batched_result_without_its_batch(gpt2, recompute_ln) -> None:
    model, _ = gpt2
    _, batched = model.run_with_cache(TOKENS[:1])
    _, batchless = model.run_with_cache(TOKENS[:1], remove_batch_dim=True)
    for layer, mlp_input in TARGETS:
        kwargs = dict(layer=layer, mlp_input=mlp_input, apply_ln=True, recompute_ln=recompute_ln)
        expected = batched.accumulated_resid(**kwargs)[:, 0]
        assert torch.equal(batchless.accumulated_resid(**kwargs), expected)


class _HookCounter:
    """Counts calls of every TransformerLens hook point and of every norm module's torch hooks."""

    def __init__(self, model: TransformerBridge):
        self.calls: List[str] = []
        self.model = model
        for hook_point in model.hook_dict.values():
            hook_point.add_hook(lambda tensor, hook: self.calls.append(hook.name))
        self.handles = [
            _norm(model, layer, mlp).register_forward_hook(lambda *args: self.calls.append("norm"))
            for layer, mlp in TARGETS
        ]

    def remove(self) -> None:
        self.model.reset_hooks()
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("recompute_ln", RECOMPUTE)
def test_no_hook_fires(recompute_ln) -> None:
    """4.3.0 fired every ln_final hook once per stack entry: a leftover hook changed the lens."""
    model = _gpt2()
    _, cache = model.run_with_cache(TOKENS)
    counter = _HookCounter(model)
    try:
        model(TOKENS)
        assert "ln_final.hook_scale" in counter.calls and "norm" in counter.calls
        counter.calls.clear()
        for layer, mlp_input in TARGETS:
            kwargs = dict(layer=layer, mlp_input=mlp_input)
            stack = cache.accumulated_resid(apply_ln=True, recompute_ln=recompute_ln, **kwargs)
            cache.apply_ln_to_stack(stack, recompute_ln=bool(recompute_ln), **kwargs)
    finally:
        counter.remove()
    assert counter.calls == []


def test_cache_is_not_mutated(gpt2) -> None:
    _, cache = gpt2
    before: Dict[str, torch.Tensor] = {key: value.clone() for key, value in cache.items()}
    for recompute_ln in RECOMPUTE:
        for layer, mlp_input in TARGETS:
            kwargs = dict(layer=layer, mlp_input=mlp_input)
            cache.accumulated_resid(apply_ln=True, recompute_ln=recompute_ln, **kwargs).mul_(0)
            stack = cache.accumulated_resid(**kwargs)
            cache.apply_ln_to_stack(stack, recompute_ln=bool(recompute_ln), **kwargs).add_(1)
    assert sorted(cache.keys()) == sorted(before)
    for key, value in before.items():
        assert torch.equal(cache[key], value), key


@pytest.mark.parametrize("recompute_ln", [True, False])
@pytest.mark.parametrize("layer,mlp_input", [(1, False), (1, True), (N_LAYERS, False)])
def test_gradient_flows_as_through_the_reference(gpt2, recompute_ln, layer, mlp_input) -> None:
    model, cache = gpt2
    base = cache.accumulated_resid(layer=layer, mlp_input=mlp_input)
    weights = torch.randn(base.shape, generator=torch.Generator().manual_seed(5))
    grads = []
    for reference in (False, True):
        stack = base.clone().requires_grad_(True)
        if not reference:
            out = cache.apply_ln_to_stack(stack, layer, mlp_input, recompute_ln=recompute_ln)
        elif recompute_ln:
            out = _loop_of_4_3_0(_norm(model, layer, mlp_input), stack)
        else:
            out = _cached_scale_of_4_3_0(cache, stack, layer, mlp_input)
        (grad,) = torch.autograd.grad((out * weights).sum(), stack)
        grads.append(grad)
    assert grads[0].abs().sum() > 0
    assert torch.equal(grads[0], grads[1])


# Without the runtime type checker the test suite installs (jaxtyping's import hook), so that a
# badly typed argument reaches the method as it does in a user's session.
accumulated_resid = inspect.unwrap(ActivationCache.accumulated_resid)
apply_ln_to_stack = inspect.unwrap(ActivationCache.apply_ln_to_stack)


class TestInvalidArguments:
    """What has no meaning raises a ValueError that names the problem and the fix."""

    @pytest.mark.parametrize("layer", [-2, N_LAYERS + 1, 1.0, "1", True])
    def test_layer_not_a_layer(self, gpt2, layer) -> None:
        _, cache = gpt2
        match = (
            rf"layer={layer!r}.*\[0, {N_LAYERS - 1}\] for the input to that block, or {N_LAYERS}"
        )
        with pytest.raises(ValueError, match=match):
            accumulated_resid(cache, layer=layer, apply_ln=True)
        with pytest.raises(ValueError, match=match):
            apply_ln_to_stack(cache, cache.accumulated_resid(), layer=layer)

    @pytest.mark.parametrize("recompute_ln", [1, "True", 0.0])
    def test_recompute_ln_not_a_bool(self, gpt2, recompute_ln) -> None:
        _, cache = gpt2
        with pytest.raises(ValueError, match="recompute_ln must be None, True or False"):
            accumulated_resid(cache, apply_ln=True, recompute_ln=recompute_ln)

    def test_recompute_without_apply_ln(self, gpt2) -> None:
        _, cache = gpt2
        with pytest.raises(ValueError, match="pass apply_ln=True"):
            cache.accumulated_resid(recompute_ln=True)

    @pytest.mark.parametrize("recompute_ln", RECOMPUTE)
    def test_mlp_input_at_the_unembed(self, gpt2, recompute_ln) -> None:
        """4.3.0 ignored mlp_input there silently: there is no MLP after the last block."""
        _, cache = gpt2
        with pytest.raises(ValueError, match="mlp_input=False"):
            cache.accumulated_resid(mlp_input=True, apply_ln=True, recompute_ln=recompute_ln)

    def test_width_is_checked_only_where_it_matters(self) -> None:
        """Fresh statistics need d_model; a projected stack divided by a cached RMS scale, which
        4.3.0 computed correctly, is still accepted."""
        model = _llama()
        _, cache = model.run_with_cache(TOKENS)
        projected = torch.randn(2, *TOKENS.shape, 5)
        with pytest.raises(ValueError, match="d_model=32"):
            cache.apply_ln_to_stack(projected, layer=1, recompute_ln=True)
        expected = projected / cache["blocks.1.ln1.hook_scale"]
        assert torch.equal(cache.apply_ln_to_stack(projected, layer=1), expected)

    @pytest.mark.parametrize("recompute_ln", RECOMPUTE)
    @pytest.mark.parametrize("layer,mlp_input", TARGETS)
    def test_names_filter_without_a_hook_the_call_reads(self, gpt2, recompute_ln, layer, mlp_input):
        """4.3.0: KeyError 'blocks.2.hook_resid_post', or IndexError from _get_cached_ln_scale."""
        model, _ = gpt2
        for kept in ("hook_resid", "hook_scale"):
            _, cache = model.run_with_cache(TOKENS, names_filter=lambda name: kept in name)
            kwargs = dict(
                layer=layer, mlp_input=mlp_input, apply_ln=True, recompute_ln=recompute_ln
            )
            fresh = recompute_ln or (recompute_ln is None and layer == N_LAYERS)
            if kept == "hook_resid" and fresh:
                cache.accumulated_resid(**kwargs)  # reads no scale
                continue
            with pytest.raises(ValueError, match="names_filter of run_with_cache"):
                cache.accumulated_resid(**kwargs)

    @pytest.mark.parametrize("kwargs", [dict(incl_mid=True), dict(layer=1, mlp_input=True)])
    def test_resid_mid_on_parallel_blocks(self, kwargs) -> None:
        """GPT-NeoX's attention and MLP read the same resid_pre: there is no resid_mid."""
        torch.manual_seed(0)
        config = GPTNeoXConfig(hidden_size=D_MODEL, max_position_embeddings=16, **SMALL)
        model = build_bridge_from_module(
            GPTNeoXForCausalLM(config).eval(), "GPTNeoXForCausalLM", hf_config=config
        )
        _, cache = model.run_with_cache(TOKENS)
        with pytest.raises(
            ValueError, match="does not compute.*incl_mid=False and mlp_input=False"
        ):
            cache.accumulated_resid(apply_ln=True, **kwargs)
        stack = cache.accumulated_resid(layer=1)  # its ln2 exists: a given stack can be its input
        actual = cache.apply_ln_to_stack(stack, layer=1, mlp_input=True, recompute_ln=True)
        assert torch.equal(actual, _loop_of_4_3_0(model.blocks[1].ln2, stack))

    def test_resid_mid_is_probed_in_the_cache_not_the_config(self) -> None:
        """RecurrentGemma's config says neither parallel nor attention-only, and it has no
        resid_mid (4.3.0 and the earlier config-based check: KeyError 'blocks.0.hook_resid_mid')."""
        config = RecurrentGemmaConfig(
            hidden_size=D_MODEL, lru_width=D_MODEL, head_dim=8, num_key_value_heads=1, **SMALL
        )
        model = build_bridge_from_module(
            RecurrentGemmaForCausalLM(config).eval(), "RecurrentGemmaForCausalLM", hf_config=config
        )
        _, cache = model.run_with_cache(TOKENS)
        assert not model.cfg.parallel_attn_mlp and not model.cfg.attn_only
        with pytest.raises(
            ValueError, match="'blocks.0.hook_resid_mid', which this model does not"
        ):
            cache.accumulated_resid(incl_mid=True, apply_ln=True)

    @pytest.mark.parametrize("recompute_ln", RECOMPUTE)
    def test_missing_norm_offers_only_what_works(self, recompute_ln: Optional[bool]) -> None:
        """OLMo-2 normalizes sublayer outputs: no ln1, so neither convention exists there."""
        config = Olmo2Config(hidden_size=16, num_key_value_heads=2, **SMALL)
        model = build_bridge_from_module(
            Olmo2ForCausalLM(config).eval(), "Olmo2ForCausalLM", hf_config=config
        )
        _, cache = model.run_with_cache(TOKENS)
        with pytest.raises(
            ValueError, match=r"blocks.1.ln1, which this model does not have"
        ) as info:
            cache.accumulated_resid(layer=1, apply_ln=True, recompute_ln=recompute_ln)
        assert "recompute_ln=" not in str(info.value)
