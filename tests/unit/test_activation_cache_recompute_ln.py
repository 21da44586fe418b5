"""Unit tests for ``recompute_ln`` in ``ActivationCache.accumulated_resid`` and ``apply_ln_to_stack``.

``recompute_ln`` chooses how a stack of residuals is normalized:

* ``None`` (the default of ``accumulated_resid``) keeps 4.3.0's results: fresh statistics at the
  unembed target, the cached ``hook_scale`` (no weight, no bias) at ``ln1``/``ln2`` targets.
* ``True`` normalizes every entry with the target norm module's own statistics, weight and bias.
* ``False`` divides by the cached scale at every target, the unembed included (the direct logit
  attribution convention).

Everything runs on tiny random GPT-2 / GPT-NeoX bridges built in memory (no Hub download). Their
norms have random weights and biases and their residual grows with depth, so a missing weight,
bias or a stale scale shows. The expected values are written out here from the norm modules and
the cached scales; Hugging Face ground truth lives in
``tests/integration/test_recompute_ln_hf_ground_truth.py``.
"""

from collections import Counter
from typing import Callable, Dict, List, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

from transformer_lens.ActivationCache import ActivationCache
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.model_bridge.sources import build_bridge_from_module

D_MODEL = 32
D_VOCAB = 64  # not D_MODEL: weight processing tells the two axes apart by size
N_LAYERS = 3
TOKENS = torch.tensor([[1, 7, 11, 3, 5, 9], [2, 9, 4, 4, 6, 8]])
RECOMPUTE_VALUES = [None, True, False]


def _randomize_gpt2(hf: GPT2LMHeadModel) -> None:
    """Random norm weights and biases, and output projections that grow with depth."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in hf.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(
                    torch.rand(module.weight.shape, generator=generator) * 1.5 + 0.5
                )
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.5)
        for index, block in enumerate(hf.transformer.h):
            block.attn.c_proj.weight.mul_(4.0 ** (index + 1))
            block.mlp.c_proj.weight.mul_(4.0 ** (index + 1))


def _tiny_gpt2(dtype: torch.dtype = torch.float32) -> TransformerBridge:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=D_VOCAB, n_positions=16, n_embd=D_MODEL, n_layer=N_LAYERS, n_head=4)
    hf = GPT2LMHeadModel(cfg).eval()
    _randomize_gpt2(hf)
    hf.to(dtype)
    return build_bridge_from_module(hf, "GPT2LMHeadModel", hf_config=cfg, dtype=dtype, device="cpu")


@pytest.fixture(scope="module")
def gpt2() -> Tuple[TransformerBridge, ActivationCache]:
    """A raw-mode GPT-2 bridge (LayerNorm) and its cache on a batch of two prompts."""
    model = _tiny_gpt2()
    _, cache = model.run_with_cache(TOKENS)
    return model, cache


@pytest.fixture(scope="module")
def neox() -> Tuple[TransformerBridge, ActivationCache]:
    """A GPT-NeoX bridge: parallel attention and MLP, so no ``resid_mid`` in the cache."""
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(
        vocab_size=D_VOCAB,
        hidden_size=D_MODEL,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=16,
    )
    hf = GPTNeoXForCausalLM(cfg).eval()
    model = build_bridge_from_module(
        hf, "GPTNeoXForCausalLM", hf_config=cfg, dtype=torch.float32, device="cpu"
    )
    _, cache = model.run_with_cache(TOKENS)
    return model, cache


def _target_norm(model: TransformerBridge, layer: int, mlp_input: bool) -> torch.nn.Module:
    if layer == model.cfg.n_layers:
        return model.ln_final
    return model.blocks[layer].ln2 if mlp_input else model.blocks[layer].ln1


def _module_on_each_entry(norm: torch.nn.Module, stack: torch.Tensor) -> torch.Tensor:
    """The wrapped Hugging Face module applied to each entry: fresh statistics, weight and bias."""
    return torch.stack([norm.original_component(entry) for entry in stack])


def _cached_scale_ln(
    cache: ActivationCache, stack: torch.Tensor, scale_key: str, pos_slice=None
) -> torch.Tensor:
    """4.3.0's cached-scale convention for a LayerNorm model: centre, divide, no weight or bias."""
    scale = cache[scale_key]
    if pos_slice is not None:
        scale = scale[..., pos_slice, :]
    return (stack - stack.mean(-1, keepdim=True)) / scale


