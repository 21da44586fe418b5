"""Tests of ``recompute_ln`` in ActivationCache: fresh normalization for the logit lens.

With ``recompute_ln=True``, ``apply_ln_to_stack`` and ``accumulated_resid`` must normalize every
component of a stack exactly as the target norm module (``ln_final``, ``blocks[L].ln1`` or
``blocks[L].ln2``) would normalize it on its own. The ground truth here is the module itself,
called on one component at a time. The default, ``recompute_ln=False``, must stay bit-for-bit the
formula of TransformerLens 2.17.0 (the cached scale, for direct logit attribution), which these
tests write out independently.

The models are tiny and seeded. Their norms get random weights and biases (unit weights and zero
biases would hide a missing weight or bias), and each block writes a larger output than the one
before, so the residual norm grows with depth and the cached final scale is wrong for early layers.
"""

import inspect
from functools import lru_cache
from typing import Callable, Dict, List, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from transformer_lens import ActivationCache, HookedTransformer, HookedTransformerConfig
from transformer_lens.components import LayerNorm, LayerNormPre, RMSNorm, RMSNormPre
from transformer_lens.utils import Slice

N_LAYERS = 3
D_MODEL = 16
D_VOCAB = 23
BATCH = 2
POS = 5
RESIDUAL_GROWTH = 3.0

# variant -> (normalization type before folding, cfg.final_rms, fold_ln)
VARIANTS: Dict[str, Tuple[str, bool, bool]] = {
    "LN": ("LN", False, False),
    "LNPre": ("LN", False, True),
    "RMS": ("RMS", False, False),
    "RMSPre": ("RMS", False, True),
    "LN-final_rms": ("LN", True, False),
    "LNPre-final_rms": ("LN", True, True),
}
# variant -> (class of the block norms, class of ln_final)
EXPECTED_NORM_CLASSES = {
    "LN": (LayerNorm, LayerNorm),
    "LNPre": (LayerNormPre, LayerNormPre),
    "RMS": (RMSNorm, RMSNorm),
    "RMSPre": (RMSNormPre, RMSNormPre),
    "LN-final_rms": (LayerNorm, RMSNorm),
    "LNPre-final_rms": (LayerNormPre, RMSNormPre),
}
# (layer, mlp_input): every way of naming ln_final, then ln1 and ln2 of intermediate layers.
TARGETS = [(None, False), (-1, False), (N_LAYERS, False), (0, False), (1, False), (0, True)]
TARGETS += [(1, True), (N_LAYERS - 1, True)]
TARGET_IDS = [f"layer={layer}-{'ln2' if mlp else 'ln1/final'}" for layer, mlp in TARGETS]
# Tolerances of a fused kernel against the module's own arithmetic.
FLOAT32_TOL = dict(rtol=1e-5, atol=1e-5)
BFLOAT16_TOL = dict(rtol=1.6e-2, atol=1e-2)


def make_cfg(
    normalization_type: Optional[str],
    final_rms: bool = False,
    dtype: torch.dtype = torch.float32,
    parallel_attn_mlp: bool = False,
) -> HookedTransformerConfig:
    return HookedTransformerConfig(
        n_layers=N_LAYERS,
        d_model=D_MODEL,
        d_head=4,
        n_heads=4,
        d_mlp=32,
        n_ctx=8,
        d_vocab=D_VOCAB,
        act_fn="gelu",
        normalization_type=normalization_type,
        final_rms=final_rms,
        parallel_attn_mlp=parallel_attn_mlp,
        dtype=dtype,
        device="cpu",
        seed=0,
    )


def randomize_norms_and_grow_residual(model: HookedTransformer) -> None:
    """Give every norm a non-trivial weight and bias, and make block outputs grow with depth."""
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (LayerNorm, RMSNorm)):
                module.w.copy_(torch.rand(module.w.shape, generator=generator) + 0.5)
            if isinstance(module, LayerNorm):
                module.b.copy_(0.2 * torch.randn(module.b.shape, generator=generator))
        for index, block in enumerate(model.blocks):
            factor = RESIDUAL_GROWTH ** (index + 1)
            for param in (block.attn.W_O, block.attn.b_O, block.mlp.W_out, block.mlp.b_out):
                param.mul_(factor)


