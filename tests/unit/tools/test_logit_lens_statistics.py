"""Tests of the logit lens's statistics: KL to the final layer, target probabilities, and
``statistics_only`` (the vocabulary streamed in bounded memory).

The naive full computation (``log_softmax`` of the materialized logits) is the reference for the
statistics; ``statistics_only`` is checked against the default mode on a 50,257-token vocabulary
in every dtype, on small bridges built from configs (no Hub download).
"""

import importlib
import warnings
from typing import Dict, List, Tuple

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from transformers import Gemma2Config, Gemma2ForCausalLM, GPT2Config, GPT2LMHeadModel

from transformer_lens.model_bridge.sources import build_bridge_from_module
from transformer_lens.tools.analysis import logit_lens, logit_readout

GPT2_VOCAB = 50257
TOKENS = torch.tensor([[1, 7, 11, 3, 5, 60, 50256], [2, 9, 4, 4, 6, 66, 30000]])


def _gpt2(dtype: torch.dtype = torch.float32, d_vocab: int = GPT2_VOCAB):
    """A small GPT-2 with a full-size vocabulary and a non-zero unembedding bias."""
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


def _gemma2(dtype: torch.dtype = torch.float32):
    """A Gemma-2 whose logits are soft-capped at 5, well past the cap."""
    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=GPT2_VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=32,
        sliding_window=16,
        final_logit_softcapping=5.0,
        tie_word_embeddings=False,
    )
    hf = Gemma2ForCausalLM(config).eval()
    with torch.no_grad():
        hf.lm_head.weight.normal_(0.0, 3.0)
        hf.model.norm.weight.normal_(0.0, 0.3)
    return build_bridge_from_module(
        hf.to(dtype), "Gemma2ForCausalLM", hf_config=config, dtype=dtype, device="cpu"
    )


@pytest.fixture(scope="module")
def gpt2():
    return _gpt2()


def _naive(model, cache, targets) -> Dict[str, torch.Tensor]:
    stack = cache.apply_ln_to_stack(cache.accumulated_resid(), layer=None, recompute_ln=True)
    logits = model.adapter.apply_output_logits_transform(stack @ model.W_U + model.b_U)
    log_probs = logits.float().log_softmax(-1)
    index = targets.expand(logits.shape[:-1])[..., None]
    return {
        "entropy": -(log_probs.exp() * log_probs).sum(-1),
        "kl": (log_probs[-1].exp() * (log_probs[-1] - log_probs)).sum(-1),
        "target_probs": log_probs.gather(-1, index).exp(),
        "ranks": (logits > logits.gather(-1, index)).sum(-1, keepdim=True),
    }


def _assert_same_top_k(default, streamed):
    """Equal top-k logits; equal ids wherever a logit is not tied with another of the default's
    top k + 1 (torch.topk leaves the order of tied logits unspecified)."""
    assert torch.equal(default.values[..., :-1], streamed.values)
    values = default.values.float()
    tied = ((values[..., :, None] == values[..., None, :]).sum(-1) > 1)[..., :-1]
    assert torch.equal(default.readout.top_ids[..., :-1][~tied], streamed.readout.top_ids[~tied])


def streamed_ranks(cache, targets):
    result = logit_lens(cache, positions=None, targets=targets, statistics_only=True)
    return result.readout.target_ranks


