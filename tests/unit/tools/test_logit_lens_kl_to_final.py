"""Tests of the logit lens's KL to the final layer and target probabilities (default mode).

Every statistic is checked against the naive computation, ``log_softmax`` of the materialized
``[layers, batch, pos, d_vocab]`` logits, on small bridges built from configs (no Hub download).
Calls without ``kl_to_final`` are checked bit for bit against 4.3.0's readout loop.
"""

from typing import Dict, List, Optional, Tuple

import pytest
import torch
from torch.overrides import TorchFunctionMode
from transformers import Gemma2Config, Gemma2ForCausalLM, GPT2Config, GPT2LMHeadModel

from transformer_lens.model_bridge.sources import build_bridge_from_module
from transformer_lens.tools.analysis import logit_lens, logit_readout

D_VOCAB = 67
TOKENS = torch.tensor([[1, 7, 11, 3, 5, 60], [2, 9, 4, 4, 6, 66]])


def _randomize_readout(hf, norm, seed):
    """Random final norm and unembedding, so that a skipped one shows in the numbers."""
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
    hf.lm_head = torch.nn.Linear(32, D_VOCAB, bias=True)
    hf.config.tie_word_embeddings = False
    _randomize_readout(hf, hf.transformer.ln_f, seed=1)
    with torch.no_grad():
        hf.lm_head.bias.copy_(torch.randn(D_VOCAB, generator=torch.Generator().manual_seed(2)))
    return build_bridge_from_module(
        hf.to(dtype), "GPT2LMHeadModel", hf_config=cfg, dtype=dtype, device="cpu"
    )


@pytest.fixture(scope="module")
def gpt2():
    return _gpt2()


def _gemma2():
    """A Gemma-2 whose final logits are soft-capped at 5."""
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


@pytest.fixture(scope="module")
def gemma2():
    return _gemma2()


def _naive(model, tokens, targets=None, lens=None) -> Dict[str, torch.Tensor]:
    """Entropy, KL to the model's output, target probability and rank, from all the logits."""
    logits, cache = model.run_with_cache(tokens)
    stack = cache.accumulated_resid(apply_ln=False)
    final = cache.apply_ln_to_stack(stack[-1:], layer=None, recompute_ln=True)
    if lens is not None:
        stack = torch.stack([lens(stack[i], i) for i in range(stack.shape[0])])
    stack = cache.apply_ln_to_stack(stack, layer=None, recompute_ln=True)
    transform = model.adapter.apply_output_logits_transform
    lens_logits = transform(stack @ model.W_U + model.b_U)  # [layers, batch, pos, d_vocab]
    log_probs = lens_logits.float().log_softmax(-1)
    final_log_probs = transform(final @ model.W_U + model.b_U).float().log_softmax(-1)
    out = {
        "model_logits": logits,
        "logits": lens_logits,
        "entropy": -(log_probs.exp() * log_probs).sum(-1),
        "kl": (final_log_probs.exp() * (final_log_probs - log_probs)).sum(-1),
    }
    if targets is not None:
        index = targets.expand(lens_logits.shape[:-1])[..., None]
        out["target_probs"] = log_probs.gather(-1, index).exp()
        out["ranks"] = (lens_logits > lens_logits.gather(-1, index)).sum(-1, keepdim=True)
    return out