@lru_cache(maxsize=None)
def build_model(variant: str, dtype: torch.dtype = torch.float32) -> HookedTransformer:
    """A seeded model of the variant; folded variants go through load_and_process_state_dict."""
    base_type, final_rms, fold_ln = VARIANTS[variant]
    model = HookedTransformer(make_cfg(base_type, final_rms))
    randomize_norms_and_grow_residual(model)
    if fold_ln:
        folded = HookedTransformer(make_cfg(base_type + "Pre", final_rms))
        state_dict = {name: tensor.clone() for name, tensor in model.state_dict().items()}
        folded.load_and_process_state_dict(
            state_dict,
            fold_ln=True,
            center_writing_weights=True,
            center_unembed=True,
            fold_value_biases=True,
        )
        model = folded
    if dtype != torch.float32:
        converted = HookedTransformer(make_cfg(model.cfg.normalization_type, final_rms, dtype))
        converted.load_state_dict(
            {
                name: tensor.to(dtype) if tensor.is_floating_point() else tensor
                for name, tensor in model.state_dict().items()
            }
        )
        model = converted
    return model.eval()


def make_tokens(batch: int = BATCH) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, D_VOCAB, (batch, POS), generator=generator)


def fresh_run(
    model: HookedTransformer, batched: bool = True
) -> Tuple[torch.Tensor, ActivationCache]:
    """Logits and cache of a batch of 2, or of one prompt with the batch dimension removed."""
    if batched:
        return model.run_with_cache(make_tokens())
    logits, cache = model.run_with_cache(make_tokens(batch=1))
    cache.remove_batch_dim()
    assert not cache.has_batch_dim
    return logits[0], cache


@lru_cache(maxsize=None)
def cached_run(
    variant: str, batched: bool = True, dtype: torch.dtype = torch.float32
) -> Tuple[torch.Tensor, ActivationCache]:
    """fresh_run, shared between tests: forward passes are slow under runtime type checking.

    Tests must not modify what they get; test_the_cache_is_not_mutated checks that the methods
    under test do not, on a fresh run of its own.
    """
    return fresh_run(build_model(variant, dtype), batched)


def target_norm(model: HookedTransformer, layer: Optional[int], mlp_input: bool) -> nn.Module:
    if layer in (None, -1, model.cfg.n_layers):
        return model.ln_final
    return model.blocks[layer].ln2 if mlp_input else model.blocks[layer].ln1


def normalize_with_module(norm: nn.Module, stack: torch.Tensor) -> torch.Tensor:
    """Call the norm module itself on each component of the stack, one at a time."""
    rows = []
    for component in stack:
        as_batch_pos = component.reshape(1, -1, component.shape[-1])  # the module wants 3 dims
        rows.append(norm(as_batch_pos).reshape(component.shape))
    return torch.stack(rows)


def cache_key_of_label(label: str) -> str:
    if label == "final_post":
        return f"blocks.{N_LAYERS - 1}.hook_resid_post"
    layer, kind = label.split("_")
    return f"blocks.{layer}.hook_resid_{kind}"


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    return logits.float().log_softmax(dim=-1)


