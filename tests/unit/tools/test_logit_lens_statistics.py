"""Tests of the logit lens's statistics-only mode, the vocabulary streamed in bounded memory.

Every statistic is checked against the naive computation, ``log_softmax`` of the materialized
``[layers, batch, pos, d_vocab]`` logits, and against the default mode, on small bridges built
from configs (no Hub download).
"""

import math
from typing import List

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from tests.unit.tools.test_logit_lens_kl_to_final import (
    D_VOCAB,
    TOKENS,
    MatmulShapes,
    _gemma2,
    _gpt2,
    _naive,
)
from transformer_lens.model_bridge.sources import build_bridge_from_module
from transformer_lens.tools.analysis import logit_lens, logit_readout


@pytest.fixture(scope="module")
def gpt2():
    return _gpt2()


def _assert_matches(readout, naive, atol=1e-5, rtol=1e-4):
    torch.testing.assert_close(readout.entropy, naive["entropy"], atol=atol, rtol=rtol)
    if readout.kl_to_final is not None:
        torch.testing.assert_close(readout.kl_to_final, naive["kl"], atol=atol, rtol=rtol)
    if "ranks" in naive:
        torch.testing.assert_close(
            readout.target_probs, naive["target_probs"], atol=atol, rtol=rtol
        )
        assert torch.equal(readout.target_ranks, naive["ranks"])


def test_statistics_only_matches_the_naive_computation(gpt2):
    """Odd chunk sizes: 7 and 10 do not divide the 67-token vocabulary; 3 and 5 rows do not
    divide the 4 entries x 10 positions."""
    targets = TOKENS[:, 1:]
    naive = _naive(gpt2, TOKENS[:, :-1], targets=targets)
    log_probs = naive["logits"].float().log_softmax(-1)
    _, cache = gpt2.run_with_cache(TOKENS[:, :-1])
    for vocab_chunk_size, chunk_size in ((None, 64), (1, 5), (7, 3), (10, 2), (66, 100), (67, 4)):
        result = logit_lens(
            cache,
            positions=None,
            targets=targets,
            return_type="log_probs",
            kl_to_final=True,
            statistics_only=True,
            vocab_chunk_size=vocab_chunk_size,
            chunk_size=chunk_size,
        )
        _assert_matches(result.readout, naive)
        assert torch.equal(result.readout.kl_to_final[-1], torch.zeros(2, 5))
        torch.testing.assert_close(result.values, naive["target_probs"].log())
    top = naive["logits"].float().topk(3, dim=-1)
    for vocab_chunk_size in (2, 10):
        result = logit_lens(
            cache, positions=None, top_k=3, return_type="log_probs", statistics_only=True,
            vocab_chunk_size=vocab_chunk_size,
        )  # fmt: skip
        assert torch.equal(result.readout.top_ids, top.indices)
        torch.testing.assert_close(result.values, log_probs.gather(-1, top.indices))


