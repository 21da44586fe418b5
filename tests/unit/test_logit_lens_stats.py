"""Streaming logit-lens statistics against the naive full computation.

The reference materializes every layer's float32 logits, normalized by the model's own norm module
(``ln_final``, for the logit lens) or by hand with the cached scale (``recompute_ln=False``), and
takes ``log_softmax`` over the whole vocabulary. The vocabulary (203) divides none of the vocab
chunk sizes used, and the layer chunk sizes do not divide the number of layers covered.
"""

from typing import List, Optional

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.ActivationCache import ActivationCache
from transformer_lens.utilities.logit_lens_stats import LogitLensStats, compute_logit_lens_stats

D_VOCAB = 203
N_LAYERS = 3
TOKENS = torch.tensor([[5, 17, 42, 99, 150, 7, 3], [200, 1, 88, 64, 13, 120, 9]])


def make_model(
    dtype: torch.dtype = torch.float32,
    normalization_type: str = "LN",
    soft_cap: float = -1.0,
) -> HookedTransformer:
    cfg = HookedTransformerConfig(
        n_layers=N_LAYERS,
        d_model=32,
        d_head=8,
        n_heads=4,
        d_mlp=64,
        n_ctx=16,
        d_vocab=D_VOCAB,
        act_fn="gelu",
        normalization_type=normalization_type,
        output_logits_soft_cap=soft_cap,
        dtype=dtype,
        seed=0,
    )
    model = HookedTransformer(cfg)
    # Random init leaves norm weights at 1 and biases at 0, which would hide a missing weight or
    # bias; larger output weights make the residual norm grow with depth, as in trained models.
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".w") and "ln" in name:
                param.copy_(1 + 0.5 * torch.randn(param.shape, generator=generator))
            elif name.endswith(".b") and "ln" in name or name.endswith("b_U"):
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
            elif name.endswith("W_out") or name.endswith("W_O"):
                param.mul_(4.0)
            elif name.endswith("W_U"):
                param.mul_(8.0)
    return model


@pytest.fixture(scope="module")
def model() -> HookedTransformer:
    return make_model()


@pytest.fixture(scope="module")
def run(model):
    return model.run_with_cache(TOKENS)


def lens_keys(n_layers: int, layer: Optional[int] = None, incl_mid: bool = False) -> List[str]:
    """The cache keys of accumulated_resid's rows, written out independently of it."""
    layer = n_layers if layer is None else layer
    keys = []
    for index in range(layer + 1):
        if index == n_layers:
            keys.append(f"blocks.{n_layers - 1}.hook_resid_post")
            continue
        keys.append(f"blocks.{index}.hook_resid_pre")
        if incl_mid and index < layer:
            keys.append(f"blocks.{index}.hook_resid_mid")
    return keys


def naive_logits(
    model: HookedTransformer,
    cache: ActivationCache,
    keys: List[str],
    recompute_ln: bool,
    pos: slice = slice(None),
) -> torch.Tensor:
    """Float32 logits of every row, [rows, *batch_and_pos, d_vocab], all materialized."""
    rows = []
    for key in keys:
        resid = cache[key][..., pos, :]
        batched = resid if cache.has_batch_dim else resid[None]
        if recompute_ln:
            normalized = model.ln_final(batched)
        else:
            scale = cache["ln_final.hook_scale"][..., pos, :]
            normalized = (batched - batched.mean(-1, keepdim=True)) / scale
        rows.append(normalized if cache.has_batch_dim else normalized[0])
    logits = torch.stack(rows).float() @ model.W_U.float() + model.b_U.float()
    cap = model.cfg.output_logits_soft_cap
    return cap * torch.tanh(logits / cap) if cap > 0 else logits