@pytest.mark.slow
@pytest.mark.parametrize("build", [_gpt2, _gemma2], ids=["gpt2-b_U", "gemma2-softcap"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_statistics_only_equals_the_default_mode_on_a_full_vocabulary(build, dtype):
    """The bfloat16 review case: ranks torch.equal, by the default path's rounding."""
    model = build(dtype)
    _, cache = model.run_with_cache(TOKENS[:, :-1])
    targets = TOKENS[:, 1:]
    for kl in (False, True):
        common = dict(positions=None, targets=targets, return_type="log_probs", kl_to_final=kl)
        default = logit_lens(cache, **common)
        for vocab_chunk_size in (None, 1000, 8191):
            streamed = logit_lens(
                cache, statistics_only=True, vocab_chunk_size=vocab_chunk_size, **common
            )
            assert torch.equal(default.readout.target_ranks, streamed.readout.target_ranks)
            torch.testing.assert_close(default.values, streamed.values, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(default.kl_to_final, streamed.kl_to_final)
            torch.testing.assert_close(
                default.readout.entropy, streamed.readout.entropy, atol=1e-5, rtol=1e-5
            )
        default = logit_lens(cache, positions=None, top_k=11, kl_to_final=kl)
        streamed = logit_lens(cache, positions=None, top_k=10, kl_to_final=kl, statistics_only=True)
        _assert_same_top_k(default, streamed)
    plain = logit_lens(cache, positions=None, targets=targets)
    assert torch.equal(plain.readout.target_ranks, streamed_ranks(cache, targets))


def test_statistics_match_the_naive_computation_at_odd_chunk_sizes():
    model = _gpt2(d_vocab=67)
    tokens = TOKENS % 67
    _, cache = model.run_with_cache(tokens[:, :-1])
    naive = _naive(model, cache, tokens[:, 1:])
    for statistics_only, vocab_chunk_size, chunk_size in (
        (False, None, 64),
        (False, None, 5),
        (True, 1, 3),
        (True, 7, 2),
        (True, 66, 100),
    ):
        result = logit_lens(
            cache,
            positions=None,
            targets=tokens[:, 1:],
            kl_to_final=True,
            statistics_only=statistics_only,
            vocab_chunk_size=vocab_chunk_size,
            chunk_size=chunk_size,
        )
        for name, value in (("entropy", result.readout.entropy), ("kl", result.kl_to_final)):
            torch.testing.assert_close(value, naive[name], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(result.readout.target_probs, naive["target_probs"])
        assert torch.equal(result.readout.target_ranks, naive["ranks"])
        assert torch.equal(result.kl_to_final[-1], torch.zeros_like(result.kl_to_final[-1]))


def test_a_guessed_target_logit_that_misses_is_counted_again(gpt2, monkeypatch):
    """Ranks count against each target's logit as its own vocabulary chunk rounds it."""
    _, cache = gpt2.run_with_cache(TOKENS[:, :-1])
    for kl in (False, True):
        common = dict(positions=None, targets=TOKENS[:, 1:], kl_to_final=kl, statistics_only=True)
        expected = logit_lens(cache, **common).readout.target_ranks
        module = importlib.import_module(logit_lens.__module__)
        guess = module._guess_target_logits
        monkeypatch.setattr(module, "_guess_target_logits", lambda *args: guess(*args) - 1.0)
        assert torch.equal(logit_lens(cache, **common).readout.target_ranks, expected)
        monkeypatch.undo()


def test_kl_and_target_probs_differentiate_through_a_lens(gpt2):
    _, cache = gpt2.run_with_cache(TOKENS[:, :-1])
    shift, targets = torch.zeros(32, requires_grad=True), TOKENS[:, -1]
    lens = lambda entry, index: entry + shift  # noqa: E731
    result = logit_lens(cache, lens=lens, targets=targets, kl_to_final=True, enable_grad=True)
    (result.kl_to_final.sum() + result.readout.target_probs.sum()).backward()
    ours, shift.grad = shift.grad, None
    stack = cache.accumulated_resid(pos_slice=-1)  # the reference: the final entry, no lens
    stack = cache.apply_ln_to_stack(torch.cat([stack + shift, stack[-1:]]), recompute_ln=True)
    log_probs = (stack @ gpt2.W_U + gpt2.b_U).log_softmax(-1)
    kl = (log_probs[-1].exp() * (log_probs[-1] - log_probs[:-1])).sum()
    (kl + log_probs[:-1].gather(-1, targets.expand(4, 2)[..., None]).exp().sum()).backward()
    torch.testing.assert_close(ours, shift.grad, atol=1e-4, rtol=1e-3)


def test_default_calls_keep_their_values_and_add_target_probs(gpt2):
    _, cache = gpt2.run_with_cache(TOKENS)
    for return_type in ("log_probs", "probs"):
        result = logit_lens(cache, positions=None, targets=[5, 60], return_type=return_type)
        probs = result.values if return_type == "probs" else result.values.exp()
        assert torch.equal(result.readout.target_probs, probs)
        assert result.kl_to_final is None


@pytest.mark.parametrize("statistics_only", [False, True])
def test_targets_with_an_entry_axis_work_with_kl(gpt2, statistics_only):
    _, cache = gpt2.run_with_cache(TOKENS[:, :-1])
    targets = torch.stack([TOKENS[:, 1:], TOKENS[:, :-1]])  # [2 entries, batch, pos]
    common = dict(positions=None, layers=[0, 1], targets=targets, statistics_only=statistics_only)
    with_kl = logit_lens(cache, kl_to_final=True, **common)
    without = logit_lens(cache, **common)
    assert torch.equal(with_kl.readout.target_ranks, without.readout.target_ranks)
    assert torch.equal(with_kl.readout.target_ids, without.readout.target_ids)
    assert with_kl.kl_to_final.shape == (2, 2, 6)


def test_numpy_layers_work_as_python_ints(gpt2):
    _, cache = gpt2.run_with_cache(TOKENS)
    for statistics_only in (False, True):
        common = dict(positions=None, top_k=3, kl_to_final=True, statistics_only=statistics_only)
        ours = logit_lens(cache, layers=[np.int64(0), np.int32(-1)], **common)
        python = logit_lens(cache, layers=[0, -1], **common)
        assert ours.labels == python.labels
        assert torch.equal(ours.kl_to_final, python.kl_to_final)


@pytest.mark.parametrize(
    "options, error",
    [
        ({"kl_to_final": "no"}, TypeError),
        ({"statistics_only": "no"}, TypeError),
        ({"statistics_only": 1}, TypeError),
        ({"vocab_chunk_size": 8}, ValueError),
        ({"statistics_only": True, "vocab_chunk_size": 0}, ValueError),
        ({"statistics_only": True, "enable_grad": True}, ValueError),
        ({"kl_to_final": True, "chunk_size": 1}, ValueError),
        ({"kl_to_final": True, "chunk_size": 0}, ValueError),
    ],
)
def test_invalid_options_fail_before_the_forward_pass(gpt2, monkeypatch, options, error):
    def forward(*args, **kwargs):
        raise AssertionError("the forward pass ran before the options were checked")

    monkeypatch.setattr(gpt2, "run_with_cache", forward)
    with pytest.raises(error):
        logit_lens(gpt2, TOKENS, **options)


def test_logit_readout_checks_reference_entry(gpt2):
    vectors = torch.randn(3, 4, 32)
    for bad in (3, -4, True):
        with pytest.raises(ValueError, match="reference_entry"):
            logit_readout(gpt2, vectors, reference_entry=bad)
    with pytest.raises(TypeError):
        logit_readout(gpt2, vectors, reference_entry=1.0)
    with pytest.raises(ValueError, match="reference_entry"):
        logit_readout(gpt2, vectors[0], reference_entry=0)
    readout = logit_readout(gpt2, vectors, reference_entry=np.int64(-1), statistics_only=True)
    assert torch.equal(readout.kl_to_reference[-1], torch.zeros(4))


class MatmulShapes(TorchFunctionMode):
    """Records ``(rows, columns)`` of every matmul's output, and whether addmm ran."""

    MATMULS = {torch.Tensor.__matmul__, torch.Tensor.matmul, torch.matmul, torch.mm, torch.addmm}

    def __init__(self) -> None:
        super().__init__()
        self.shapes: List[Tuple[int, int]] = []
        self.addmm = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.addmm |= func is torch.addmm
        if func in self.MATMULS and isinstance(out, torch.Tensor):
            self.shapes.append((out.numel() // out.shape[-1], out.shape[-1]))
        return out


def test_no_unembedding_matmul_takes_more_than_chunk_size_rows(gpt2):
    _, cache = gpt2.run_with_cache(TOKENS)
    for chunk_size in (2, 5, 64):
        for options in ({}, {"kl_to_final": True}, {"statistics_only": True, "kl_to_final": True}):
            with MatmulShapes() as recorded:
                logit_lens(cache, positions=None, targets=TOKENS, chunk_size=chunk_size, **options)
            assert recorded.shapes and not recorded.addmm
            assert max(rows for rows, _ in recorded.shapes) <= chunk_size
            if options.get("statistics_only"):
                assert max(columns for _, columns in recorded.shapes) <= 4096


def test_no_hook_fires_and_a_hook_on_ln_final_is_named():
    model = _gpt2(d_vocab=67)
    tokens = TOKENS % 67
    options = dict(positions=None, targets=tokens, kl_to_final=True)
    clean = logit_lens(model, tokens, **options)
    calls: List[str] = []
    for name, hook_point in model.hook_dict.items():
        if not name.startswith("ln_final"):
            hook_point.add_hook(lambda tensor, hook: calls.append(hook.name))
    try:
        _, cache = model.run_with_cache(tokens)
        calls.clear()
        for statistics_only in (False, True):
            result = logit_lens(cache, statistics_only=statistics_only, **options)
            assert torch.equal(result.readout.target_ranks, clean.readout.target_ranks)
        logit_readout(model, cache["blocks.2.hook_resid_post"], apply_ln=True, top_k=3)
        assert calls == []
    finally:
        model.reset_hooks()
    # A hook that edits ln_final's output: 4.3.0 answered; the tool still answers, names the
    # hook it does not run, and does not blame the model.
    model.ln_final.hook_normalized.add_hook(lambda tensor, hook: tensor * 2.0)
    try:
        with pytest.warns(UserWarning, match="ln_final.hook_normalized"):
            edited = logit_lens(model, tokens, **options)
        assert torch.equal(edited.readout.target_ranks, clean.readout.target_ranks)
    finally:
        model.reset_hooks()
    # A hook that only observes: the same values as without it.
    model.ln_final.hook_normalized.add_hook(lambda tensor, hook: None)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            observed = logit_lens(model, tokens, **options)
        assert torch.equal(observed.values, clean.values)
        assert torch.equal(observed.kl_to_final, clean.kl_to_final)
    finally:
        model.reset_hooks()