def _assert_matches(readout, naive):
    torch.testing.assert_close(readout.entropy, naive["entropy"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(readout.kl_to_final, naive["kl"], atol=1e-5, rtol=1e-4)
    if "ranks" in naive:
        torch.testing.assert_close(
            readout.target_probs, naive["target_probs"], atol=1e-6, rtol=1e-4
        )
        assert torch.equal(readout.target_ranks, naive["ranks"])


def test_kl_and_target_probs_match_log_softmax(gpt2):
    targets = TOKENS[:, 1:]
    naive = _naive(gpt2, TOKENS[:, :-1], targets=targets)
    result = logit_lens(gpt2, TOKENS[:, :-1], positions=None, targets=targets, kl_to_final=True)
    _assert_matches(result.readout, naive)
    assert result.readout.kl_to_final.shape == (4, 2, 5)
    # The reference is the final entry itself: exactly zero there, positive before.
    assert torch.equal(result.readout.kl_to_final[-1], torch.zeros(2, 5))
    assert (result.readout.kl_to_final[:-1] > 1e-3).all()
    # Shared targets, the last position only: probabilities beside the ranks, no KL unasked.
    shared = logit_lens(gpt2, TOKENS, targets=[5, 60], return_type="probs")
    assert shared.readout.kl_to_final is None
    torch.testing.assert_close(shared.readout.target_probs, shared.values)


def test_soft_capped_model(gemma2):
    tokens = TOKENS[:, :4]
    naive = _naive(gemma2, tokens, targets=tokens)
    assert naive["model_logits"].abs().max() <= 5.0
    torch.testing.assert_close(naive["logits"][-1], naive["model_logits"], atol=1e-4, rtol=1e-4)
    result = logit_lens(gemma2, tokens, positions=None, targets=tokens, kl_to_final=True)
    assert result.readout.applied_output_transform
    _assert_matches(result.readout, naive)
    # Teeth: the uncapped readout has other statistics.
    _, cache = gemma2.run_with_cache(tokens)
    uncapped = (cache.accumulated_resid(apply_ln=True) @ gemma2.W_U + gemma2.b_U).log_softmax(-1)
    assert (-(uncapped.exp() * uncapped).sum(-1) - naive["entropy"]).abs().max() > 0.1


def test_lens_and_layer_selection_keep_the_model_as_reference(gpt2):
    translator = torch.nn.Linear(32, 32)
    torch.nn.init.eye_(translator.weight)
    with torch.no_grad():
        translator.bias.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(4))
        translator.weight.add_(0.1)

    def lens(entry, index):
        return translator(entry)

    naive = _naive(gpt2, TOKENS, targets=TOKENS, lens=lens)
    result = logit_lens(
        gpt2, TOKENS, positions=None, targets=TOKENS, lens=lens, kl_to_final=True, chunk_size=5
    )
    _assert_matches(result.readout, naive)
    assert result.readout.target_ids.shape == result.readout.entropy.shape == (4, 2, 6)
    assert (result.readout.kl_to_final[-1] > 1e-3).all()  # the lens moved the final entry
    plain = _naive(gpt2, TOKENS, targets=TOKENS)
    some = logit_lens(gpt2, TOKENS, positions=None, targets=TOKENS, layers=[0, 2], kl_to_final=True)
    assert some.labels == ["0_pre", "2_pre"]
    _assert_matches(some.readout, {k: v[[0, 2]] for k, v in plain.items() if k != "model_logits"})


class MatmulShapes(TorchFunctionMode):
    """Records ``(rows, columns)`` of every matmul's output."""

    MATMULS = {
        torch.Tensor.__matmul__,
        torch.Tensor.matmul,
        torch.matmul,
        torch.mm,
        torch.addmm,
        torch.nn.functional.linear,
    }

    def __init__(self) -> None:
        super().__init__()
        self.shapes: List[Tuple[int, int]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self.MATMULS and isinstance(out, torch.Tensor):
            self.shapes.append((out.numel() // out.shape[-1], out.shape[-1]))
        return out


def test_no_unembedding_matmul_takes_more_than_chunk_size_rows(gpt2):
    _, cache = gpt2.run_with_cache(TOKENS)
    naive = _naive(gpt2, TOKENS)
    for kl_to_final in (False, True):
        for chunk_size in (1, 2, 5):
            with MatmulShapes() as counted:
                result = logit_lens(
                    cache, positions=None, incl_mid=True, kl_to_final=kl_to_final, top_k=2,
                    chunk_size=chunk_size,
                )  # fmt: skip
            assert len(result.labels) == 7
            rows = [n for n, columns in counted.shapes if columns == D_VOCAB]
            assert max(rows) == chunk_size, (kl_to_final, chunk_size, rows)
            assert sum(rows) == 7 * 2 * 6  # every row read once
            if kl_to_final:
                kept = [0, 2, 4, 6]  # the resid_pre entries and final_post
                torch.testing.assert_close(result.readout.kl_to_final[kept], naive["kl"])


def _readout_4_3_0(model, vectors, *, targets=None, top_k=None, chunk_size=64):
    """4.3.0's readout loop, the oracle for calls that use none of the new options."""
    flat = vectors.reshape(-1, vectors.shape[-1])
    rows = None if targets is None else targets.expand(vectors.shape[:-1]).reshape(-1)
    out: Dict[str, List[torch.Tensor]] = {"values": [], "entropy": [], "ranks": [], "top": []}
    with torch.no_grad():
        for start in range(0, flat.shape[0], chunk_size):
            chunk = model.ln_final.normalize_without_hooks(flat[start : start + chunk_size])
            logits = model.adapter.apply_output_logits_transform(chunk @ model.W_U + model.b_U)
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            out["entropy"].append(-(log_probs.exp() * log_probs).sum(dim=-1))
            if rows is not None:
                ids = rows[start : start + chunk_size].unsqueeze(-1)
                out["ranks"].append((logits > torch.gather(logits, -1, ids)).sum(-1, keepdim=True))
                out["values"].append(torch.gather(log_probs, -1, ids))
            else:
                top = torch.topk(logits, k=top_k, dim=-1, sorted=True)
                out["top"].append(top.indices)
                out["values"].append(torch.gather(log_probs, -1, top.indices))
    lead = tuple(vectors.shape[:-1])
    return {k: torch.cat(v).reshape(*lead, *v[0].shape[1:]) for k, v in out.items() if v}


def test_calls_without_kl_are_bit_identical_to_4_3_0(gpt2):
    _, cache = gpt2.run_with_cache(TOKENS)
    stack = cache.accumulated_resid(apply_ln=False, incl_mid=True)
    for selector, chunk_size in (({"targets": TOKENS}, 5), ({"top_k": 3}, 64)):
        expected = _readout_4_3_0(gpt2, stack, chunk_size=chunk_size, **selector)
        readout = logit_readout(
            gpt2, stack, return_type="log_probs", chunk_size=chunk_size, **selector
        )
        assert torch.equal(readout.values, expected["values"])
        assert torch.equal(readout.entropy, expected["entropy"])
        if "ranks" in expected:
            assert torch.equal(readout.target_ranks, expected["ranks"])
            assert torch.equal(readout.target_probs, readout.values.exp())
        else:
            assert torch.equal(readout.top_ids, expected["top"])
        assert readout.kl_to_final is None
        # With KL the rows are batched otherwise: equal up to rounding.
        with_kl = logit_readout(
            gpt2, stack, return_type="log_probs", chunk_size=chunk_size, reference_entry=-1,
            **selector,
        )  # fmt: skip
        torch.testing.assert_close(with_kl.values, readout.values)
        torch.testing.assert_close(with_kl.entropy, readout.entropy)


def test_reference_entry_is_checked(gpt2):
    _, cache = gpt2.run_with_cache(TOKENS)
    stack = cache.accumulated_resid(apply_ln=True)
    with pytest.raises(ValueError, match="out of range"):
        logit_readout(gpt2, stack, apply_ln=False, reference_entry=4)
    with pytest.raises(ValueError, match="entry axis"):
        logit_readout(gpt2, stack[0, 0, 0], apply_ln=False, reference_entry=0)
    first = logit_readout(gpt2, stack, apply_ln=False, reference_entry=0)
    assert torch.equal(first.kl_to_final[0], torch.zeros(2, 6))


def test_no_hook_fires_in_the_tool() -> None:
    """ln_final is read through normalize_without_hooks everywhere, the readout check and
    logit_readout(apply_ln=True) included, so a hook left on the model neither fires nor counts."""
    model = _gpt2()
    _, cache = model.run_with_cache(TOKENS)
    calls: List[Optional[str]] = []
    for hook_point in model.hook_dict.values():
        hook_point.add_hook(lambda tensor, hook: calls.append(hook.name))
    try:
        model(TOKENS)
        one_run = sorted(calls)
        calls.clear()
        logit_lens(model, TOKENS, targets=[3], kl_to_final=True)  # runs the model, then reads
        assert sorted(calls) == one_run
        calls.clear()
        logit_lens(model, cache=cache, top_k=3, kl_to_final=True, layers=[0])
        logit_readout(model, cache["blocks.1.hook_resid_post"], apply_ln=True, top_k=3)
    finally:
        model.reset_hooks()
    assert calls == []