def test_statistics_only_agrees_with_the_default_mode_on_every_selector(gpt2):
    cache = gpt2.run_with_cache(TOKENS)[1]
    for kwargs in (
        {"targets": [5, 60]},
        {"targets": 60, "return_type": "probs", "kl_to_final": True},
        {"top_k": 4, "kl_to_final": True},
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
    streamed = logit_lens(cache, statistics_only=True, kl_to_final=True)
    assert streamed.values.shape == (4, 2, 0)
    assert streamed.readout.entropy.shape == streamed.readout.kl_to_final.shape == (4, 2)


def test_soft_capped_and_bfloat16_models():
    gemma2 = _gemma2()
    tokens = TOKENS[:, :4]
    naive = _naive(gemma2, tokens, targets=tokens)
    result = logit_lens(
        gemma2, tokens, positions=None, targets=tokens, kl_to_final=True, statistics_only=True,
        vocab_chunk_size=16,
    )  # fmt: skip
    assert result.readout.applied_output_transform
    _assert_matches(result.readout, naive)
    torch.testing.assert_close(
        result.values, naive["logits"].gather(-1, tokens.expand(3, 2, 4)[..., None])
    )

    bf16 = _gpt2(torch.bfloat16)
    targets = TOKENS[:, 1:]
    naive = _naive(bf16, TOKENS[:, :-1], targets=targets)
    assert naive["logits"].dtype == torch.bfloat16
    readout = logit_lens(
        bf16, TOKENS[:, :-1], positions=None, targets=targets, kl_to_final=True,
        statistics_only=True, vocab_chunk_size=9,
    ).readout  # fmt: skip
    assert readout.entropy.dtype == readout.kl_to_final.dtype == torch.float32
    assert readout.target_probs.dtype == torch.float32
    assert readout.values.dtype == torch.bfloat16  # logits stay in the model's dtype
    # bf16 logits round alike only up to an ulp when computed by another matmul split.
    torch.testing.assert_close(readout.entropy, naive["entropy"], atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(readout.kl_to_final, naive["kl"], atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(readout.target_probs, naive["target_probs"], atol=1e-2, rtol=5e-2)
    assert (readout.target_ranks - naive["ranks"]).abs().max() <= 2
    assert torch.equal(readout.kl_to_final[-1], torch.zeros(2, 5))


def test_lens_layers_positions_and_batchless_caches(gpt2):
    translator = torch.nn.Linear(32, 32)
    torch.nn.init.eye_(translator.weight)
    with torch.no_grad():
        translator.bias.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(4))

    def lens(entry, index):
        return translator(entry)

    naive = _naive(gpt2, TOKENS, targets=TOKENS, lens=lens)
    result = logit_lens(
        gpt2, TOKENS, positions=None, targets=TOKENS, lens=lens, kl_to_final=True,
        statistics_only=True, chunk_size=7,
    )  # fmt: skip
    _assert_matches(result.readout, naive)
    plain = _naive(gpt2, TOKENS)
    _, cache = gpt2.run_with_cache(TOKENS)
    some = logit_lens(cache, positions=None, layers=[0, 2], kl_to_final=True, statistics_only=True)
    torch.testing.assert_close(some.readout.kl_to_final, plain["kl"][[0, 2]])
    one = logit_lens(cache, batch_slice=1, kl_to_final=True, statistics_only=True)
    torch.testing.assert_close(one.readout.kl_to_final, plain["kl"][:, 1, -1])
    _, cache = gpt2.run_with_cache(TOKENS[0])
    cache.remove_batch_dim()
    batchless = logit_lens(cache, positions=None, kl_to_final=True, statistics_only=True)
    torch.testing.assert_close(batchless.readout.kl_to_final, plain["kl"][:, 0])


def test_no_unembedding_matmul_takes_more_than_chunk_size_rows(gpt2):
    """The reference rows a chunk carries for the KL count toward its chunk_size."""
    _, cache = gpt2.run_with_cache(TOKENS)
    naive = _naive(gpt2, TOKENS, targets=TOKENS)
    for kl_to_final, chunk_size in ((False, 1), (False, 5), (True, 2), (True, 5), (True, 64)):
        with MatmulShapes() as counted:  # on a cache: every matmul of the call is an unembedding
            result = logit_lens(
                cache, positions=None, incl_mid=True, targets=TOKENS, kl_to_final=kl_to_final,
                statistics_only=True, chunk_size=chunk_size, vocab_chunk_size=10,
            )  # fmt: skip
        assert len(result.labels) == 7
        rows = [n for n, _ in counted.shapes]
        assert max(rows) <= chunk_size, (kl_to_final, chunk_size, rows)
        assert {columns for _, columns in counted.shapes} >= {10, 7}  # 67 = 6 x 10 + 7
        kept = [0, 2, 4, 6]  # the resid_pre entries and final_post
        torch.testing.assert_close(result.readout.entropy[kept], naive["entropy"])
        if kl_to_final:
            torch.testing.assert_close(result.readout.kl_to_final[kept], naive["kl"])
    with pytest.raises(ValueError, match="chunk_size >= 2"):
        logit_lens(cache, kl_to_final=True, statistics_only=True, chunk_size=1)


@pytest.mark.slow  # a profiled run: every small op is recorded
def test_statistics_only_holds_one_chunk_of_logits():
    """No allocation is larger than one [chunk_size, vocab_chunk] chunk of float32 logits."""
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=4099, n_positions=32, n_embd=16, n_layer=2, n_head=2)
    hf = GPT2LMHeadModel(cfg).eval()
    model = build_bridge_from_module(
        hf, "GPT2LMHeadModel", hf_config=cfg, dtype=torch.float32, device="cpu"
    )
    tokens = torch.randint(4099, (2, 16))
    _, cache = model.run_with_cache(tokens)
    chunk_size, vocab_chunk = 32, 512
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        result = logit_lens(
            cache,
            positions=None,
            targets=tokens,
            kl_to_final=True,
            statistics_only=True,
            chunk_size=chunk_size,
            vocab_chunk_size=vocab_chunk,
        )
    largest = max(e.cpu_memory_usage for e in prof.events() if e.name.startswith("aten::"))
    rows = 3 * 2 * 16
    assert largest <= chunk_size * vocab_chunk * 4 < rows * 4099 * 4 // 20
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
        logit_lens(cache, statistics_only=True, top_k=D_VOCAB + 1)
    with pytest.raises(ValueError, match="at most one"):
        logit_lens(cache, statistics_only=True, top_k=1, targets=[2])
    with pytest.raises(ValueError, match="do not broadcast"):
        logit_lens(cache, positions=None, statistics_only=True, targets=TOKENS[:, :3])
    assert math.isfinite(float(logit_lens(cache, statistics_only=True).readout.entropy.sum()))


def test_no_hook_fires_in_statistics_only() -> None:
    model = _gpt2()
    _, cache = model.run_with_cache(TOKENS)
    calls: List[str] = []
    for hook_point in model.hook_dict.values():
        hook_point.add_hook(lambda tensor, hook: calls.append(hook.name))
    try:
        logit_lens(model, cache=cache, targets=[3], kl_to_final=True, statistics_only=True)
        stack = cache["blocks.1.hook_resid_post"]
        logit_readout(model, stack, top_k=3, reference_entry=0, statistics_only=True)
    finally:
        model.reset_hooks()
    assert calls == []