def _scale_key(model: TransformerBridge, layer: int, mlp_input: bool) -> str:
    if layer == model.cfg.n_layers:
        return "ln_final.hook_scale"
    return f"blocks.{layer}.ln{2 if mlp_input else 1}.hook_scale"


# (layer, mlp_input) for every target of the 3-layer model: ln1/ln2 of each block, then unembed.
TARGETS = [(layer, mlp) for layer in range(N_LAYERS) for mlp in (False, True)] + [(N_LAYERS, False)]


class _HookCounter:
    """Counts TransformerLens hook-point calls and torch hooks on every norm module."""

    def __init__(self, model: TransformerBridge):
        self.calls: Counter = Counter()
        self.handles: List[torch.utils.hooks.RemovableHandle] = []
        self.hook_points = list(model.hook_dict.items())
        for name, hook_point in self.hook_points:
            hook_point.add_hook(self._tl_hook(name), dir="fwd")
        norms = [model.ln_final] + [n for block in model.blocks for n in (block.ln1, block.ln2)]
        for index, norm in enumerate(norms):
            for module in (norm, norm.original_component):
                self.handles.append(module.register_forward_pre_hook(self._torch_hook(index)))
                self.handles.append(module.register_forward_hook(self._torch_hook(index)))

    def _tl_hook(self, name: str) -> Callable:
        def hook(tensor, hook):
            self.calls[name] += 1

        return hook

    def _torch_hook(self, index: int) -> Callable:
        def hook(module, *args):
            self.calls[f"torch:{index}:{type(module).__name__}"] += 1

        return hook

    def remove(self) -> None:
        for _, hook_point in self.hook_points:
            hook_point.remove_hooks("fwd")
        for handle in self.handles:
            handle.remove()


@pytest.fixture
def counted_gpt2():
    """A fresh bridge (hooks must not leak into the shared one) with every hook counted."""
    model = _tiny_gpt2()
    _, cache = model.run_with_cache(TOKENS)
    counter = _HookCounter(model)
    yield model, cache, counter
    counter.remove()


@pytest.fixture(scope="module")
def one_prompt(gpt2) -> Tuple[TransformerBridge, ActivationCache, ActivationCache]:
    """The same single prompt cached with and without its batch dimension."""
    model, _ = gpt2
    _, batched = model.run_with_cache(TOKENS[:1])
    _, batchless = model.run_with_cache(TOKENS[:1], remove_batch_dim=True)
    return model, batched, batchless


