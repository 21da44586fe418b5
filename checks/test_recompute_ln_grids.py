"""PR 1's exhaustive grids: ``normalize_without_hooks`` and ``recompute_ln``, repository-only.

PR 1 carries a small set of tests; the full grids it was developed against stay here, run by CI
against the installed fork:

* ``NormalizationBridge.normalize_without_hooks`` is the norm's own ``forward`` bit for bit
  (``torch.equal``) for every kind of norm the bridge wraps (LayerNorm from scratch, LayerNorm
  after weight processing, RMSNorm, Gemma's ``1 + w`` RMSNorm, native LN / LNPre / RMS / RMSPre,
  a LayerNorm without affine parameters, an ``Identity`` slot) x float32 / bfloat16 x one step /
  many steps; it fires no hook, and names the hooks it bypasses in a warning.
* ``ActivationCache.accumulated_resid`` / ``apply_ln_to_stack`` at every target (each block's
  ``ln1`` and ``ln2``, the unembed): the default is 4.3.0 bit for bit (against 4.3.0's own
  ``ActivationCache``, read from the pinned sdist, and against its loop written out), ``True`` is
  the target norm's forward, ``False`` the cached scale; no hook fires; the cache is untouched.
* The validation PR 1 no longer carries: those calls behave as pristine 4.3.0 does (same
  exception type and message, or ``torch.equal`` values), and the new option's own errors.

Models are tiny bridges built from configs, with random norm weights and a residual that grows
with depth, so that a missing weight or bias or a stale scale shows.
"""

import functools
import importlib.util
import inspect
import warnings
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import pytest
import torch
from conftest import pristine_module
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
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
from transformer_lens.config import TransformerBridgeConfig
from transformer_lens.hook_points import HookPoint
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.model_bridge.generalized_components import NormalizationBridge
from transformer_lens.model_bridge.generalized_components import (
    normalization as normalization_module,
)
from transformer_lens.model_bridge.sources import build_bridge_from_module

D_MODEL = 32
N_LAYERS = 3
TOKENS = torch.tensor([[1, 7, 11, 3, 5, 9], [2, 9, 4, 4, 6, 8]])
RECOMPUTE = [None, True, False]
DTYPES = [torch.float32, torch.bfloat16]
# (layer, mlp_input) of every target: ln1 and ln2 of each block, then the unembed.
TARGETS = [(layer, mlp) for layer in range(N_LAYERS) for mlp in (False, True)] + [(N_LAYERS, False)]
NORM_TARGETS = ("ln_final", "blocks.1.ln1", "blocks.1.ln2")
SMALL = dict(vocab_size=64, num_hidden_layers=N_LAYERS, num_attention_heads=4, intermediate_size=64)


# --- pristine 4.3.0 --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> ModuleType:
    """4.3.0's ``ActivationCache.py`` from the pinned sdist, imported by path beside the fork."""
    return pristine_module(
        "transformer_lens/ActivationCache.py", tmp_path_factory.mktemp("pristine")
    )


def _as_pristine(pristine: ModuleType, cache: ActivationCache) -> Any:
    """The same activations in another module's ActivationCache (4.3.0's, or the unchecked)."""
    return pristine.ActivationCache(
        cache.cache_dict, cache.model, has_batch_dim=cache.has_batch_dim
    )


def _outcome(call: Callable[[], Any]) -> Any:
    """What a call returns, or the exception it raises."""
    try:
        return call()
    except Exception as error:  # the comparison is the point: any exception is an outcome
        return error


def _assert_same_outcome(ours: Any, theirs: Any, message: bool = True) -> None:
    """4.3.0's exception (type and, with ``message``, text) or its values, ``torch.equal``."""
    if isinstance(theirs, Exception):
        assert type(ours) is type(theirs), (ours, theirs)
        if message:
            assert str(ours) == str(theirs)
    else:
        assert not isinstance(ours, Exception), ours
        assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)