def naive_stats(
    logits: torch.Tensor,
    final_logits: torch.Tensor,
    targets: Optional[torch.Tensor] = None,
    k: int = 5,
) -> dict:
    log_probs = logits.log_softmax(-1)
    final_log_probs = final_logits.log_softmax(-1)
    stats = {
        "entropy": -(log_probs.exp() * log_probs).sum(-1),
        "kl_to_final": (final_log_probs.exp() * (final_log_probs - log_probs)).sum(-1),
        "top_k_probs": log_probs.exp().topk(k, dim=-1).values,
        "top_k_tokens": log_probs.topk(k, dim=-1).indices,
    }
    if targets is not None:
        index = targets.expand(logits.shape[:-1])[..., None]
        target_logit = logits.gather(-1, index)
        stats["target_prob"] = log_probs.gather(-1, index)[..., 0].exp()
        stats["target_rank"] = (logits > target_logit).sum(-1)
    return stats


def assert_matches(stats: LogitLensStats, expected: dict, atol: float = 1e-4, rtol: float = 1e-4):
    for name, value in expected.items():
        actual = getattr(stats, name)
        assert actual is not None, name
        assert actual.shape == value.shape, name
        if name in ("target_rank", "top_k_tokens"):
            assert torch.equal(actual, value), name
        else:
            assert actual.dtype == torch.float32, name
            torch.testing.assert_close(actual, value, atol=atol, rtol=rtol, msg=name)


@pytest.mark.parametrize("recompute_ln", [True, False])
@pytest.mark.parametrize(
    "layer_chunk_size, vocab_chunk_size", [(3, 64), (1, 50), (None, 128), (None, None)]
)
def test_matches_naive_computation(run, model, recompute_ln, layer_chunk_size, vocab_chunk_size):
    _, cache = run
    keys = lens_keys(N_LAYERS)
    logits = naive_logits(model, cache, keys, recompute_ln)
    targets = torch.roll(TOKENS, -1, dims=1)

    stats = cache.logit_lens_stats(
        target_tokens=targets,
        top_k=5,
        recompute_ln=recompute_ln,
        layer_chunk_size=layer_chunk_size,
        vocab_chunk_size=vocab_chunk_size,
    )

    assert stats.labels == ["0_pre", "1_pre", "2_pre", "final_post"]
    assert_matches(stats, naive_stats(logits, logits[-1], targets))
    torch.testing.assert_close(stats.entropy_bits, stats.entropy / torch.log(torch.tensor(2.0)))


def test_the_two_conventions_differ(run):
    _, cache = run
    fresh = cache.logit_lens_stats()
    cached = cache.logit_lens_stats(recompute_ln=False)
    # The cached scale is the final residual's, far larger than early residuals' own: early
    # layers look flatter than they are.
    assert (cached.entropy[0] > fresh.entropy[0] + 0.5).all()