def _layer_norm_float32(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm with the statistics, weight and bias in float32, cast back to x's dtype."""
    module = norm.original_component
    out = F.layer_norm(
        x.float(), x.shape[-1:], module.weight.float(), module.bias.float(), module.eps
    )
    return out.to(x.dtype)


@pytest.fixture(scope="module")
def gpt2_bf16() -> Tuple[TransformerBridge, ActivationCache]:
    model = _tiny_gpt2(torch.bfloat16)
    _, cache = model.run_with_cache(TOKENS)
    return model, cache


class TestRecomputeConventions:
    """What each ``recompute_ln`` value computes, target by target."""

    def test_default_at_unembed_reproduces_4_3_0(self, gpt2):
        """The default stays what 4.3.0 computed: the final norm module on every stack entry."""
        model, cache = gpt2
        raw = cache.accumulated_resid()
        expected = _module_on_each_entry(model.ln_final, raw)
        for layer in (None, -1, N_LAYERS):
            torch.testing.assert_close(
                cache.accumulated_resid(layer=layer, apply_ln=True),
                expected,
                atol=1e-5,
                rtol=1e-5,
            )
        torch.testing.assert_close(
            cache.accumulated_resid(apply_ln=True, recompute_ln=None),
            expected,
            atol=1e-5,
            rtol=1e-5,
        )

    @pytest.mark.parametrize("layer", range(N_LAYERS))
    @pytest.mark.parametrize("mlp_input", [False, True])
    def test_default_at_block_norms_reproduces_4_3_0(self, gpt2, layer: int, mlp_input: bool):
        """At ln1/ln2 targets the default keeps 4.3.0's cached scale (centred, no weight or bias)."""
        model, cache = gpt2
        raw = cache.accumulated_resid(layer=layer, mlp_input=mlp_input)
        expected = _cached_scale_ln(cache, raw, _scale_key(model, layer, mlp_input))
        default = cache.accumulated_resid(layer=layer, mlp_input=mlp_input, apply_ln=True)
        torch.testing.assert_close(default, expected, atol=1e-5, rtol=1e-5)
        explicit = cache.accumulated_resid(
            layer=layer, mlp_input=mlp_input, apply_ln=True, recompute_ln=None
        )
        torch.testing.assert_close(explicit, expected, atol=1e-5, rtol=1e-5)

    @pytest.mark.parametrize("layer,mlp_input", TARGETS)
    def test_recompute_true_is_the_target_module_at_every_target(
        self, gpt2, layer: int, mlp_input: bool
    ):
        """``True`` applies ln_final, ln1 or ln2 with each entry's own statistics, weight and bias."""
        model, cache = gpt2
        raw = cache.accumulated_resid(layer=layer, mlp_input=mlp_input, incl_mid=True)
        expected = _module_on_each_entry(_target_norm(model, layer, mlp_input), raw)
        actual = cache.accumulated_resid(
            layer=layer,
            mlp_input=mlp_input,
            incl_mid=True,
            apply_ln=True,
            recompute_ln=True,
        )
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
        # The weight and bias are applied: the cached-scale result is far from it.
        cached = _cached_scale_ln(cache, raw, _scale_key(model, layer, mlp_input))
        assert (actual - cached).abs().max() > 0.1

    @pytest.mark.parametrize("layer,mlp_input", TARGETS)
    def test_recompute_false_is_the_cached_scale_at_every_target(
        self, gpt2, layer: int, mlp_input: bool
    ):
        """``False`` divides by the cached scale of the target, ``ln_final.hook_scale`` included."""
        model, cache = gpt2
        raw = cache.accumulated_resid(layer=layer, mlp_input=mlp_input)
        expected = _cached_scale_ln(cache, raw, _scale_key(model, layer, mlp_input))
        actual = cache.accumulated_resid(
            layer=layer, mlp_input=mlp_input, apply_ln=True, recompute_ln=False
        )
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)

    def test_final_entry_agrees_across_conventions_only_at_the_end(self, gpt2):
        """The last entry is the norm's own input, so only the weight and bias separate True from
        False there; the first entry (the embeddings) is where the cached scale is far off.
        """
        model, cache = gpt2
        fresh = cache.accumulated_resid(apply_ln=True, recompute_ln=True)
        cached = cache.accumulated_resid(apply_ln=True, recompute_ln=False)
        ln_f = model.ln_final.original_component
        torch.testing.assert_close(
            cached[-1] * ln_f.weight + ln_f.bias, fresh[-1], atol=1e-4, rtol=1e-4
        )
        unweighted_fresh = (fresh[0] - ln_f.bias) / ln_f.weight
        assert (unweighted_fresh - cached[0]).abs().max() > 1.0

    @pytest.mark.parametrize("recompute_ln", RECOMPUTE_VALUES)
    @pytest.mark.parametrize("pos_slice", [-1, (1, 4), [0, 2, 5]])
    @pytest.mark.parametrize("layer,mlp_input", [(1, False), (1, True), (N_LAYERS, False)])
    def test_pos_slice_equals_slicing_the_full_result(
        self, gpt2, recompute_ln: Optional[bool], pos_slice, layer: int, mlp_input: bool
    ):
        """``pos_slice`` selects positions of the stack and of the cached scale alike."""
        _, cache = gpt2
        kwargs = dict(layer=layer, mlp_input=mlp_input, apply_ln=True, recompute_ln=recompute_ln)
        full = cache.accumulated_resid(**kwargs)
        if isinstance(pos_slice, tuple):
            expected = full[..., slice(*pos_slice), :]
        else:
            expected = full[..., pos_slice, :]
        actual = cache.accumulated_resid(pos_slice=pos_slice, **kwargs)
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)

    @pytest.mark.parametrize("layer,mlp_input", TARGETS)
    def test_apply_ln_to_stack_recompute_is_fresh_at_every_target(
        self, gpt2, layer: int, mlp_input: bool
    ):
        """``apply_ln_to_stack(recompute_ln=True)`` now covers ln1/ln2 targets too (4.3.0 silently
        used the cached scale there), on a stack that is not the cache's own residuals.
        """
        model, cache = gpt2
        stack = torch.randn(4, *TOKENS.shape, D_MODEL, generator=torch.Generator().manual_seed(3))
        expected = _module_on_each_entry(_target_norm(model, layer, mlp_input), stack)
        actual = cache.apply_ln_to_stack(stack, layer=layer, mlp_input=mlp_input, recompute_ln=True)
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
        # recompute_ln=False is unchanged: the cached scale of the target.
        cached = cache.apply_ln_to_stack(
            stack, layer=layer, mlp_input=mlp_input, recompute_ln=False
        )
        scale_key = _scale_key(model, layer, mlp_input)
        torch.testing.assert_close(
            cached, _cached_scale_ln(cache, stack, scale_key), atol=1e-5, rtol=1e-5
        )

    def test_apply_ln_to_stack_recompute_with_batch_slice(self, gpt2):
        """``batch_slice`` is applied to the stack before the fresh normalization."""
        model, cache = gpt2
        stack = cache.decompose_resid(layer=2)
        actual = cache.apply_ln_to_stack(stack, layer=2, batch_slice=[1], recompute_ln=True)
        expected = _module_on_each_entry(model.blocks[2].ln1, stack[:, 1:2])
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)

    @pytest.mark.parametrize(
        "shape", [(D_MODEL,), (5, D_MODEL), (3, 2, 4, D_MODEL), (2, 1, 1, 3, D_MODEL)]
    )
    @pytest.mark.parametrize("norm_name", ["ln_final", "ln1", "ln2"])
    def test_normalize_without_hooks_matches_module(
        self, gpt2, shape: Tuple[int, ...], norm_name: str
    ):
        """Any leading shape: the same values as the wrapped module, in one call."""
        model, _ = gpt2
        norm = model.ln_final if norm_name == "ln_final" else getattr(model.blocks[1], norm_name)
        x = torch.randn(shape, generator=torch.Generator().manual_seed(4)) * 7.0 + 1.5
        actual = norm.normalize_without_hooks(x)
        assert actual.shape == x.shape and actual.dtype == x.dtype
        torch.testing.assert_close(actual, norm.original_component(x), atol=1e-5, rtol=1e-5)