BATCHED = pytest.mark.parametrize("batched", [True, False], ids=["batched", "batchless"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_have_the_norm_modules_they_claim(variant: str):
    block_class, final_class = EXPECTED_NORM_CLASSES[variant]
    model = build_model(variant)
    assert type(model.ln_final) is final_class
    for block in model.blocks:
        assert type(block.ln1) is block_class and type(block.ln2) is block_class


def test_residual_grows_with_depth():
    _, cache = cached_run("LN")
    first = cache["blocks.0.hook_resid_pre"].norm(dim=-1).mean()
    last = cache[f"blocks.{N_LAYERS - 1}.hook_resid_post"].norm(dim=-1).mean()
    assert last > 10 * first


# --- recompute_ln=True: each row is what the target norm module gives -------------------------


@BATCHED
@pytest.mark.parametrize("layer, mlp_input", TARGETS, ids=TARGET_IDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_each_row_equals_the_target_norm_module(variant, layer, mlp_input, batched):
    model = build_model(variant)
    _, cache = cached_run(variant, batched)
    stack = cache.accumulated_resid(layer=layer, incl_mid=True, mlp_input=mlp_input)
    expected = normalize_with_module(target_norm(model, layer, mlp_input), stack)

    fresh = cache.apply_ln_to_stack(
        stack, layer, mlp_input=mlp_input, has_batch_dim=batched, recompute_ln=True
    )
    lens = cache.accumulated_resid(
        layer=layer, incl_mid=True, mlp_input=mlp_input, apply_ln=True, recompute_ln=True
    )

    assert fresh.shape == expected.shape == stack.shape
    torch.testing.assert_close(fresh, expected, **FLOAT32_TOL)
    torch.testing.assert_close(lens, expected, **FLOAT32_TOL)


@BATCHED
@pytest.mark.parametrize("variant", VARIANTS)
def test_last_row_of_the_lens_reproduces_the_model_logits(variant, batched):
    model = build_model(variant)
    logits, cache = cached_run(variant, batched)
    lens = cache.accumulated_resid(apply_ln=True, recompute_ln=True)
    lens_logits = lens @ model.W_U + model.b_U
    torch.testing.assert_close(lens_logits[-1], logits, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(log_probs(lens_logits[-1]), log_probs(logits), rtol=0, atol=1e-4)


@pytest.mark.parametrize("base", ["LN", "RMS"])
def test_folding_does_not_change_the_lens(base):
    """fold_ln moves ln_final's weight and bias into W_U and b_U: every layer's lens is the same."""
    unfolded_model, folded_model = build_model(base), build_model(base + "Pre")
    _, unfolded_cache = cached_run(base)
    _, folded_cache = cached_run(base + "Pre")
    unfolded = unfolded_cache.accumulated_resid(apply_ln=True, recompute_ln=True, incl_mid=True)
    folded = folded_cache.accumulated_resid(apply_ln=True, recompute_ln=True, incl_mid=True)
    unfolded_lp = log_probs(unfolded @ unfolded_model.W_U + unfolded_model.b_U)
    folded_lp = log_probs(folded @ folded_model.W_U + folded_model.b_U)
    torch.testing.assert_close(folded_lp, unfolded_lp, rtol=0, atol=1e-4)


@pytest.mark.parametrize("variant", ["LN", "RMS", "LN-final_rms"])
def test_intermediate_layer_uses_its_own_norm_not_ln_final(variant):
    model = build_model(variant)
    _, cache = cached_run(variant)
    stack = cache.accumulated_resid(layer=1)
    fresh = cache.apply_ln_to_stack(stack, layer=1, recompute_ln=True)
    torch.testing.assert_close(fresh, normalize_with_module(model.blocks[1].ln1, stack))
    assert not torch.allclose(fresh, normalize_with_module(model.ln_final, stack), atol=1e-2)
    assert not torch.allclose(fresh, normalize_with_module(model.blocks[1].ln2, stack), atol=1e-2)


@BATCHED
@pytest.mark.parametrize(
    "layer, incl_mid, mlp_input, expected_labels",
    [
        (None, True, False, ["0_pre", "0_mid", "1_pre", "1_mid", "2_pre", "2_mid", "final_post"]),
        (None, False, False, ["0_pre", "1_pre", "2_pre", "final_post"]),
        (1, True, False, ["0_pre", "0_mid", "1_pre"]),
        (1, False, True, ["0_pre", "1_pre", "1_mid"]),
        (2, True, True, ["0_pre", "0_mid", "1_pre", "1_mid", "2_pre", "2_mid"]),
        (0, False, True, ["0_pre", "0_mid"]),
    ],
)
def test_incl_mid_and_mlp_input_normalize_the_right_activations(
    layer, incl_mid, mlp_input, expected_labels, batched
):
    model = build_model("LN")
    _, cache = cached_run("LN", batched)
    lens, labels = cache.accumulated_resid(
        layer=layer,
        incl_mid=incl_mid,
        mlp_input=mlp_input,
        apply_ln=True,
        recompute_ln=True,
        return_labels=True,
    )
    assert labels == expected_labels
    sources = torch.stack([cache[cache_key_of_label(label)] for label in labels])
    expected = normalize_with_module(target_norm(model, layer, mlp_input), sources)
    torch.testing.assert_close(lens, expected, **FLOAT32_TOL)


POS_SLICES = [None, -1, 0, (1, 4), (0, POS, 2), [0, 2, 4]]


@BATCHED
@pytest.mark.parametrize("pos_slice", POS_SLICES, ids=str)
@pytest.mark.parametrize("variant", ["LN", "RMSPre", "LN-final_rms"])
def test_pos_slice_selects_positions_of_the_full_lens(variant, pos_slice, batched):
    model = build_model(variant)
    _, cache = cached_run(variant, batched)
    full = normalize_with_module(model.ln_final, cache.accumulated_resid(incl_mid=True))
    expected = Slice(pos_slice).apply(full, dim=-2)

    lens = cache.accumulated_resid(
        incl_mid=True, pos_slice=pos_slice, apply_ln=True, recompute_ln=True
    )
    sliced_stack = cache.accumulated_resid(incl_mid=True, pos_slice=pos_slice)
    fresh = cache.apply_ln_to_stack(
        sliced_stack, pos_slice=pos_slice, has_batch_dim=batched, recompute_ln=True
    )

    assert lens.shape == expected.shape
    torch.testing.assert_close(lens, expected, **FLOAT32_TOL)
    torch.testing.assert_close(fresh, expected, **FLOAT32_TOL)


@pytest.mark.parametrize("batch_slice", [None, 0, 1, (0, 1), [1, 0]], ids=str)
@pytest.mark.parametrize("variant", ["LN", "RMS"])
def test_batch_slice_selects_batch_elements(variant, batch_slice):
    model = build_model(variant)
    _, cache = cached_run(variant)
    stack = cache.accumulated_resid(layer=2, incl_mid=True)
    expected = normalize_with_module(model.blocks[2].ln1, Slice(batch_slice).apply(stack, dim=1))
    fresh = cache.apply_ln_to_stack(stack, layer=2, batch_slice=batch_slice, recompute_ln=True)
    torch.testing.assert_close(fresh, expected, **FLOAT32_TOL)


def test_pos_slice_and_batch_slice_together():
    model = build_model("LN")
    _, cache = cached_run("LN")
    stack = cache.accumulated_resid(pos_slice=(1, 4))
    fresh = cache.apply_ln_to_stack(stack, pos_slice=(1, 4), batch_slice=1, recompute_ln=True)
    torch.testing.assert_close(fresh, normalize_with_module(model.ln_final, stack[:, 1]))


# --- precision, device, autograd ----------------------------------------------------------------


@pytest.mark.parametrize("layer, mlp_input", [(None, False), (1, False), (1, True)])
@pytest.mark.parametrize("variant", VARIANTS)
def test_bfloat16_matches_the_module_and_keeps_the_model_dtype(variant, layer, mlp_input):
    model = build_model(variant, torch.bfloat16)
    assert model.cfg.dtype == torch.bfloat16
    logits, cache = cached_run(variant, True, torch.bfloat16)
    stack = cache.accumulated_resid(layer=layer, incl_mid=True, mlp_input=mlp_input)
    assert stack.dtype == torch.bfloat16
    expected = normalize_with_module(target_norm(model, layer, mlp_input), stack)

    fresh = cache.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, recompute_ln=True)
    from_float32 = cache.apply_ln_to_stack(
        stack.float(), layer, mlp_input=mlp_input, recompute_ln=True
    )

    assert fresh.dtype == from_float32.dtype == torch.bfloat16
    torch.testing.assert_close(fresh, expected, **BFLOAT16_TOL)
    torch.testing.assert_close(from_float32, expected, **BFLOAT16_TOL)
    if layer is None:
        lens_logits = cache.accumulated_resid(apply_ln=True, recompute_ln=True)[-1] @ model.W_U
        torch.testing.assert_close(
            log_probs(lens_logits + model.b_U), log_probs(logits), rtol=0, atol=5e-2
        )


def float64_reference(norm: nn.Module, stack: torch.Tensor) -> torch.Tensor:
    """The norm in float64, from its definition, as the precision a float32 computation nears."""
    x = stack.double()
    if isinstance(norm, (LayerNorm, LayerNormPre)):
        x = x - x.mean(dim=-1, keepdim=True)
    x = x / (x.pow(2).mean(dim=-1, keepdim=True) + norm.eps).sqrt()
    if hasattr(norm, "w"):
        x = x * norm.w.double()
    if hasattr(norm, "b"):
        x = x + norm.b.double()
    return x


@pytest.mark.parametrize("variant", VARIANTS)
def test_bfloat16_statistics_are_computed_in_float32(variant):
    """A large common offset ruins a bfloat16 mean; float32 statistics are exact enough."""
    model = build_model(variant, torch.bfloat16)
    _, cache = cached_run(variant, True, torch.bfloat16)
    generator = torch.Generator().manual_seed(3)
    steps = torch.randint(-6, 7, (4, BATCH, POS, D_MODEL), generator=generator)
    stack = (100 + 0.5 * steps).to(torch.bfloat16)  # exactly representable in bfloat16
    expected = float64_reference(model.ln_final, stack)

    fresh = cache.apply_ln_to_stack(stack, recompute_ln=True)

    assert fresh.dtype == torch.bfloat16
    torch.testing.assert_close(fresh.double(), expected, rtol=1e-2, atol=2e-2)
    # Sanity: the input is hostile, statistics computed in bfloat16 would miss the tolerance.
    centred = stack - stack.mean(dim=-1, keepdim=True)
    naive = centred / (centred.pow(2).mean(dim=-1, keepdim=True) + model.cfg.eps).sqrt()
    exact = float64_reference(LayerNormPre(model.cfg), stack)
    assert (naive.double() - exact).abs().max() > 5e-2


@pytest.mark.parametrize("variant", VARIANTS)
def test_output_has_the_model_dtype_and_the_norm_device(variant):
    model = build_model(variant)
    _, cache = cached_run(variant)
    stack = cache.accumulated_resid(incl_mid=True)
    for residual_stack in (stack, stack.double()):
        fresh = cache.apply_ln_to_stack(residual_stack, recompute_ln=True)
        assert fresh.dtype == model.cfg.dtype == torch.float32
        assert fresh.device == model.W_U.device == torch.device(model.cfg.device)
    double_fresh = cache.apply_ln_to_stack(stack.double(), recompute_ln=True)
    torch.testing.assert_close(double_fresh, normalize_with_module(model.ln_final, stack))


@pytest.mark.parametrize("layer, mlp_input", [(None, False), (1, True)])
@pytest.mark.parametrize("variant", ["LN", "LNPre", "RMS", "RMSPre"])
def test_gradients_flow_to_the_stack_as_through_the_module(variant, layer, mlp_input):
    model = build_model(variant)
    _, cache = cached_run(variant)
    stack = cache.accumulated_resid(layer=layer, incl_mid=True, mlp_input=mlp_input)
    upstream_grad = torch.randn(stack.shape, generator=torch.Generator().manual_seed(5))

    ours = stack.clone().requires_grad_(True)
    fresh = cache.apply_ln_to_stack(ours, layer, mlp_input=mlp_input, recompute_ln=True)
    assert fresh.requires_grad
    (fresh * upstream_grad).sum().backward()

    reference = stack.clone().requires_grad_(True)
    norm = target_norm(model, layer, mlp_input)
    (normalize_with_module(norm, reference) * upstream_grad).sum().backward()

    assert ours.grad is not None and ours.grad.abs().sum() > 0
    torch.testing.assert_close(ours.grad, reference.grad, rtol=1e-4, atol=1e-5)
    model.zero_grad(set_to_none=True)


# --- side effects --------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["LN", "RMSPre", "LN-final_rms"])
def test_no_hook_point_fires(variant):
    model = build_model(variant)
    _, cache = cached_run(variant)
    stack = cache.accumulated_resid(layer=1, incl_mid=True, mlp_input=True)
    fired: List[str] = []

    def record(activation, hook):
        fired.append(hook.name)

    with model.hooks(fwd_hooks=[(name, record) for name in model.hook_dict]):
        cache.accumulated_resid(apply_ln=True, recompute_ln=True, incl_mid=True)
        cache.accumulated_resid(layer=1, mlp_input=True, apply_ln=True, recompute_ln=True)
        cache.apply_ln_to_stack(stack, layer=1, mlp_input=True, recompute_ln=True)
        cache.apply_ln_to_stack(stack, layer=0, recompute_ln=True, batch_slice=0)
        assert fired == []
        model.ln_final(stack[0])  # sanity: the hooks are live
    assert "ln_final.hook_scale" in fired


@BATCHED
@pytest.mark.parametrize("variant", ["LN", "RMS", "LNPre"])
def test_the_cache_is_not_mutated(variant, batched):
    _, cache = fresh_run(build_model(variant), batched)
    snapshot = {name: tensor.clone() for name, tensor in cache.items()}

    outputs = [
        cache.accumulated_resid(apply_ln=True, recompute_ln=True, incl_mid=True),
        cache.accumulated_resid(layer=1, mlp_input=True, apply_ln=True, recompute_ln=True),
        cache.accumulated_resid(pos_slice=-1, apply_ln=True, recompute_ln=True),
        cache.apply_ln_to_stack(cache["blocks.1.hook_resid_pre"][None], recompute_ln=True),
        cache.apply_ln_to_stack(
            cache["blocks.2.hook_resid_mid"][None], 2, mlp_input=True, recompute_ln=True
        ),
    ]
    with torch.no_grad():
        for output in outputs:
            output.fill_(12345.0)  # an output that aliased the cache would show below

    assert list(cache.keys()) == list(snapshot)
    for name, tensor in snapshot.items():
        assert torch.equal(cache[name], tensor), name


def test_no_normalization_returns_the_stack_unchanged():
    _, cache = fresh_run(HookedTransformer(make_cfg(None)))
    stack = cache.accumulated_resid(incl_mid=True)
    assert cache.apply_ln_to_stack(stack, recompute_ln=True) is stack
    assert cache.apply_ln_to_stack(stack, layer=1, mlp_input=True, recompute_ln=True) is stack
    lens = cache.accumulated_resid(incl_mid=True, apply_ln=True, recompute_ln=True)
    assert torch.equal(lens, stack)


# --- one fused kernel, whatever the number of components -----------------------------------------


def counting(function: Callable, calls: List[str], name: str) -> Callable:
    def wrapper(*args, **kwargs):
        calls.append(name)
        return function(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize("variant", VARIANTS)
def test_one_fused_norm_call_per_stack(variant, monkeypatch):
    model = build_model(variant)
    _, cache = cached_run(variant)
    calls: List[str] = []
    monkeypatch.setattr(F, "layer_norm", counting(F.layer_norm, calls, "layer_norm"))
    # RMSNorm's one pass over the whole stack is its reduction for the scale.
    monkeypatch.setattr(
        torch.linalg, "vector_norm", counting(torch.linalg.vector_norm, calls, "rms_norm")
    )

    for layer, mlp_input in [(None, False), (0, False), (1, True)]:
        norm = target_norm(model, layer, mlp_input)
        kernel = "layer_norm" if isinstance(norm, (LayerNorm, LayerNormPre)) else "rms_norm"
        for incl_mid in (False, True):
            calls.clear()
            lens = cache.accumulated_resid(
                layer=layer,
                incl_mid=incl_mid,
                mlp_input=mlp_input,
                apply_ln=True,
                recompute_ln=True,
            )
            assert calls == [kernel], (layer, mlp_input, incl_mid, lens.shape[0])
    calls.clear()
    cache.apply_ln_to_stack(torch.randn(40, BATCH, POS, D_MODEL), recompute_ln=True)
    assert len(calls) == 1


# --- errors --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ln_cache() -> ActivationCache:
    return cached_run("LN")[1]


def test_recompute_ln_without_apply_ln_raises(ln_cache):
    with pytest.raises(ValueError, match="recompute_ln=True .*apply_ln is False"):
        ln_cache.accumulated_resid(recompute_ln=True)
    with pytest.raises(ValueError, match="apply_ln"):
        ln_cache.accumulated_resid(apply_ln=False, recompute_ln=True, layer=1)


@pytest.mark.parametrize("layer", [-2, -5, N_LAYERS + 1, N_LAYERS + 7])
@pytest.mark.parametrize("recompute_ln", [True, False])
def test_layer_outside_the_model_raises(ln_cache, layer, recompute_ln):
    stack = ln_cache.accumulated_resid()
    message = rf"layer={layer} is outside \[-1, n_layers={N_LAYERS}\]"
    with pytest.raises(ValueError, match=message):
        ln_cache.apply_ln_to_stack(stack, layer=layer, recompute_ln=recompute_ln)
    with pytest.raises(ValueError, match=message):
        ln_cache.accumulated_resid(layer=layer, apply_ln=True, recompute_ln=recompute_ln)
    with pytest.raises(ValueError, match=message):
        ln_cache.accumulated_resid(layer=layer)


@pytest.mark.parametrize("layer", [None, -1, N_LAYERS])
def test_mlp_input_for_the_unembed_raises_with_recompute(ln_cache, layer):
    stack = ln_cache.accumulated_resid()
    with pytest.raises(ValueError, match="mlp_input=True .*unembed"):
        ln_cache.apply_ln_to_stack(stack, layer=layer, mlp_input=True, recompute_ln=True)
    with pytest.raises(ValueError, match="mlp_input=True .*unembed"):
        ln_cache.accumulated_resid(layer=layer, mlp_input=True, apply_ln=True, recompute_ln=True)


@pytest.mark.parametrize("width", [D_MODEL - 1, D_MODEL + 1, 1])
def test_stack_of_the_wrong_width_raises_with_recompute(ln_cache, width):
    with pytest.raises(ValueError, match=rf"last dimension is {width}.*d_model={D_MODEL}"):
        ln_cache.apply_ln_to_stack(torch.randn(3, BATCH, POS, width), recompute_ln=True)


@pytest.fixture(scope="module")
def parallel_cache() -> Tuple[HookedTransformer, torch.Tensor, ActivationCache]:
    model = HookedTransformer(make_cfg("LN", parallel_attn_mlp=True))
    randomize_norms_and_grow_residual(model)
    logits, cache = model.run_with_cache(make_tokens())
    return model, logits, cache


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(incl_mid=True),
        dict(layer=1, mlp_input=True),
        dict(incl_mid=True, apply_ln=True, recompute_ln=True),
        dict(layer=2, mlp_input=True, apply_ln=True, recompute_ln=True),
        dict(layer=1, incl_mid=True, apply_ln=True),
    ],
    ids=str,
)
def test_resid_mid_on_parallel_blocks_raises(parallel_cache, kwargs):
    _, _, cache = parallel_cache
    with pytest.raises(ValueError, match="parallel"):
        cache.accumulated_resid(**kwargs)


def test_lens_on_parallel_blocks_reproduces_the_logits(parallel_cache):
    model, logits, cache = parallel_cache
    lens = cache.accumulated_resid(apply_ln=True, recompute_ln=True)
    torch.testing.assert_close(lens[-1] @ model.W_U + model.b_U, logits, rtol=1e-5, atol=1e-4)
    stack = cache.accumulated_resid(layer=2)
    fresh = cache.accumulated_resid(layer=2, apply_ln=True, recompute_ln=True)
    torch.testing.assert_close(fresh, normalize_with_module(model.blocks[2].ln1, stack))


# --- the API: defaults and the parameters of 2.17.0 ----------------------------------------------

_EMPTY = inspect.Parameter.empty
# Parameters of TransformerLens 2.17.0 (pristine ActivationCache.py), in order, with defaults.
UPSTREAM_PARAMETERS = {
    "accumulated_resid": [
        ("layer", None),
        ("incl_mid", False),
        ("apply_ln", False),
        ("pos_slice", None),
        ("mlp_input", False),
        ("return_labels", False),
    ],
    "apply_ln_to_stack": [
        ("residual_stack", _EMPTY),
        ("layer", None),
        ("mlp_input", False),
        ("pos_slice", None),
        ("batch_slice", None),
        ("has_batch_dim", True),
    ],
}


@pytest.mark.parametrize("method", UPSTREAM_PARAMETERS)
def test_existing_parameters_keep_order_and_defaults_and_recompute_ln_is_off(method):
    parameters = list(inspect.signature(getattr(ActivationCache, method)).parameters.values())
    assert parameters[0].name == "self"
    found = [(p.name, p.default) for p in parameters[1:]]
    assert found == UPSTREAM_PARAMETERS[method] + [("recompute_ln", False)]
    positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert all(p.kind == positional for p in parameters[:-1])


# --- recompute_ln=False: bit-for-bit the formula of 2.17.0 --------------------------------------


def old_apply_ln_to_stack(
    cache: ActivationCache,
    residual_stack: torch.Tensor,
    layer: Optional[int] = None,
    mlp_input: bool = False,
    pos_slice=None,
    batch_slice=None,
    has_batch_dim: bool = True,
) -> torch.Tensor:
    """ActivationCache.apply_ln_to_stack of TransformerLens 2.17.0, written out."""
    cfg = cache.model.cfg
    pos_slice, batch_slice = Slice(pos_slice), Slice(batch_slice)
    if layer is None or layer == -1:
        layer = cfg.n_layers
    if has_batch_dim:
        residual_stack = batch_slice.apply(residual_stack, dim=1)
    if cfg.normalization_type in ("LN", "LNPre"):
        residual_stack = residual_stack - residual_stack.mean(dim=-1, keepdim=True)
    if layer == cfg.n_layers:
        scale = cache.cache_dict["ln_final.hook_scale"]
    else:
        scale = cache.cache_dict[f"blocks.{layer}.ln{2 if mlp_input else 1}.hook_scale"]
    scale = pos_slice.apply(scale, dim=-2)
    if cache.has_batch_dim:
        scale = batch_slice.apply(scale)
    return residual_stack / scale


def old_accumulated_stack(cache, layer=None, incl_mid=False, pos_slice=None, mlp_input=False):
    """The stack of accumulated_resid in TransformerLens 2.17.0, from the cache's dictionary."""
    n_layers = cache.model.cfg.n_layers
    layer = n_layers if layer in (None, -1) else layer
    keys = []
    for l in range(layer + 1):
        if l == n_layers:
            keys.append(f"blocks.{n_layers - 1}.hook_resid_post")
            continue
        keys.append(f"blocks.{l}.hook_resid_pre")
        if (incl_mid and l < layer) or (mlp_input and l == layer):
            keys.append(f"blocks.{l}.hook_resid_mid")
    return torch.stack([Slice(pos_slice).apply(cache.cache_dict[key], dim=-2) for key in keys])


OLD_PATH_CASES = [
    dict(),
    dict(layer=-1, incl_mid=True),
    dict(layer=N_LAYERS, pos_slice=-1),
    dict(layer=1, mlp_input=True),
    dict(layer=2, incl_mid=True, pos_slice=(1, 4)),
    dict(layer=0, pos_slice=[0, 3]),
]
OLD_PATH_VARIANTS = pytest.mark.parametrize("variant", ["LN", "RMS", "LNPre"])
EXPLICIT_OR_DEFAULT = pytest.mark.parametrize(
    "flag", [dict(), dict(recompute_ln=False)], ids=["default", "explicit"]
)


@EXPLICIT_OR_DEFAULT
@BATCHED
@pytest.mark.parametrize("case", OLD_PATH_CASES, ids=str)
@OLD_PATH_VARIANTS
def test_accumulated_resid_cached_path_is_bit_for_bit_the_old_formula(variant, case, batched, flag):
    _, cache = cached_run(variant, batched)
    got = cache.accumulated_resid(apply_ln=True, **case, **flag)
    layer, mlp_input = case.get("layer"), case.get("mlp_input", False)
    expected = old_apply_ln_to_stack(
        cache,
        old_accumulated_stack(cache, **case),
        layer,
        mlp_input=mlp_input,
        pos_slice=case.get("pos_slice"),
    )
    assert torch.equal(got, expected)


@EXPLICIT_OR_DEFAULT
@BATCHED
@pytest.mark.parametrize(
    "batch_slice, pos_slice, layer, mlp_input",
    [(None, None, None, False), (1, -1, 2, True), ((0, 1), (1, 3), 0, False), ([1], None, 1, True)],
    ids=str,
)
@OLD_PATH_VARIANTS
def test_apply_ln_to_stack_cached_path_is_bit_for_bit_the_old_formula(
    variant, batch_slice, pos_slice, layer, mlp_input, batched, flag
):
    _, cache = cached_run(variant, batched)
    stack = old_accumulated_stack(cache, layer=N_LAYERS, incl_mid=True, pos_slice=pos_slice)
    arguments = dict(layer=layer, mlp_input=mlp_input, pos_slice=pos_slice)
    arguments.update(batch_slice=batch_slice if batched else None, has_batch_dim=batched)
    got = cache.apply_ln_to_stack(stack, **arguments, **flag)
    assert torch.equal(got, old_apply_ln_to_stack(cache, stack, **arguments))


@BATCHED
@pytest.mark.parametrize(
    "layer, mlp_input, pos_slice", [(None, False, None), (1, True, -1), (2, False, (0, 3))], ids=str
)
@OLD_PATH_VARIANTS
def test_decompositions_keep_the_old_cached_scale(variant, layer, mlp_input, pos_slice, batched):
    _, cache = cached_run(variant, batched)
    old = dict(layer=layer, pos_slice=pos_slice)

    decomposed = cache.decompose_resid(layer, mlp_input, apply_ln=True, pos_slice=pos_slice)
    raw = cache.decompose_resid(layer, mlp_input, apply_ln=False, pos_slice=pos_slice)
    assert torch.equal(decomposed, old_apply_ln_to_stack(cache, raw, mlp_input=mlp_input, **old))

    full = cache.get_full_resid_decomposition(
        layer, mlp_input, expand_neurons=True, apply_ln=True, pos_slice=pos_slice
    )
    raw = cache.get_full_resid_decomposition(
        layer, mlp_input, expand_neurons=True, apply_ln=False, pos_slice=pos_slice
    )
    assert torch.equal(full, old_apply_ln_to_stack(cache, raw, mlp_input=mlp_input, **old))

    heads_layer = -1 if layer is None else layer  # stack_head_results takes -1, not None
    heads = cache.stack_head_results(layer=heads_layer, apply_ln=True, pos_slice=pos_slice)
    raw = cache.stack_head_results(layer=heads_layer, apply_ln=False, pos_slice=pos_slice)
    assert torch.equal(heads, old_apply_ln_to_stack(cache, raw, heads_layer, pos_slice=pos_slice))


@BATCHED
@pytest.mark.parametrize("pos_slice", [None, -1], ids=str)
@OLD_PATH_VARIANTS
def test_logit_attrs_keep_the_old_cached_scale(variant, pos_slice, batched):
    model = build_model(variant)
    _, cache = cached_run(variant, batched)
    stack = cache.decompose_resid(pos_slice=pos_slice)
    batch_dims = stack.shape[1:-1]
    generator = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, D_VOCAB, batch_dims, generator=generator)
    incorrect = torch.randint(0, D_VOCAB, batch_dims, generator=generator)

    attrs = cache.logit_attrs(stack, tokens, incorrect, pos_slice=pos_slice, has_batch_dim=batched)

    directions = model.W_U[:, tokens] - model.W_U[:, incorrect]  # [d_model, *batch_dims]
    directions = directions.movedim(0, -1)
    scaled = old_apply_ln_to_stack(cache, stack, pos_slice=pos_slice, has_batch_dim=batched)
    assert torch.equal(attrs, (scaled * directions).sum(dim=-1))


@pytest.mark.parametrize("variant", ["LNPre", "RMSPre"])
def test_cached_scale_is_the_model_only_at_the_last_layer(variant):
    """On folded models both conventions agree at the end, and the cached one is off before."""
    model = build_model(variant)
    logits, cache = cached_run(variant)
    cached = cache.accumulated_resid(apply_ln=True) @ model.W_U + model.b_U
    fresh = cache.accumulated_resid(apply_ln=True, recompute_ln=True) @ model.W_U + model.b_U
    torch.testing.assert_close(log_probs(cached[-1]), log_probs(logits), rtol=0, atol=1e-4)
    torch.testing.assert_close(log_probs(fresh[-1]), log_probs(logits), rtol=0, atol=1e-4)
    assert (log_probs(cached[0]) - log_probs(fresh[0])).abs().max() > 0.5