@pytest.fixture(scope="module")
def fork_unchecked() -> ModuleType:
    """The installed fork's ``ActivationCache.py`` imported by path, without the runtime type
    checker pytest installs (jaxtyping's import hook) into ``transformer_lens``: as in a user's
    session, a badly typed argument reaches the code, as it does in 4.3.0 beside it."""
    path = Path(inspect.getfile(ActivationCache))
    spec = importlib.util.spec_from_file_location("ActivationCache_fork_unchecked", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- models ----------------------------------------------------------------------------------


def _randomize(model: torch.nn.Module, grow: bool) -> None:
    """Norm weights away from 1 and biases away from 0; with ``grow``, block outputs that grow
    with depth (so that a stale scale shows)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "ln" in name:
                param.copy_(torch.rand(param.shape, generator=generator) + 0.5)
            elif grow and name.endswith(("c_proj.weight", "o_proj.weight", "down_proj.weight")):
                param.mul_(4.0 ** (int(name.split(".")[2]) + 1))


def _from_hf(hf_model: torch.nn.Module, architecture: str, dtype: torch.dtype) -> TransformerBridge:
    _randomize(hf_model, grow=True)
    hf_model.to(dtype)
    return build_bridge_from_module(
        hf_model.eval(), architecture, hf_config=hf_model.config, dtype=dtype, device="cpu"
    )


def _gpt2(dtype: torch.dtype) -> TransformerBridge:
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=D_MODEL, n_layer=N_LAYERS, n_head=4)
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
            n_heads=4,
            n_layers=N_LAYERS,
            n_ctx=16,
            d_vocab=64,
            d_mlp=64,
            act_fn="gelu",
            normalization_type=normalization_type,
            dtype=dtype,
        )
        model = TransformerBridge.boot_native(config).eval()
        _randomize(model, grow=False)
        return model.to(dtype)

    return build


BUILDERS: Dict[str, Callable[[torch.dtype], TransformerBridge]] = {
    "gpt2-layernorm-from-scratch": _gpt2,
    "gpt2-layernorm-processed-weights": _gpt2_compat,
    "llama-rmsnorm": _llama,
    "gemma-rmsnorm-1-plus-w": _gemma,
    "native-LN": _native("LN"),
    "native-LNPre": _native("LNPre"),
    "native-RMS": _native("RMS"),
    "native-RMSPre": _native("RMSPre"),
}


@functools.lru_cache(maxsize=None)
def _model(kind: str, dtype: torch.dtype) -> TransformerBridge:
    """One model per kind and dtype for the whole module (every test removes what it adds)."""
    torch.manual_seed(0)
    return BUILDERS[kind](dtype)


@functools.lru_cache(maxsize=None)
def _model_and_cache(kind: str, dtype: torch.dtype) -> Tuple[TransformerBridge, ActivationCache]:
    model = _model(kind, dtype)
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


# --- normalize_without_hooks: every norm kind x dtype x step size ----------------------------


@pytest.fixture(scope="module", params=[(m, d) for m in BUILDERS for d in DTYPES], ids=str)
def model(request) -> TransformerBridge:
    return _model(*request.param)


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
def test_normalize_without_hooks_equals_the_forward_entry_by_entry(model, rows, monkeypatch):
    _walking(monkeypatch, rows)
    stack = _stack(model.cfg.dtype)
    for target in NORM_TARGETS:
        norm = model.get_submodule(target)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("error")  # no hook attached: nothing to warn about
            normalized = norm.normalize_without_hooks(stack)
        with torch.no_grad():
            entry_by_entry = torch.stack([norm(entry) for entry in stack])
            whole = norm(stack)
        assert normalized.dtype == model.cfg.dtype and normalized.shape == stack.shape
        assert torch.equal(normalized, entry_by_entry), target
        assert torch.equal(normalized, whole), target


@pytest.mark.parametrize("shape", [(D_MODEL,), (5, D_MODEL), (2, 1, 3, 4, D_MODEL)])
def test_normalize_without_hooks_any_leading_shape(model, shape, monkeypatch) -> None:
    _walking(monkeypatch, 7)
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 5).to(model.cfg.dtype)
    with torch.no_grad():
        assert torch.equal(model.ln_final.normalize_without_hooks(x), model.ln_final(x))


def test_normalize_without_hooks_fires_no_hook_and_names_the_bypassed_ones(model, monkeypatch):
    _walking(monkeypatch, 7)
    calls: List[str] = []
    for hook_point in model.hook_dict.values():
        hook_point.add_hook(lambda tensor, hook: calls.append(hook.name))
    handles = [
        model.get_submodule(target).register_forward_hook(lambda *args: calls.append("bridge"))
        for target in NORM_TARGETS
    ]
    stack = _stack(model.cfg.dtype)
    try:
        with torch.no_grad():
            model.ln_final(stack)
            assert calls, "the counting hooks are not live"
            calls.clear()
            for target in NORM_TARGETS:
                norm = model.get_submodule(target)
                bypassed = norm.bypassed_hook_names()
                # Every hook point of this norm has a hook (hook_in may carry an alias's name,
                # such as blocks.1.hook_resid_mid in compatibility mode): each is named.
                points = [m for m in norm.modules() if isinstance(m, HookPoint)]
                assert sorted(bypassed) == sorted(str(point.name) for point in points)
                assert {f"{target}.hook_normalized", f"{target}.hook_out"} <= set(bypassed)
                with pytest.warns(UserWarning, match="do not run in this normalization") as record:
                    norm.normalize_without_hooks(stack)
                (message,) = [str(w.message) for w in record]
                assert all(name in message for name in bypassed), message
    finally:
        model.reset_hooks()
        for handle in handles:
            handle.remove()
    assert calls == []
    assert all(not model.get_submodule(t).bypassed_hook_names() for t in NORM_TARGETS)


@pytest.mark.parametrize("kind", BUILDERS)
def test_normalize_without_hooks_keeps_autograd(kind, monkeypatch) -> None:
    _walking(monkeypatch, 7)
    norm = _model(kind, torch.float32).blocks[1].ln1
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
def test_normalize_without_hooks_modules_without_parameters(module, dtype, monkeypatch) -> None:
    """A LayerNorm without weight or bias, and a slot that does not normalize (ModernBERT's
    first decoder layer), both on the path that runs the wrapped module."""
    _walking(monkeypatch, 7)
    norm = NormalizationBridge("ln", SimpleNamespace(eps=1e-5), use_native_layernorm_autograd=True)
    norm.set_original_component(module)
    stack = _stack(dtype)
    with torch.no_grad():
        assert torch.equal(norm.normalize_without_hooks(stack), norm(stack))


@pytest.mark.parametrize("native_autograd", [False, True])
def test_normalize_without_hooks_unset_component_raises(native_autograd) -> None:
    """Never an answer without a wrapped norm. PR 1 no longer checks this itself (the forward
    raises RuntimeError naming set_original_component; this path fails on the missing module)."""
    config = SimpleNamespace(eps=1e-5)
    norm = NormalizationBridge("ln", config, use_native_layernorm_autograd=native_autograd)
    with pytest.raises(Exception):
        norm.normalize_without_hooks(torch.ones(2, D_MODEL))
    with pytest.raises(RuntimeError, match="set_original_component"):
        norm(torch.ones(2, D_MODEL))


# --- accumulated_resid / apply_ln_to_stack at every target -----------------------------------

LENS_MODELS = {
    "gpt2-float32": ("gpt2-layernorm-from-scratch", torch.float32),
    "gpt2-bfloat16": ("gpt2-layernorm-from-scratch", torch.bfloat16),
    "gpt2-compatibility-mode": ("gpt2-layernorm-processed-weights", torch.float32),
    "llama-float32": ("llama-rmsnorm", torch.float32),
    "llama-bfloat16": ("llama-rmsnorm", torch.bfloat16),
}
GPT2 = LENS_MODELS["gpt2-float32"]


@pytest.fixture(scope="module", params=list(LENS_MODELS))
def lens(request) -> Tuple[TransformerBridge, ActivationCache]:
    return _model_and_cache(*LENS_MODELS[request.param])


@pytest.fixture(scope="module")
def gpt2() -> Tuple[TransformerBridge, ActivationCache]:
    return _model_and_cache(*GPT2)


def _unfolded(model: TransformerBridge) -> bool:
    """Raw mode: the norms apply their own weight and bias (compatibility mode folds them)."""
    return not model.compatibility_mode


@pytest.mark.parametrize("pos_slice", [None, -1])
@pytest.mark.parametrize("incl_mid", [False, True])
def test_default_equals_pristine_and_the_per_entry_loop(lens, incl_mid, pos_slice, pristine) -> None:
    model, cache = lens
    theirs = _as_pristine(pristine, cache)
    for layer, mlp_input in TARGETS:
        kwargs = dict(layer=layer, mlp_input=mlp_input, incl_mid=incl_mid, pos_slice=pos_slice)
        raw = cache.accumulated_resid(**kwargs)
        if layer == N_LAYERS:
            expected = _loop_of_4_3_0(model.ln_final, raw)
        else:
            index = -1 if pos_slice == -1 else None
            expected = _cached_scale_of_4_3_0(cache, raw, layer, mlp_input, index)
        assert torch.equal(theirs.accumulated_resid(apply_ln=True, **kwargs), expected)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # 4.3.0's calls warn about nothing new
            assert torch.equal(cache.accumulated_resid(apply_ln=True, **kwargs), expected)
            default = cache.accumulated_resid(apply_ln=True, recompute_ln=None, **kwargs)
            assert torch.equal(default, expected)
            for recompute_ln in (False, True) if layer == N_LAYERS else (False,):
                # apply_ln_to_stack's recompute_ln is 4.3.0's own option at these targets.
                kw = dict(mlp_input=mlp_input, pos_slice=pos_slice, recompute_ln=recompute_ln)
                ours = cache.apply_ln_to_stack(raw, layer, **kw)
                assert torch.equal(ours, theirs.apply_ln_to_stack(raw, layer, **kw))


def test_recompute_true_is_the_target_norms_forward_at_every_target(lens) -> None:
    model, cache = lens
    for layer, mlp_input in TARGETS:
        raw = cache.accumulated_resid(layer=layer, mlp_input=mlp_input, incl_mid=True)
        expected = _loop_of_4_3_0(_norm(model, layer, mlp_input), raw)
        kwargs = dict(layer=layer, mlp_input=mlp_input, incl_mid=True, apply_ln=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert torch.equal(cache.accumulated_resid(recompute_ln=True, **kwargs), expected)
            actual = cache.apply_ln_to_stack(raw, layer, mlp_input=mlp_input, recompute_ln=True)
            assert torch.equal(actual, expected)
        # The embeddings' own statistics, not the target's cached scale: far apart once the
        # residual has grown, that is for every target after the first block's ln1.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the unfolded-weights warning, checked below
            cached = cache.accumulated_resid(recompute_ln=False, **kwargs)
        if len(raw) > 1:
            assert (expected[0].float() - cached[0].float()).abs().max() > 0.1


def test_recompute_false_is_the_cached_scale_at_every_target(lens) -> None:
    """And says so where the norm's weight and bias are not folded (raw mode), naming the fix."""
    model, cache = lens
    for layer, mlp_input in TARGETS:
        raw = cache.accumulated_resid(layer=layer, mlp_input=mlp_input)
        expected = _cached_scale_of_4_3_0(cache, raw, layer, mlp_input)
        kwargs = dict(layer=layer, mlp_input=mlp_input, apply_ln=True, recompute_ln=False)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            actual = cache.accumulated_resid(**kwargs)
        assert torch.equal(actual, expected)
        messages = [str(w.message) for w in record]
        if _unfolded(model):
            (message,) = messages
            assert f"layer={layer} (mlp_input={mlp_input})" in message
            assert "enable_compatibility_mode()" in message and "recompute_ln=True" in message
        else:
            assert messages == []


@pytest.mark.parametrize("selector", [dict(top_k=5), dict(targets=[3, 9]), dict()])
def test_logit_lens_tool_equals_itself_with_the_per_entry_loop(lens, selector, monkeypatch) -> None:
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


@pytest.fixture(scope="module")
def batchless_pair(gpt2) -> Tuple[ActivationCache, ActivationCache]:
    model, _ = gpt2
    _, batched = model.run_with_cache(TOKENS[:1])
    _, batchless = model.run_with_cache(TOKENS[:1], remove_batch_dim=True)
    return batched, batchless


@pytest.mark.parametrize("recompute_ln", RECOMPUTE)
def test_batchless_cache_is_the_batched_result_without_its_batch(batchless_pair, recompute_ln):
    batched, batchless = batchless_pair
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # recompute_ln=False on raw weights: checked above
        for layer, mlp_input in TARGETS:
            kwargs = dict(
                layer=layer, mlp_input=mlp_input, apply_ln=True, recompute_ln=recompute_ln
            )
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
def test_no_hook_fires(gpt2, recompute_ln) -> None:
    """4.3.0 fired every ln_final hook once per stack entry: a leftover hook changed the lens.
    Now none fires, and every normalization that bypasses the target's hooks names them."""
    model, cache = gpt2
    counter = _HookCounter(model)
    try:
        model(TOKENS)
        assert "ln_final.hook_scale" in counter.calls and "norm" in counter.calls
        counter.calls.clear()
        for layer, mlp_input in TARGETS:
            kwargs = dict(layer=layer, mlp_input=mlp_input)
            # Fresh normalizations, each naming the bypassed hooks: accumulated_resid's (True,
            # or the default at the unembed) and apply_ln_to_stack's (True).
            accumulated = recompute_ln or (recompute_ln is None and layer == N_LAYERS)
            fresh = int(bool(accumulated)) + int(bool(recompute_ln))
            target = "ln_final" if layer == N_LAYERS else f"blocks.{layer}.ln{1 + mlp_input}"
            with warnings.catch_warnings(record=True) as record:
                warnings.simplefilter("always")
                stack = cache.accumulated_resid(apply_ln=True, recompute_ln=recompute_ln, **kwargs)
                cache.apply_ln_to_stack(stack, recompute_ln=bool(recompute_ln), **kwargs)
            bypass = [str(w.message) for w in record if "do not run" in str(w.message)]
            assert len(bypass) == fresh, bypass
            assert all(f"{target}.hook_normalized" in message for message in bypass), bypass
    finally:
        counter.remove()
    assert counter.calls == []


def test_a_hook_on_the_norm_changes_no_lens_value_and_is_named(gpt2) -> None:
    """The lens is hook-free: an editing hook on ln_final does not apply, and is named, in
    accumulated_resid and in the logit-lens tool alike."""
    model, cache = gpt2
    clean = cache.accumulated_resid(apply_ln=True)
    tool_clean = cache.logit_lens(positions=None, return_type="log_probs").readout.values
    model.ln_final.hook_normalized.add_hook(lambda tensor, hook: tensor * 3)
    try:
        with pytest.warns(UserWarning, match=r"ln_final\.hook_normalized"):
            assert torch.equal(cache.accumulated_resid(apply_ln=True), clean)
        with pytest.warns(UserWarning, match=r"ln_final\.hook_normalized"):
            tool = cache.logit_lens(positions=None, return_type="log_probs").readout.values
        assert torch.equal(tool, tool_clean)
    finally:
        model.reset_hooks()


def test_cache_is_not_mutated(gpt2) -> None:
    _, cache = gpt2
    before: Dict[str, torch.Tensor] = {key: value.clone() for key, value in cache.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # recompute_ln=False on raw weights: checked above
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


# --- what PR 1 no longer validates behaves as 4.3.0; the new option's own errors -------------


@pytest.mark.parametrize(
    "layer", [-2, N_LAYERS + 1, 1.0, "1", True, np.int64(1), np.int64(N_LAYERS)], ids=repr
)
def test_any_layer_behaves_as_in_4_3_0(gpt2, pristine, fork_unchecked, layer) -> None:
    """Numpy integers, floats, strings, out-of-range layers: 4.3.0's answer or 4.3.0's error."""
    _, fork_cache = gpt2
    ours, theirs = _as_pristine(fork_unchecked, fork_cache), _as_pristine(pristine, fork_cache)
    stack = fork_cache.accumulated_resid()
    _assert_same_outcome(
        _outcome(lambda: ours.accumulated_resid(layer=layer, apply_ln=True)),
        _outcome(lambda: theirs.accumulated_resid(layer=layer, apply_ln=True)),
    )
    _assert_same_outcome(
        _outcome(lambda: ours.apply_ln_to_stack(stack, layer=layer)),
        _outcome(lambda: theirs.apply_ln_to_stack(stack, layer=layer)),
    )
    if layer == N_LAYERS:  # 4.3.0's recompute_ln=True, which it applies at the unembed only
        _assert_same_outcome(
            _outcome(lambda: ours.apply_ln_to_stack(stack, layer=layer, recompute_ln=True)),
            _outcome(lambda: theirs.apply_ln_to_stack(stack, layer=layer, recompute_ln=True)),
        )


@pytest.mark.parametrize("recompute_ln", [1, "True", 0.0])
def test_recompute_ln_not_a_bool(gpt2, fork_unchecked, recompute_ln) -> None:
    cache = _as_pristine(fork_unchecked, gpt2[1])
    with pytest.raises(ValueError, match="pass True or False together with apply_ln=True"):
        cache.accumulated_resid(apply_ln=True, recompute_ln=recompute_ln)


@pytest.mark.parametrize("recompute_ln", [True, False])
def test_recompute_ln_takes_numpy_bools_as_apply_ln_does(gpt2, fork_unchecked, recompute_ln):
    """Without the runtime type checker (a user's session), numpy.bool_ is a bool, as for apply_ln."""
    cache = _as_pristine(fork_unchecked, gpt2[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # recompute_ln=False on raw weights: checked above
        expected = cache.accumulated_resid(layer=1, apply_ln=True, recompute_ln=recompute_ln)
        for apply_ln in (True, np.True_):
            kwargs = dict(layer=1, apply_ln=apply_ln, recompute_ln=np.bool_(recompute_ln))
            assert torch.equal(cache.accumulated_resid(**kwargs), expected)


@pytest.mark.parametrize("recompute_ln", [True, False])
def test_recompute_without_apply_ln(gpt2, recompute_ln) -> None:
    _, cache = gpt2
    with pytest.raises(ValueError, match=rf"recompute_ln={recompute_ln}.*apply_ln=True"):
        cache.accumulated_resid(recompute_ln=recompute_ln)


@pytest.mark.parametrize("recompute_ln", RECOMPUTE)
def test_mlp_input_at_the_unembed_is_ignored_as_in_4_3_0(gpt2, pristine, recompute_ln) -> None:
    """There is no MLP after the last block: 4.3.0 ignores mlp_input there, and so does every
    recompute_ln (the default being 4.3.0's call itself)."""
    _, cache = gpt2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # recompute_ln=False on raw weights: checked above
        ours = cache.accumulated_resid(mlp_input=True, apply_ln=True, recompute_ln=recompute_ln)
        without = cache.accumulated_resid(apply_ln=True, recompute_ln=recompute_ln)
    assert torch.equal(ours, without)
    if recompute_ln is None:
        theirs = _as_pristine(pristine, cache).accumulated_resid(mlp_input=True, apply_ln=True)
        assert torch.equal(ours, theirs)


def test_width_as_in_4_3_0_where_4_3_0_normalizes(pristine) -> None:
    """A projected stack divided by a cached RMS scale, which 4.3.0 computes, is still accepted;
    fresh statistics of a stack not d_model wide raise, as 4.3.0's loop did at the unembed, and
    now at ln1 too (where 4.3.0 ignored recompute_ln=True), never a value."""
    model, cache = _model_and_cache("llama-rmsnorm", torch.float32)
    theirs = _as_pristine(pristine, cache)
    projected = torch.randn(2, *TOKENS.shape, 5, generator=torch.Generator().manual_seed(4))
    expected = projected / cache["blocks.1.ln1.hook_scale"]
    assert torch.equal(cache.apply_ln_to_stack(projected, layer=1), expected)
    assert torch.equal(theirs.apply_ln_to_stack(projected, layer=1), expected)
    # The broadcast error names a different dimension: 4.3.0 normalized entry by entry.
    _assert_same_outcome(
        _outcome(lambda: cache.apply_ln_to_stack(projected, recompute_ln=True)),
        _outcome(lambda: theirs.apply_ln_to_stack(projected, recompute_ln=True)),
        message=False,
    )
    with pytest.raises(RuntimeError):
        cache.apply_ln_to_stack(projected, layer=1, recompute_ln=True)


@pytest.fixture(scope="module")
def filtered_caches(gpt2) -> Dict[str, ActivationCache]:
    model, _ = gpt2
    caches = {}
    for kept in ("hook_resid", "hook_scale"):
        _, caches[kept] = model.run_with_cache(TOKENS, names_filter=lambda name: kept in name)
    return caches


@pytest.mark.parametrize("kept", ["hook_resid", "hook_scale"])
@pytest.mark.parametrize("layer,mlp_input", TARGETS)
def test_names_filter_cache(gpt2, filtered_caches, pristine, kept, layer, mlp_input) -> None:
    """A cache without a hook the call reads: 4.3.0's calls give 4.3.0's KeyError/IndexError
    (or its values); the new options raise too, or give the full cache's values where they read
    nothing the filter dropped (fresh statistics read no scale)."""
    _, full = gpt2
    cache = filtered_caches[kept]
    theirs = _as_pristine(pristine, cache)
    kwargs = dict(layer=layer, mlp_input=mlp_input, apply_ln=True)
    _assert_same_outcome(
        _outcome(lambda: cache.accumulated_resid(**kwargs)),
        _outcome(lambda: theirs.accumulated_resid(**kwargs)),
    )
    stack = full.accumulated_resid(layer=layer, mlp_input=mlp_input)
    for recompute_ln in (False, True) if layer == N_LAYERS else (False,):
        kw = dict(mlp_input=mlp_input, recompute_ln=recompute_ln)
        _assert_same_outcome(
            _outcome(lambda: cache.apply_ln_to_stack(stack, layer, **kw)),
            _outcome(lambda: theirs.apply_ln_to_stack(stack, layer, **kw)),
        )
    for recompute_ln in (True, False):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # recompute_ln=False on raw weights: checked above
            ours = _outcome(lambda: cache.accumulated_resid(recompute_ln=recompute_ln, **kwargs))
            expected = full.accumulated_resid(recompute_ln=recompute_ln, **kwargs)
        if kept == "hook_resid" and recompute_ln:
            assert torch.equal(ours, expected)
        else:
            assert isinstance(ours, (KeyError, IndexError)), ours


def _build(hf_model: torch.nn.Module, architecture: str) -> Tuple[Any, ActivationCache]:
    model = build_bridge_from_module(hf_model.eval(), architecture, hf_config=hf_model.config)
    _, cache = model.run_with_cache(TOKENS)
    return model, cache


def test_resid_mid_on_parallel_blocks_as_in_4_3_0(pristine) -> None:
    """GPT-NeoX's attention and MLP read the same resid_pre: there is no resid_mid, and every
    recompute_ln raises 4.3.0's KeyError. Its ln2 exists: a given stack can be its input."""
    torch.manual_seed(0)
    config = GPTNeoXConfig(hidden_size=D_MODEL, max_position_embeddings=16, **SMALL)
    model, cache = _build(GPTNeoXForCausalLM(config), "GPTNeoXForCausalLM")
    theirs = _as_pristine(pristine, cache)
    for kwargs in (dict(incl_mid=True), dict(layer=1, mlp_input=True)):
        expected = _outcome(lambda: theirs.accumulated_resid(apply_ln=True, **kwargs))
        assert isinstance(expected, KeyError)
        for recompute_ln in RECOMPUTE:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # recompute_ln=False on raw weights
                ours = _outcome(
                    lambda: cache.accumulated_resid(
                        apply_ln=True, recompute_ln=recompute_ln, **kwargs
                    )
                )
            _assert_same_outcome(ours, expected)
    stack = cache.accumulated_resid(layer=1)
    actual = cache.apply_ln_to_stack(stack, layer=1, mlp_input=True, recompute_ln=True)
    assert torch.equal(actual, _loop_of_4_3_0(model.blocks[1].ln2, stack))


def test_resid_mid_missing_where_the_config_does_not_say_as_in_4_3_0(pristine) -> None:
    """RecurrentGemma's config says neither parallel nor attention-only, and it has no
    resid_mid: 4.3.0's KeyError 'blocks.0.hook_resid_mid', whatever recompute_ln."""
    config = RecurrentGemmaConfig(
        hidden_size=D_MODEL, lru_width=D_MODEL, head_dim=8, num_key_value_heads=1, **SMALL
    )
    model, cache = _build(RecurrentGemmaForCausalLM(config), "RecurrentGemmaForCausalLM")
    assert not model.cfg.parallel_attn_mlp and not model.cfg.attn_only
    expected = _outcome(
        lambda: _as_pristine(pristine, cache).accumulated_resid(incl_mid=True, apply_ln=True)
    )
    assert isinstance(expected, KeyError) and "blocks.0.hook_resid_mid" in str(expected)
    for recompute_ln in RECOMPUTE:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # recompute_ln=False on raw weights
            ours = _outcome(
                lambda: cache.accumulated_resid(
                    incl_mid=True, apply_ln=True, recompute_ln=recompute_ln
                )
            )
        _assert_same_outcome(ours, expected)


def test_missing_norm_as_in_4_3_0(pristine) -> None:
    """OLMo-2 normalizes sublayer outputs: no ln1. 4.3.0 raises a KeyError naming it; so does
    every recompute_ln (no norm, so nothing fresh either), and apply_ln_to_stack."""
    config = Olmo2Config(hidden_size=16, num_key_value_heads=2, **SMALL)
    _, cache = _build(Olmo2ForCausalLM(config), "Olmo2ForCausalLM")
    theirs = _as_pristine(pristine, cache)
    expected = _outcome(lambda: theirs.accumulated_resid(layer=1, apply_ln=True))
    assert isinstance(expected, KeyError) and "has no ln1" in str(expected)
    for recompute_ln in RECOMPUTE:
        ours = _outcome(
            lambda: cache.accumulated_resid(layer=1, apply_ln=True, recompute_ln=recompute_ln)
        )
        _assert_same_outcome(ours, expected)
    stack = cache.accumulated_resid(layer=1)
    for recompute_ln in (False, True):
        _assert_same_outcome(
            _outcome(lambda: cache.apply_ln_to_stack(stack, 1, recompute_ln=recompute_ln)),
            _outcome(lambda: theirs.apply_ln_to_stack(stack, 1, recompute_ln=recompute_ln)),
        )