class TestInvalidArguments:
    """Requests with no meaning raise a ValueError that names the problem and the fix."""

    @pytest.mark.parametrize("layer", [-2, N_LAYERS + 1, 99])
    def test_layer_out_of_range_raises(self, gpt2, layer: int):
        """4.3.0 raised a bare KeyError; the message now names the valid range."""
        _, cache = gpt2
        with pytest.raises(ValueError, match=rf"(?s)layer.*{N_LAYERS}"):
            cache.accumulated_resid(layer=layer, apply_ln=True)
        with pytest.raises(ValueError, match=rf"(?s)layer.*{N_LAYERS}"):
            cache.apply_ln_to_stack(cache.accumulated_resid(), layer=layer)

    def test_recompute_without_apply_ln_raises(self, gpt2):
        """Asking for a normalization while switching normalization off is a contradiction."""
        _, cache = gpt2
        with pytest.raises(ValueError, match="apply_ln"):
            cache.accumulated_resid(apply_ln=False, recompute_ln=True)

    @pytest.mark.parametrize("layer", [None, -1, N_LAYERS])
    @pytest.mark.parametrize("recompute_ln", RECOMPUTE_VALUES)
    def test_mlp_input_at_the_unembed_raises(self, gpt2, layer: Optional[int], recompute_ln):
        """There is no MLP after the last block: 4.3.0 ignored ``mlp_input`` there silently."""
        _, cache = gpt2
        with pytest.raises(ValueError, match="mlp_input"):
            cache.accumulated_resid(
                layer=layer, mlp_input=True, apply_ln=True, recompute_ln=recompute_ln
            )
        with pytest.raises(ValueError, match="mlp_input"):
            cache.apply_ln_to_stack(
                cache.accumulated_resid(),
                layer=layer,
                mlp_input=True,
                recompute_ln=bool(recompute_ln),
            )

    @pytest.mark.parametrize("recompute_ln", [True, False])
    @pytest.mark.parametrize("layer", [1, N_LAYERS])
    def test_stack_of_the_wrong_width_raises(self, gpt2, recompute_ln: bool, layer: int):
        """A stack whose last dimension is not d_model is rejected before any arithmetic."""
        _, cache = gpt2
        stack = torch.randn(2, *TOKENS.shape, D_MODEL + 1)
        with pytest.raises(ValueError, match="d_model"):
            cache.apply_ln_to_stack(stack, layer=layer, recompute_ln=recompute_ln)

    @pytest.mark.parametrize(
        "kwargs",
        [
            dict(layer=1, incl_mid=True),
            dict(layer=None, incl_mid=True),
            dict(layer=1, mlp_input=True),
            dict(layer=1, incl_mid=True, apply_ln=True, recompute_ln=True),
            dict(layer=0, mlp_input=True, apply_ln=True),
        ],
    )
    def test_resid_mid_on_parallel_blocks_raises(self, neox, kwargs):
        """Parallel attention and MLP read the same input: there is no ``resid_mid`` to return."""
        model, cache = neox
        assert model.cfg.parallel_attn_mlp
        assert "blocks.0.hook_resid_mid" not in cache.keys()
        with pytest.raises(ValueError, match="resid_mid|parallel"):
            cache.accumulated_resid(**kwargs)

    def test_apply_ln_to_stack_mlp_input_on_parallel_blocks_is_ln2(self, neox):
        """A parallel block still has an ln2 (the MLP's own norm of resid_pre): normalizing a given
        stack as MLP input is well defined, only ``resid_mid`` is missing."""
        model, cache = neox
        stack = cache.accumulated_resid(layer=1)
        torch.testing.assert_close(
            cache.apply_ln_to_stack(stack, layer=1, mlp_input=True, recompute_ln=True),
            _module_on_each_entry(model.blocks[1].ln2, stack),
            atol=1e-5,
            rtol=1e-5,
        )

    def test_parallel_blocks_ln1_and_unembed_work(self, neox):
        """What NeoX does support: fresh ln1 targets, ``incl_mid`` at layer 0, the unembed."""
        model, cache = neox
        raw = cache.accumulated_resid(layer=1)
        torch.testing.assert_close(
            cache.accumulated_resid(layer=1, apply_ln=True, recompute_ln=True),
            _module_on_each_entry(model.blocks[1].ln1, raw),
            atol=1e-5,
            rtol=1e-5,
        )
        assert cache.accumulated_resid(layer=0, incl_mid=True).shape[0] == 1
        final = cache.accumulated_resid(apply_ln=True)
        torch.testing.assert_close(
            final,
            _module_on_each_entry(model.ln_final, cache.accumulated_resid()),
            atol=1e-5,
            rtol=1e-5,
        )


