"""Tests of the logit lens's KL to the model's output and target probabilities.

The reference for ``kl_to_final`` is a naive KL from the tool's own full-vocabulary
log-probabilities: the entries' from the same call, the model's output from the final entry
read as the model reads it (``layers=[-1]``). Bridges are small GPT-2s built from configs (no
Hub download), with a random final norm and a non-zero ``b_U``.
"""

from typing import Any, Dict, List

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from transformers import GPT2Config, GPT2LMHeadModel

from transformer_lens.model_bridge.sources import build_bridge_from_module
from transformer_lens.tools.analysis import logit_lens, logit_readout

D_VOCAB = 101
TOKENS = torch.tensor([[1, 7, 11, 3, 5, 60, 100, 42], [2, 9, 4, 4, 6, 66, 30, 0]])


def _gpt2(dtype: torch.dtype = torch.float32, d_vocab: int = D_VOCAB) -> Any:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=d_vocab, n_positions=32, n_embd=32, n_layer=3, n_head=4)
    hf = GPT2LMHeadModel(cfg).eval()
    hf.lm_head = torch.nn.Linear(32, d_vocab, bias=True)
    hf.config.tie_word_embeddings = False
    with torch.no_grad():
        hf.lm_head.weight.normal_(0.0, 0.3)
        hf.lm_head.bias.normal_(0.0, 1.0)
        hf.transformer.ln_f.weight.normal_(1.0, 0.3)
        hf.transformer.ln_f.bias.normal_(0.0, 0.3)
    return build_bridge_from_module(
        hf.to(dtype), "GPT2LMHeadModel", hf_config=cfg, dtype=dtype, device="cpu"
    )


@pytest.fixture(scope="module")
def gpt2() -> Any:
    return _gpt2()


@pytest.fixture(scope="module")
def cache(gpt2) -> Any:
    return gpt2.run_with_cache(TOKENS[:, :-1])[1]


def _naive_kl(cache, result, **selection) -> torch.Tensor:
    """KL(p_output || p_entry) from the tool's own log-probs: ``result`` is a full-vocabulary
    ``return_type="log_probs"`` call; the model's output is the final entry read as it reads it."""
    output = logit_lens(cache, layers=[-1], return_type="log_probs", **selection).values[0]
    return (output.exp() * (output - result.values)).sum(-1)


SHAPES: Dict[str, Dict[str, Any]] = {
    "batched, all positions": dict(positions=None),
    "int batch_slice, last position": dict(batch_slice=0),
    "positions slice, incl_mid": dict(positions=(1, 5), incl_mid=True),
    "layers without the final entry": dict(positions=None, layers=[0, 2]),
    "final entry first": dict(positions=None, layers=[-1, 0]),
    "apply_ln=False": dict(positions=None, apply_ln=False),
    "lens": dict(positions=None, lens=lambda entry, index: entry * (1.0 + 0.2 * index)),
    "chunk smaller than the entries": dict(positions=(0, 3), chunk_size=3, incl_mid=True),
}


@pytest.mark.parametrize("shape", SHAPES, ids=list(SHAPES))
def test_kl_matches_the_naive_kl_at_every_stack_shape(cache, shape):
    options = SHAPES[shape]
    selection = {k: v for k, v in options.items() if k in ("positions", "batch_slice")}
    result = logit_lens(cache, return_type="log_probs", kl_to_final=True, **options)
    naive = _naive_kl(cache, result, **selection)
    kl = result.readout.kl_to_final
    assert kl.shape == result.values.shape[:-1]
    torch.testing.assert_close(kl, naive, atol=1e-5, rtol=1e-4)
    plain = logit_lens(cache, return_type="log_probs", **options)
    torch.testing.assert_close(result.values, plain.values, atol=1e-5, rtol=1e-5)
    if "final_post" in result.labels and "lens" not in options and "apply_ln" not in options:
        final = result.labels.index("final_post")  # read as the model reads it: exactly 0
        assert torch.equal(kl[final], torch.zeros_like(kl[final]))


