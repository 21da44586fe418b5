"""The logit-lens tool, called as 4.3.0's callers call it, gives 4.3.0's numbers bit for bit.

Repository-only: the oracle is pristine 4.3.0's ``tools/analysis/logit_lens.py``, read from the
pinned release sdist and imported by path beside the fork (it then runs on the fork's cache and
norm code, whose defaults PR 1 proves equal to 4.3.0's). Every call below uses only 4.3.0's
arguments; each field 4.3.0 returns must be ``torch.equal`` to the fork's. Models are built from
configs: GPT-2 (3 layers, random final norm and ``b_U``) and a soft-capped Gemma-2, float32.
"""

from types import ModuleType
from typing import Any

import pytest
import torch
from conftest import pristine_module

FIELDS = ("values", "entropy", "target_ranks", "top_ids", "target_ids", "vocab_ids")
D_VOCAB = 1000


@pytest.fixture(scope="module")
def pristine_tool(tmp_path_factory) -> ModuleType:
    return pristine_module(
        "transformer_lens/tools/analysis/logit_lens.py", tmp_path_factory.mktemp("pristine")
    )


def gpt2() -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=D_VOCAB, n_positions=32, n_embd=64, n_layer=3, n_head=4)
    hf = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        hf.transformer.ln_f.weight.normal_(1.0, 0.2)
        hf.transformer.ln_f.bias.normal_(0.0, 0.2)
    return hf, "GPT2LMHeadModel", cfg


def gemma2() -> Any:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(
        vocab_size=D_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=32,
        final_logit_softcapping=3.0,  # small, so that the cap bends the logits here
    )
    return Gemma2ForCausalLM(cfg).eval(), "Gemma2ForCausalLM", cfg


@pytest.fixture(scope="module", params=[gpt2, gemma2], ids=["gpt2", "gemma2-softcap"])
def model_and_tokens(request) -> Any:
    from transformer_lens.model_bridge.sources import build_bridge_from_module

    torch.manual_seed(0)
    hf, architecture, cfg = request.param()
    model = build_bridge_from_module(
        hf, architecture, hf_config=cfg, dtype=torch.float32, device="cpu"
    )
    if architecture == "GPT2LMHeadModel":
        with torch.no_grad():  # a b_U, which GPT-2 lacks, so that one dropped would show
            model.b_U.normal_(0.0, 1.0)
    tokens = torch.randint(D_VOCAB, (2, 9))
    return model, tokens


CALLS = {
    "last position": dict(),
    "all positions, per-row targets": dict(positions=None, targets="next"),
    "shared targets, log_probs": dict(targets=[3, 17, 999], return_type="log_probs"),
    "top_k, incl_mid, chunk 5": dict(top_k=5, incl_mid=True, chunk_size=5, positions=None),
    "vocab, probs, chunk 1": dict(vocab=[0, 5, 998], return_type="probs", chunk_size=1),
    "full vocabulary, layers": dict(layers=[0, 2], positions=None, chunk_size=7),
    "lens, per-row targets": dict(lens="scale", positions=None, targets="next", chunk_size=3),
}


@pytest.mark.parametrize("call", CALLS, ids=list(CALLS))
def test_fields_equal_4_3_0(model_and_tokens, pristine_tool, call: str) -> None:
    from transformer_lens.tools.analysis import logit_lens

    model, tokens = model_and_tokens
    kwargs = dict(CALLS[call])
    if kwargs.get("targets") == "next":
        kwargs["targets"] = tokens[:, 1:]
    if kwargs.get("lens") == "scale":
        kwargs["lens"] = lambda entry, index: entry * (1.0 + 0.1 * index)
    prompt = tokens[:, :-1]
    theirs = pristine_tool.logit_lens(model, prompt, **kwargs)
    ours = logit_lens(model, prompt, **kwargs)
    assert ours.labels == theirs.labels
    for field in FIELDS:
        mine, upstream = getattr(ours.readout, field), getattr(theirs.readout, field)
        assert (mine is None) == (upstream is None), field
        if upstream is not None:
            assert mine.dtype == upstream.dtype and torch.equal(mine, upstream), field