@pytest.mark.parametrize("normalization_type, soft_cap", [("LN", 4.0), ("RMS", -1.0)])
def test_last_row_is_the_model(normalization_type, soft_cap):
    model = make_model(normalization_type=normalization_type, soft_cap=soft_cap)
    logits, cache = model.run_with_cache(TOKENS)
    log_probs = logits.log_softmax(-1)

    stats = cache.logit_lens_stats(top_k=3, vocab_chunk_size=64)

    torch.testing.assert_close(stats.entropy[-1], -(log_probs.exp() * log_probs).sum(-1))
    torch.testing.assert_close(stats.top_k_probs[-1], log_probs.exp().topk(3).values)
    assert torch.equal(stats.kl_to_final[-1], torch.zeros_like(stats.kl_to_final[-1]))
    keys = lens_keys(N_LAYERS)
    naive = naive_logits(model, cache, keys, recompute_ln=True)
    assert_matches(stats, naive_stats(naive, naive[-1], k=3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("recompute_ln", [True, False])
def test_half_precision(dtype, recompute_ln):
    model = make_model(dtype=dtype)
    _, cache = model.run_with_cache(TOKENS)
    keys = lens_keys(N_LAYERS)
    logits = naive_logits(model, cache, keys, recompute_ln)

    stats = cache.logit_lens_stats(
        top_k=5, recompute_ln=recompute_ln, layer_chunk_size=3, vocab_chunk_size=64
    )

    # Both sides unembed the same half-precision normalized residual in float32.
    assert_matches(stats, naive_stats(logits, logits[-1]))


def test_batchless_cache(model):
    _, batched_cache = model.run_with_cache(TOKENS[:1])
    _, cache = model.run_with_cache(TOKENS[:1], remove_batch_dim=True)
    assert not cache.has_batch_dim
    targets = TOKENS[0]
    logits = naive_logits(model, cache, lens_keys(N_LAYERS), recompute_ln=True)

    stats = cache.logit_lens_stats(target_tokens=targets, top_k=5, vocab_chunk_size=64)

    assert stats.entropy.shape == (N_LAYERS + 1, TOKENS.shape[1])
    assert_matches(stats, naive_stats(logits, logits[-1], targets))
    batched = batched_cache.logit_lens_stats(target_tokens=targets[None], vocab_chunk_size=64)
    torch.testing.assert_close(stats.entropy, batched.entropy[:, 0])


@pytest.mark.parametrize("recompute_ln", [True, False])
def test_pos_slice_layer_and_incl_mid(run, model, recompute_ln):
    _, cache = run
    pos = slice(2, 6)  # accumulated_resid takes pos_slice=(2, 6), utils.Slice, for this
    keys = lens_keys(N_LAYERS, layer=2, incl_mid=True)
    logits = naive_logits(model, cache, keys, recompute_ln, pos)
    final_key = lens_keys(N_LAYERS)[-1:]
    final_logits = naive_logits(model, cache, final_key, recompute_ln, pos)[0]
    targets = TOKENS[:, 3:7]

    stats = cache.logit_lens_stats(
        target_tokens=targets,
        top_k=4,
        layer=2,
        incl_mid=True,
        pos_slice=(2, 6),
        recompute_ln=recompute_ln,
        layer_chunk_size=2,
        vocab_chunk_size=100,
    )

    assert stats.labels == ["0_pre", "0_mid", "1_pre", "1_mid", "2_pre"]
    assert_matches(stats, naive_stats(logits, final_logits, targets, k=4))


def test_one_target_for_all_positions(run, model):
    _, cache = run
    logits = naive_logits(model, cache, lens_keys(N_LAYERS), recompute_ln=True)
    target = torch.tensor(42)

    stats = cache.logit_lens_stats(target_tokens=target, vocab_chunk_size=64)

    expected = naive_stats(logits, logits[-1], target)
    torch.testing.assert_close(stats.target_prob, expected["target_prob"], atol=1e-5, rtol=1e-4)
    assert torch.equal(stats.target_rank, expected["target_rank"])


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operator returns."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor):
                self.numel = max(self.numel, tensor.numel())
        return out


def test_no_tensor_spans_layers_and_vocabulary(run):
    _, cache = run
    n_rows, n_layers_covered = TOKENS.numel(), N_LAYERS + 1
    largest = LargestTensor()

    with largest:
        cache.logit_lens_stats(
            target_tokens=TOKENS, top_k=5, layer_chunk_size=2, vocab_chunk_size=64
        )

    one_chunk = 2 * n_rows * 64
    residual_stack = n_layers_covered * n_rows * cache.model.cfg.d_model
    unembed_chunk = cache.model.cfg.d_model * 64
    assert largest.numel <= max(one_chunk, residual_stack, unembed_chunk)
    assert largest.numel < n_layers_covered * n_rows * D_VOCAB // 2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"top_k": 0}, "top_k"),
        ({"top_k": D_VOCAB + 1}, "top_k"),
        ({"vocab_chunk_size": 0}, "vocab_chunk_size"),
        ({"layer_chunk_size": 0}, "layer_chunk_size"),
        ({"target_tokens": torch.zeros(3, 7, dtype=torch.long)}, "broadcast"),
        ({"target_tokens": torch.full((2, 7), D_VOCAB)}, "d_vocab"),
        ({"layer": N_LAYERS + 1}, "layer"),
    ],
)
def test_invalid_arguments_raise(run, kwargs, match):
    _, cache = run
    with pytest.raises(ValueError, match=match):
        cache.logit_lens_stats(**kwargs)


def test_float_targets_raise(run):
    _, cache = run
    # Under the test suite's runtime type checks jaxtyping rejects them first (a TypeError).
    with pytest.raises((ValueError, TypeError), match="integers|target_tokens"):
        cache.logit_lens_stats(target_tokens=torch.zeros(2, 7))
