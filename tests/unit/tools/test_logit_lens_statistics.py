"""Tests of the logit lens's KL to the final layer, target probabilities and statistics-only mode.

Every statistic is checked against the naive computation, ``log_softmax`` of the materialized
``[layers, batch, pos, d_vocab]`` logits, on small bridges built from configs (no Hub download).
"""

import math
from typing import List

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, GPT2Config, GPT2LMHeadModel

from transformer_lens.model_bridge.sources import build_bridge_from_module
from transformer_lens.tools.analysis import logit_lens, logit_readout

D_VOCAB = 67  # prime: no vocabulary chunk size below it divides it
TOKENS = torch.tensor([[1, 7, 11, 3, 5, 60], [2, 9, 4, 4, 6, 66]])


def _randomize_readout(hf, norm, seed):
    """Random final norm, unembedding and bias, so that a skipped one shows in the numbers."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in norm.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_((1.0 if name == "weight" else 0.0) + 0.3 * noise)
        head = hf.lm_head.weight
        head.copy_(torch.randn(head.shape, generator=generator) * 0.3)


def _gpt2(dtype=torch.float32):
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=D_VOCAB, n_positions=32, n_embd=32, n_layer=3, n_head=4)
    hf = GPT2LMHeadModel(cfg).eval()
    # An unembedding bias, which GPT-2 lacks, so that b_U is exercised.
    head = torch.nn.Linear(32, D_VOCAB, bias=True)
    hf.lm_head = head
    hf.config.tie_word_embeddings = False
    _randomize_readout(hf, hf.transformer.ln_f, seed=1)
    with torch.no_grad():
        head.bias.copy_(torch.randn(D_VOCAB, generator=torch.Generator().manual_seed(2)))
    return build_bridge_from_module(
        hf.to(dtype), "GPT2LMHeadModel", hf_config=cfg, dtype=dtype, device="cpu"
    )


@pytest.fixture(scope="module")
def gpt2():
    return _gpt2()


@pytest.fixture(scope="module")
def gpt2_bf16():
    return _gpt2(torch.bfloat16)


@pytest.fixture(scope="module")
def gemma2():
    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=D_VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=32,
        sliding_window=16,
        final_logit_softcapping=5.0,
        attn_logit_softcapping=50.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    hf = Gemma2ForCausalLM(config).eval()
    _randomize_readout(hf, hf.model.norm, seed=3)
    with torch.no_grad():
        hf.lm_head.weight.mul_(10)  # logits well past the soft cap of 5
    return build_bridge_from_module(
        hf, "Gemma2ForCausalLM", hf_config=config, dtype=torch.float32, device="cpu"
    )


def _naive(model, tokens, targets=None, lens=None, top_k=None):
    """Entropy, KL, target probability and rank, top-k from the materialized logits."""
    logits, cache = model.run_with_cache(tokens)
    stack = cache.accumulated_resid(apply_ln=False)
    final = cache.apply_ln_to_stack(stack[-1:], layer=None, recompute_ln=True)
    if lens is not None:
        stack = torch.stack([lens(stack[i], i) for i in range(stack.shape[0])])
    stack = cache.apply_ln_to_stack(stack, layer=None, recompute_ln=True)
    readout = model.adapter.apply_output_logits_transform
    lens_logits = readout(stack @ model.W_U + model.b_U)  # [layers, batch, pos, d_vocab]
    final_logits = readout(final @ model.W_U + model.b_U)
    log_probs = lens_logits.float().log_softmax(-1)
    final_log_probs = final_logits.float().log_softmax(-1)
    out = {
        "model_logits": logits,
        "logits": lens_logits,
        "log_probs": log_probs,
        "entropy": -(log_probs.exp() * log_probs).sum(-1),
        "kl": (final_log_probs.exp() * (final_log_probs - log_probs)).sum(-1),
    }
    if targets is not None:
        index = targets.expand(lens_logits.shape[:-1])[..., None]
        target_logits = lens_logits.gather(-1, index)
        out["target_probs"] = log_probs.gather(-1, index).exp()
        out["ranks"] = (lens_logits > target_logits).sum(-1, keepdim=True)
    if top_k is not None:
        out["top"] = lens_logits.float().topk(top_k, dim=-1)
    return out


def _assert_matches(readout, naive, atol=1e-5, rtol=1e-4):
    torch.testing.assert_close(readout.entropy, naive["entropy"], atol=atol, rtol=rtol)
    torch.testing.assert_close(readout.kl_to_final, naive["kl"], atol=atol, rtol=rtol)
    if "ranks" in naive:
        torch.testing.assert_close(
            readout.target_probs, naive["target_probs"], atol=atol, rtol=rtol
        )
        assert torch.equal(readout.target_ranks, naive["ranks"])


def test_kl_and_target_probs_in_the_default_mode(gpt2):
    targets = TOKENS[:, 1:]
    naive = _naive(gpt2, TOKENS[:, :-1], targets=targets)
    result = logit_lens(gpt2, TOKENS[:, :-1], positions=None, targets=targets)
    _assert_matches(result.readout, naive)
    assert result.readout.kl_to_final.shape == (4, 2, 5)
    # The reference is the model itself: the final entry reproduces its logits, KL is zero there.
    torch.testing.assert_close(result.readout.kl_to_final[-1], torch.zeros(2, 5))
    assert (result.readout.kl_to_final[:-1] > 1e-3).all()


@pytest.mark.parametrize(
    "vocab_chunk_size, chunk_size",
    [
        (None, None),
        (1, None),
        (7, 5),
        (10, 1),
        (D_VOCAB - 1, 100),
        (D_VOCAB, 4),
        (1000, None),
    ],
)
def test_statistics_only_matches_the_naive_computation(gpt2, vocab_chunk_size, chunk_size):
    """Odd chunk sizes: 7 and 10 do not divide 67; 5 rows are rounded down to one 4-row group."""
    targets = TOKENS[:, 1:]
    naive = _naive(gpt2, TOKENS[:, :-1], targets=targets, top_k=3)
    result = logit_lens(
        gpt2,
        TOKENS[:, :-1],
        positions=None,
        targets=targets,
        top_k=3,
        return_type="log_probs",
        statistics_only=True,
        vocab_chunk_size=vocab_chunk_size,
        chunk_size=chunk_size,
    )
    _assert_matches(result.readout, naive)
    assert torch.equal(result.readout.top_ids, naive["top"].indices)
    expected_top = naive["log_probs"].gather(-1, naive["top"].indices)
    torch.testing.assert_close(result.values, expected_top, atol=1e-5, rtol=1e-5)


def test_statistics_only_agrees_with_the_default_mode_on_every_selector(gpt2):
    cache = gpt2.run_with_cache(TOKENS)[1]
    for kwargs in (
        {"targets": [5, 60]},
        {"targets": 60, "return_type": "probs"},
        {"top_k": 4},
        {"top_k": 2, "targets": [3], "return_type": "probs"},
        {"vocab": [0, 66, 10, 10]},
        {"vocab": [9], "return_type": "log_probs"},
    ):
        full = logit_lens(cache, positions=None, **kwargs)
        streamed = logit_lens(
            cache, positions=None, statistics_only=True, vocab_chunk_size=8, **kwargs
        )
        for field in ("values", "entropy", "kl_to_final", "target_probs"):
            expected, actual = getattr(full.readout, field), getattr(streamed.readout, field)
            assert (expected is None) == (actual is None), field
            if expected is not None:
                assert actual.dtype == expected.dtype, field
                torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
        for field in ("top_ids", "target_ranks", "target_ids", "vocab_ids"):
            expected, actual = getattr(full.readout, field), getattr(streamed.readout, field)
            assert (expected is None and actual is None) or torch.equal(actual, expected), field
    # Without a selector the default mode returns the full vocabulary; statistics_only nothing.
    streamed = logit_lens(cache, statistics_only=True)
    assert streamed.values.shape == (4, 2, 0)
    assert streamed.readout.entropy.shape == streamed.readout.kl_to_final.shape == (4, 2)


def test_soft_capped_model(gemma2):
    tokens = TOKENS[:, :4]
    naive = _naive(gemma2, tokens, targets=tokens, top_k=2)
    assert naive["model_logits"].abs().max() <= 5.0
    torch.testing.assert_close(naive["logits"][-1], naive["model_logits"], atol=1e-4, rtol=1e-4)
    for statistics_only in (False, True):
        result = logit_lens(
            gemma2,
            tokens,
            positions=None,
            targets=tokens,
            top_k=2,
            statistics_only=statistics_only,
            vocab_chunk_size=16 if statistics_only else None,
        )
        assert result.readout.applied_output_transform
        _assert_matches(result.readout, naive)
        torch.testing.assert_close(result.values, naive["top"].values)
    # Teeth: the uncapped readout has other statistics.
    _, cache = gemma2.run_with_cache(tokens)
    normed = cache.accumulated_resid(apply_ln=True)
    uncapped = (normed @ gemma2.W_U + gemma2.b_U).log_softmax(-1)
    assert (-(uncapped.exp() * uncapped).sum(-1) - naive["entropy"]).abs().max() > 0.1


def test_bfloat16_model_accumulates_in_float32(gpt2_bf16):
    targets = TOKENS[:, 1:]
    naive = _naive(gpt2_bf16, TOKENS[:, :-1], targets=targets, top_k=3)
    assert naive["logits"].dtype == torch.bfloat16
    for statistics_only in (False, True):
        result = logit_lens(
            gpt2_bf16,
            TOKENS[:, :-1],
            positions=None,
            targets=targets,
            top_k=3,
            statistics_only=statistics_only,
            vocab_chunk_size=9 if statistics_only else None,
        )
        readout = result.readout
        assert readout.entropy.dtype == readout.kl_to_final.dtype == torch.float32
        assert readout.target_probs.dtype == torch.float32
        assert result.values.dtype == torch.bfloat16  # logits stay in the model's dtype
        # bf16 logits round alike only up to an ulp when computed by another matmul split.
        torch.testing.assert_close(readout.entropy, naive["entropy"], atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(readout.kl_to_final, naive["kl"], atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(
            readout.target_probs, naive["target_probs"], atol=1e-2, rtol=5e-2
        )
        assert (readout.target_ranks - naive["ranks"]).abs().max() <= 2
        torch.testing.assert_close(readout.kl_to_final[-1], torch.zeros(2, 5))
        torch.testing.assert_close(result.values.float(), naive["top"].values, atol=0.1, rtol=0.02)


def test_lens_hook_and_layer_selection_keep_the_model_as_reference(gpt2):
    translator = torch.nn.Linear(32, 32)
    torch.nn.init.eye_(translator.weight)
    with torch.no_grad():
        translator.bias.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(4))
        translator.weight.add_(0.1)

    def lens(entry, index):
        return translator(entry)

    naive = _naive(gpt2, TOKENS, targets=TOKENS, lens=lens)
    for statistics_only in (False, True):
        result = logit_lens(
            gpt2,
            TOKENS,
            positions=None,
            targets=TOKENS,
            lens=lens,
            statistics_only=statistics_only,
        )
        _assert_matches(result.readout, naive)
        assert (result.readout.kl_to_final[-1] > 1e-3).all()  # the lens moved the final entry
        some = logit_lens(
            gpt2, TOKENS, positions=None, layers=[0, 2], statistics_only=statistics_only
        )
        plain = _naive(gpt2, TOKENS)
        torch.testing.assert_close(some.readout.kl_to_final, plain["kl"][[0, 2]])
        torch.testing.assert_close(some.readout.entropy, plain["entropy"][[0, 2]])


def test_positions_batch_slices_and_batchless_caches(gpt2):
    naive = _naive(gpt2, TOKENS, targets=TOKENS[:, -1:])
    for statistics_only in (False, True):
        last = logit_lens(gpt2, TOKENS, targets=TOKENS[:, -1], statistics_only=statistics_only)
        torch.testing.assert_close(last.readout.kl_to_final, naive["kl"][:, :, -1])
        torch.testing.assert_close(
            last.readout.target_probs[..., 0], naive["target_probs"][:, :, -1, 0]
        )
        one = logit_lens(
            gpt2, TOKENS, batch_slice=1, positions=None, statistics_only=statistics_only
        )
        torch.testing.assert_close(one.readout.kl_to_final, naive["kl"][:, 1])
    _, cache = gpt2.run_with_cache(TOKENS[0])
    cache.remove_batch_dim()
    batchless = logit_lens(cache, positions=None, statistics_only=True)
    torch.testing.assert_close(
        batchless.readout.kl_to_final, naive["kl"][:, 0], atol=1e-5, rtol=1e-4
    )


def test_readout_reference_as_an_entry_or_a_separate_tensor(gpt2):
    _, cache = gpt2.run_with_cache(TOKENS)
    stack = cache.accumulated_resid(apply_ln=True)
    naive = _naive(gpt2, TOKENS)
    for statistics_only in (False, True):
        as_entry = logit_readout(
            gpt2,
            stack,
            apply_ln=False,
            reference=stack[-1],
            statistics_only=statistics_only,
        )
        separate = logit_readout(
            gpt2,
            stack,
            apply_ln=False,
            reference=stack[-1].clone(),
            statistics_only=statistics_only,
        )
        torch.testing.assert_close(as_entry.kl_to_final, naive["kl"])
        torch.testing.assert_close(separate.kl_to_final, naive["kl"])
        # One reference for a whole batch: broadcast from the right.
        shared = logit_readout(
            gpt2,
            stack,
            apply_ln=False,
            reference=stack[-1, 0],
            statistics_only=statistics_only,
        )
        expected = (
            naive["log_probs"][-1, 0].exp() * (naive["log_probs"][-1, 0] - naive["log_probs"])
        ).sum(-1)
        torch.testing.assert_close(shared.kl_to_final, expected)
        assert logit_readout(gpt2, stack, apply_ln=False).kl_to_final is None


@pytest.mark.slow  # about 17 s: a profiled run over a 50,257-token vocabulary
def test_statistics_only_holds_one_chunk_of_logits():
    """No allocation reaches [rows, d_vocab]: the largest is one [rows, vocab_chunk] buffer."""
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=8191, n_positions=32, n_embd=16, n_layer=2, n_head=2)
    hf = GPT2LMHeadModel(cfg).eval()
    model = build_bridge_from_module(
        hf, "GPT2LMHeadModel", hf_config=cfg, dtype=torch.float32, device="cpu"
    )
    tokens = torch.randint(8191, (2, 16))
    _, cache = model.run_with_cache(tokens)
    rows, vocab_chunk = 3 * 2 * 16, 256
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        result = logit_lens(
            cache,
            positions=None,
            targets=tokens,
            top_k=5,
            statistics_only=True,
            vocab_chunk_size=vocab_chunk,
        )
    largest = max(e.cpu_memory_usage for e in prof.events() if e.name.startswith("aten::"))
    assert largest <= rows * vocab_chunk * 4 < rows * 8191 * 4 // 10
    assert result.readout.kl_to_final.shape == (3, 2, 16)


def test_bad_arguments_say_what_to_pass(gpt2):
    _, cache = gpt2.run_with_cache(TOKENS)
    with pytest.raises(ValueError, match="vocab_chunk_size must be >= 1"):
        logit_lens(cache, statistics_only=True, vocab_chunk_size=0)
    with pytest.raises(ValueError, match="statistics_only=True"):
        logit_lens(cache, vocab_chunk_size=8)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        logit_lens(cache, statistics_only=True, chunk_size=0)
    with pytest.raises(ValueError, match="enable_grad=False"):
        logit_lens(cache, statistics_only=True, enable_grad=True)
    with pytest.raises(ValueError, match="top_k must be in"):
        logit_lens(cache, statistics_only=True, top_k=0)
    with pytest.raises(ValueError, match="top_k must be in"):
        logit_lens(cache, statistics_only=True, top_k=D_VOCAB + 1)
    with pytest.raises(ValueError, match="at most one"):
        logit_lens(cache, statistics_only=True, vocab=[1], targets=[2])
    with pytest.raises(ValueError, match="do not broadcast"):
        logit_lens(cache, positions=None, statistics_only=True, targets=TOKENS[:, :3])
    with pytest.raises(ValueError, match="within"):
        logit_lens(cache, positions=None, statistics_only=True, targets=TOKENS + D_VOCAB)
    stack = cache.accumulated_resid(apply_ln=True)
    with pytest.raises(ValueError, match="does not broadcast"):
        logit_readout(gpt2, stack, apply_ln=False, reference=stack[-1, :, :3])
    with pytest.raises(ValueError, match="at most the 3 leading dims"):
        logit_readout(gpt2, stack, apply_ln=False, reference=stack[None])
    assert math.isfinite(float(logit_lens(cache, statistics_only=True).readout.entropy.sum()))


def test_no_hook_fires_in_the_tool() -> None:
    """The tool reads ln_final through normalize_without_hooks everywhere, the readout check and
    logit_readout(apply_ln=True) included, so a hook left on the model neither fires nor counts."""
    model = _gpt2()
    _, cache = model.run_with_cache(TOKENS)
    calls: List[str] = []
    for hook_point in model.hook_dict.values():
        hook_point.add_hook(lambda tensor, hook: calls.append(hook.name))
    try:
        model(TOKENS)
        one_run = sorted(calls)
        calls.clear()
        logit_lens(model, TOKENS, targets=[3], top_k=3)  # runs the model once, then reads it out
        assert sorted(calls) == one_run
        calls.clear()
        logit_lens(model, cache=cache, targets=[3], top_k=3)
        logit_lens(model, cache=cache, statistics_only=True)
        logit_readout(model, cache["blocks.1.hook_resid_post"], apply_ln=True, top_k=3)
    finally:
        model.reset_hooks()
    assert calls == []