@pytest.mark.parametrize("positions", [None, -1])
def test_kl_on_a_batchless_cache(gpt2, positions):
    _, cache = gpt2.run_with_cache(TOKENS[:1, :-1])
    cache = cache.remove_batch_dim()
    result = logit_lens(cache, positions=positions, return_type="log_probs", kl_to_final=True)
    naive = _naive_kl(cache, result, positions=positions)
    torch.testing.assert_close(result.readout.kl_to_final, naive, atol=1e-5, rtol=1e-4)
    assert torch.equal(result.readout.kl_to_final[-1], torch.zeros_like(naive[-1]))


def test_apply_ln_false_reports_kl_to_the_models_output(cache):
    """Not to the unnormalized final row: that one is far from the model's output."""
    result = logit_lens(cache, positions=None, apply_ln=False, kl_to_final=True)
    raw = logit_lens(cache, positions=None, apply_ln=False, return_type="log_probs")
    kl = result.readout.kl_to_final
    torch.testing.assert_close(kl, _naive_kl(cache, raw, positions=None), atol=1e-5, rtol=1e-4)
    assert kl[-1].min() > 1e-3


@pytest.mark.parametrize("entry_axis", [False, True], ids=["per-row", "per-row with entry axis"])
def test_per_row_targets_with_kl(cache, entry_axis):
    targets = TOKENS[:, 1:]
    if entry_axis:  # a different target at every entry: [entry, batch, pos]
        targets = torch.stack([targets, targets.flip(-1), targets.roll(1, -1), targets])
    common = dict(positions=None, targets=targets, chunk_size=5)
    result = logit_lens(cache, kl_to_final=True, **common)
    plain = logit_lens(cache, **common)
    full = logit_lens(cache, positions=None, return_type="log_probs", kl_to_final=True)
    index = targets.expand(full.values.shape[:-1])[..., None]
    torch.testing.assert_close(result.readout.target_probs, full.values.gather(-1, index).exp())
    torch.testing.assert_close(result.readout.kl_to_final, full.readout.kl_to_final)
    assert torch.equal(result.readout.target_ranks, plain.readout.target_ranks)
    torch.testing.assert_close(result.values, plain.values)
    torch.testing.assert_close(result.readout.target_probs, plain.readout.target_probs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kl_and_target_probs_in_every_dtype(dtype):
    model = _gpt2(dtype)
    _, cache = model.run_with_cache(TOKENS[:, :-1])
    result = logit_lens(cache, positions=None, return_type="log_probs", kl_to_final=True)
    assert result.values.dtype == result.readout.kl_to_final.dtype == torch.float32
    output = result.values[-1]  # the final entry is the model's output here
    naive = (output.exp() * (output - result.values)).sum(-1)
    torch.testing.assert_close(result.readout.kl_to_final, naive, atol=1e-5, rtol=1e-4)
    assert torch.equal(result.readout.kl_to_final[-1], torch.zeros_like(naive[-1]))
    probs = logit_lens(cache, positions=None, targets=[5, 60], return_type="probs")
    assert torch.equal(probs.readout.target_probs, probs.values)


@pytest.mark.slow
def test_kl_on_a_full_size_vocabulary():
    model = _gpt2(d_vocab=50257)
    _, cache = model.run_with_cache(TOKENS[:, :-1])
    result = logit_lens(cache, positions=None, return_type="log_probs", kl_to_final=True)
    naive = _naive_kl(cache, result, positions=None)
    torch.testing.assert_close(result.readout.kl_to_final, naive, atol=1e-5, rtol=1e-4)
    targets = logit_lens(cache, positions=None, targets=TOKENS[:, 1:], kl_to_final=True)
    index = TOKENS[:, 1:].expand(result.values.shape[:-1])[..., None]
    torch.testing.assert_close(targets.readout.target_probs, result.values.gather(-1, index).exp())
    torch.testing.assert_close(targets.readout.kl_to_final, result.readout.kl_to_final)


def test_calls_without_kl_add_target_probs_only(cache):
    for return_type in ("log_probs", "probs"):
        result = logit_lens(cache, positions=None, targets=[5, 60], return_type=return_type)
        probs = result.values if return_type == "probs" else result.values.exp()
        assert torch.equal(result.readout.target_probs, probs)
        assert result.readout.kl_to_final is None
    assert logit_lens(cache, top_k=3).readout.target_probs is None


def test_kl_differentiates_through_a_lens(gpt2, cache):
    shift = torch.zeros(32, requires_grad=True)
    lens = lambda entry, index: entry + shift  # noqa: E731
    result = logit_lens(cache, lens=lens, kl_to_final=True, enable_grad=True, chunk_size=3)
    result.readout.kl_to_final.sum().backward()
    ours, shift.grad = shift.grad, None
    stack = cache.accumulated_resid(pos_slice=-1)
    normalized = cache.apply_ln_to_stack(torch.cat([stack + shift, stack[-1:]]), recompute_ln=True)
    log_probs = (normalized @ gpt2.W_U + gpt2.b_U).log_softmax(-1)
    (log_probs[-1].exp() * (log_probs[-1] - log_probs[:-1])).sum().backward()
    torch.testing.assert_close(ours, shift.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "options, error",
    [
        ({"kl_to_final": "no"}, TypeError),
        ({"kl_to_final": 1}, TypeError),
        ({"kl_to_final": True, "chunk_size": 1}, ValueError),
    ],
)
def test_invalid_options_fail_before_the_forward_pass(gpt2, monkeypatch, options, error):
    def forward(*args, **kwargs):
        raise AssertionError("the forward pass ran before the options were checked")

    monkeypatch.setattr(gpt2, "run_with_cache", forward)
    with pytest.raises(error, match="kl_to_final" if error is TypeError else "chunk_size"):
        logit_lens(gpt2, TOKENS, **options)


def test_numpy_bool_and_logit_readout_final_resid(gpt2, cache):
    numpy_flag = logit_lens(cache, top_k=3, kl_to_final=np.bool_(True))
    assert torch.equal(
        numpy_flag.readout.kl_to_final, logit_lens(cache, kl_to_final=True).readout.kl_to_final
    )
    vectors = torch.randn(3, 4, 32)
    with pytest.raises(ValueError, match="final_resid"):
        logit_readout(gpt2, vectors, final_resid=vectors)
    readout = logit_readout(gpt2, vectors, final_resid=vectors[-1])
    assert torch.equal(readout.kl_to_final[-1], torch.zeros(4))


class MatmulRows(TorchFunctionMode):
    """Records the rows of every matmul's output."""

    MATMULS = {torch.Tensor.__matmul__, torch.Tensor.matmul, torch.matmul, torch.mm}

    def __init__(self) -> None:
        super().__init__()
        self.rows: List[int] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self.MATMULS and isinstance(out, torch.Tensor):
            self.rows.append(out.numel() // out.shape[-1])
        return out


@pytest.mark.parametrize("chunk_size", [2, 5, 64])
def test_no_unembedding_matmul_takes_more_than_chunk_size_rows(cache, chunk_size):
    with MatmulRows() as recorded:
        logit_lens(
            cache, positions=None, targets=TOKENS[:, 1:], chunk_size=chunk_size, kl_to_final=True
        )
    assert recorded.rows and max(recorded.rows) <= chunk_size


def test_no_hook_fires_and_a_hook_on_ln_final_is_named(gpt2, cache):
    options: Dict[str, Any] = dict(positions=None, targets=TOKENS[:, 1:], kl_to_final=True)
    clean = logit_lens(cache, **options)
    calls: List[str] = []
    for hook_point in gpt2.hook_dict.values():
        hook_point.add_hook(lambda tensor, hook: calls.append(hook.name))
    try:
        with pytest.warns(UserWarning, match="ln_final.hook_normalized"):
            logit_lens(cache, **options)
            logit_readout(gpt2, cache["blocks.2.hook_resid_post"], top_k=3)
        assert calls == []
    finally:
        gpt2.reset_hooks()
    # An editing hook on ln_final: the tool answers, names it, and does not apply it.
    gpt2.ln_final.hook_normalized.add_hook(lambda tensor, hook: tensor * 2.0)
    try:
        with pytest.warns(UserWarning, match="ln_final.hook_normalized"):
            edited = logit_lens(gpt2, TOKENS[:, :-1], **options)
    finally:
        gpt2.reset_hooks()
    assert torch.equal(edited.values, clean.values)
    assert torch.equal(edited.readout.kl_to_final, clean.readout.kl_to_final)