class TestNoSideEffects:
    """Normalizing fires no hook, leaves the cache alone and keeps autograd."""

    @pytest.mark.parametrize("recompute_ln", RECOMPUTE_VALUES)
    def test_no_hook_fires(self, counted_gpt2, recompute_ln: Optional[bool]):
        """Normalizing a stack is analysis, not a model run: 4.3.0 fired every ``ln_final`` hook
        once per stack entry, so a leftover user hook changed the lens."""
        model, cache, counter = counted_gpt2
        with torch.no_grad():
            model(TOKENS)
        assert counter.calls["ln_final.hook_scale"] == 1, "the counting hooks are not live"
        assert any(key.startswith("torch:") for key in counter.calls)
        counter.calls.clear()

        for layer, mlp_input in TARGETS:
            cache.accumulated_resid(
                layer=layer,
                mlp_input=mlp_input,
                apply_ln=True,
                recompute_ln=recompute_ln,
            )
            cache.accumulated_resid(
                layer=layer,
                mlp_input=mlp_input,
                apply_ln=True,
                recompute_ln=recompute_ln,
                pos_slice=-1,
            )
            stack = cache.accumulated_resid(layer=layer, mlp_input=mlp_input)
            cache.apply_ln_to_stack(
                stack, layer=layer, mlp_input=mlp_input, recompute_ln=bool(recompute_ln)
            )
        model.ln_final.normalize_without_hooks(stack)
        model.blocks[0].ln2.normalize_without_hooks(stack)
        assert dict(counter.calls) == {}

    def test_cache_is_not_mutated(self, gpt2):
        """Every tensor of the cache is bit-identical after all the normalizations."""
        _, cache = gpt2
        before: Dict[str, torch.Tensor] = {key: value.clone() for key, value in cache.items()}
        for recompute_ln in RECOMPUTE_VALUES:
            for layer, mlp_input in TARGETS:
                out = cache.accumulated_resid(
                    layer=layer,
                    mlp_input=mlp_input,
                    apply_ln=True,
                    recompute_ln=recompute_ln,
                )
                out.mul_(0.0)  # an in-place edit of the result must not reach the cache either
                stack = cache.accumulated_resid(layer=layer, mlp_input=mlp_input)
                cache.apply_ln_to_stack(
                    stack,
                    layer=layer,
                    mlp_input=mlp_input,
                    recompute_ln=bool(recompute_ln),
                ).add_(1.0)
        assert sorted(cache.keys()) == sorted(before)
        for key, value in before.items():
            assert torch.equal(cache[key], value), key

    @pytest.mark.parametrize("recompute_ln", [True, False])
    @pytest.mark.parametrize("layer,mlp_input", [(1, False), (1, True), (N_LAYERS, False)])
    def test_gradient_flows_to_the_stack(
        self, gpt2, recompute_ln: bool, layer: int, mlp_input: bool
    ):
        """Attribution code differentiates through the normalization: the gradient must match the
        one through the module itself (or through the cached-scale formula)."""
        model, cache = gpt2
        base = cache.accumulated_resid(layer=layer, mlp_input=mlp_input)
        weights = torch.randn(base.shape, generator=torch.Generator().manual_seed(5))

        stack = base.clone().requires_grad_(True)
        out = cache.apply_ln_to_stack(
            stack, layer=layer, mlp_input=mlp_input, recompute_ln=recompute_ln
        )
        (grad,) = torch.autograd.grad((out * weights).sum(), stack)

        reference = base.clone().requires_grad_(True)
        if recompute_ln:
            expected_out = _module_on_each_entry(_target_norm(model, layer, mlp_input), reference)
        else:
            expected_out = _cached_scale_ln(cache, reference, _scale_key(model, layer, mlp_input))
        (expected,) = torch.autograd.grad((expected_out * weights).sum(), reference)
        assert grad.abs().sum() > 0
        torch.testing.assert_close(grad, expected, atol=1e-4, rtol=1e-4)

    @pytest.mark.parametrize("recompute_ln", RECOMPUTE_VALUES)
    def test_gradient_flows_through_accumulated_resid(self, gpt2, recompute_ln: Optional[bool]):
        """A cache holding grad-requiring residuals keeps them connected through the lens."""
        model, cache = gpt2
        leaves = {
            key: value.clone().requires_grad_(True)
            for key, value in cache.items()
            if "resid" in key or "scale" in key
        }
        grad_cache = ActivationCache(leaves, model)
        out = grad_cache.accumulated_resid(apply_ln=True, recompute_ln=recompute_ln)
        out.square().sum().backward()
        grad = leaves["blocks.0.hook_resid_pre"].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


class TestShapesAndPrecision:
    """Batchless caches and half precision."""

    @pytest.mark.parametrize("recompute_ln", RECOMPUTE_VALUES)
    @pytest.mark.parametrize("pos_slice", [None, -1, (1, 4)])
    @pytest.mark.parametrize("layer,mlp_input", [(0, False), (2, True), (N_LAYERS, False)])
    def test_batchless_cache(
        self,
        one_prompt,
        recompute_ln: Optional[bool],
        pos_slice,
        layer: int,
        mlp_input: bool,
    ):
        """``remove_batch_dim=True`` gives the batched result without its batch dimension."""
        model, batched, batchless = one_prompt
        assert not batchless.has_batch_dim
        kwargs = dict(
            layer=layer,
            mlp_input=mlp_input,
            apply_ln=True,
            recompute_ln=recompute_ln,
            pos_slice=pos_slice,
        )
        expected = batched.accumulated_resid(**kwargs)[:, 0]
        actual = batchless.accumulated_resid(**kwargs)
        assert actual.shape == expected.shape
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
        if recompute_ln:
            raw = batchless.accumulated_resid(layer=layer, mlp_input=mlp_input, pos_slice=pos_slice)
            fresh = _module_on_each_entry(_target_norm(model, layer, mlp_input), raw)
            torch.testing.assert_close(actual, fresh, atol=1e-5, rtol=1e-5)

    @pytest.mark.parametrize("layer,mlp_input", [(0, False), (1, True), (N_LAYERS, False)])
    def test_bfloat16_statistics_in_float32(self, gpt2_bf16, layer: int, mlp_input: bool):
        """Half-precision stacks are normalized in float32 and cast back to bfloat16."""
        model, cache = gpt2_bf16
        raw = cache.accumulated_resid(layer=layer, mlp_input=mlp_input)
        assert raw.dtype == torch.bfloat16
        norm = _target_norm(model, layer, mlp_input)
        expected = _layer_norm_float32(norm, raw)
        for actual in (
            cache.accumulated_resid(
                layer=layer, mlp_input=mlp_input, apply_ln=True, recompute_ln=True
            ),
            cache.apply_ln_to_stack(raw, layer=layer, mlp_input=mlp_input, recompute_ln=True),
            norm.normalize_without_hooks(raw),
        ):
            assert actual.dtype == torch.bfloat16
            torch.testing.assert_close(actual, expected, atol=1e-2, rtol=1.6e-2)
