"""The logit lens of TransformerLens against Hugging Face's own modules, on GPT-2 and Pythia.

Ground truth for every layer is the Hugging Face model's own final norm and unembedding applied to
its own pre-norm residual stream, taken with forward hooks on the decoder layers (the input of
block 0, then the output of each block). ``hidden_states[-1]`` cannot serve: GPT-2 applies
``ln_f`` to it. TransformerLens's side is the model converted with its own weight converters and
``load_and_process_state_dict``, read with ``cache.accumulated_resid(apply_ln=True,
recompute_ln=True) @ W_U + b_U``. Both are compared as log-probabilities, since ``center_unembed``
shifts every logit of a position by the same constant.

The models have the configs of ``gpt2`` and ``pythia-70m`` shrunk to run in seconds, are randomly
initialised offline, get random norm weights and biases (unit weights and zero biases would hide a
missing weight or bias), and have block outputs that grow with depth, as in trained models (with
a flat residual norm, the cached final scale would be about right everywhere and hide the bug).
The same tests run on the real weights when they are in the local Hugging Face cache.
"""

from functools import lru_cache
from typing import Callable, Dict, List, Tuple

import pytest
import torch
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    PreTrainedModel,
)

from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.pretrained.weight_conversions import (
    convert_gpt2_weights,
    convert_neox_weights,
)

ARCHITECTURES = ["gpt2", "pythia-70m"]
HUB_NAMES = {"gpt2": "gpt2", "pythia-70m": "EleutherAI/pythia-70m"}
RESIDUAL_GROWTH = 3.0
# Bounds on max |Δ log-prob| in float32. Real weights have residual norms in the hundreds (and
# GPT-2 a few outlier dimensions in the thousands), so rounding differences between the two
# implementations are larger there.
TOLERANCE = {"random": 1e-3, "pretrained": 5e-3}
# The cached final scale must miss the ground truth at the embeddings by far more than that.
CACHED_SCALE_MIN_ERROR = 0.5


def gpt2_config() -> GPT2Config:
    """The config of ``gpt2`` (12 layers, width 768, 50257 tokens), shrunk."""
    return GPT2Config(
        vocab_size=512,
        n_positions=64,
        n_ctx=64,
        n_embd=64,
        n_layer=4,
        n_head=4,
        activation_function="gelu_new",
        layer_norm_epsilon=1e-5,
        initializer_range=0.02,
        resid_pdrop=0.1,
        embd_pdrop=0.1,
        attn_pdrop=0.1,
        scale_attn_by_inverse_layer_idx=False,
        tie_word_embeddings=True,
        bos_token_id=511,
        eos_token_id=511,
    )


def pythia_70m_config() -> GPTNeoXConfig:
    """The config of ``pythia-70m`` (6 layers, width 512, 8 heads, 50304 tokens), shrunk.

    Kept: parallel attention and MLP, rotary embeddings on a quarter of each head, LayerNorm,
    an unembedding that is not tied to the embedding.
    """
    return GPTNeoXConfig(
        vocab_size=512,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=256,
        hidden_act="gelu",
        rotary_pct=0.25,
        rotary_emb_base=10000,
        max_position_embeddings=64,
        layer_norm_eps=1e-5,
        initializer_range=0.02,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        attention_bias=True,
        bos_token_id=0,
        eos_token_id=0,
    )


def decoder_layers(hf_model: PreTrainedModel) -> nn.Module:
    if isinstance(hf_model, GPT2LMHeadModel):
        return hf_model.transformer.h
    return hf_model.gpt_neox.layers


def final_norm(hf_model: PreTrainedModel) -> nn.Module:
    if isinstance(hf_model, GPT2LMHeadModel):
        return hf_model.transformer.ln_f
    return hf_model.gpt_neox.final_layer_norm


def block_output_projections(hf_model: PreTrainedModel, index: int) -> List[nn.Module]:
    """The layers of a block that write to the residual stream."""
    layer = decoder_layers(hf_model)[index]
    if isinstance(hf_model, GPT2LMHeadModel):
        return [layer.attn.c_proj, layer.mlp.c_proj]
    return [layer.attention.dense, layer.mlp.dense_4h_to_h]


def randomize_norms_and_grow_residual(hf_model: PreTrainedModel) -> None:
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for module in hf_model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
                module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=generator))
        for index in range(hf_model.config.num_hidden_layers):
            for projection in block_output_projections(hf_model, index):
                projection.weight.mul_(RESIDUAL_GROWTH ** (index + 1))
                projection.bias.mul_(RESIDUAL_GROWTH ** (index + 1))
        # Sharpen the unembedding, so that predictions are far from uniform (as in trained models).
        hf_model.get_output_embeddings().weight.mul_(10.0)


def random_hf_model(architecture: str) -> PreTrainedModel:
    torch.manual_seed(0)
    if architecture == "gpt2":
        hf_model: PreTrainedModel = GPT2LMHeadModel(gpt2_config())
    else:
        hf_model = GPTNeoXForCausalLM(pythia_70m_config())
    randomize_norms_and_grow_residual(hf_model)
    return hf_model.eval()


def pretrained_hf_model(architecture: str) -> PreTrainedModel:
    name = HUB_NAMES[architecture]
    model_class = GPT2LMHeadModel if architecture == "gpt2" else GPTNeoXForCausalLM
    try:
        hf_model = model_class.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as error:
        pytest.skip(
            f"real {architecture} weights are not in the local Hugging Face cache "
            f"({name}: {type(error).__name__}); run with network once to download them"
        )
    return hf_model.float().eval()


@lru_cache(maxsize=None)
def hf_model_and_ground_truth(
    source: str, architecture: str
) -> Tuple[PreTrainedModel, torch.Tensor, torch.Tensor]:
    """The HF model, the tokens, and its per-layer logit lens log-probs (computed once)."""
    if source == "random":
        hf_model = random_hf_model(architecture)
    else:
        hf_model = pretrained_hf_model(architecture)
    tokens = torch.randint(
        0, hf_model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0)
    )
    residuals, hf_logits = hf_residual_stream(hf_model, tokens)
    with torch.no_grad():
        truth = hf_model.get_output_embeddings()(final_norm(hf_model)(residuals))
    truth = truth.log_softmax(dim=-1)
    # The hooks took the residual before ln_f: its lens at the last layer is the model itself.
    torch.testing.assert_close(truth[-1], hf_logits.log_softmax(dim=-1), rtol=0, atol=1e-4)
    return hf_model, tokens, truth


def hf_residual_stream(
    hf_model: PreTrainedModel, tokens: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The input of block 0 and the output of every block, stacked, and the model's logits."""
    layers = decoder_layers(hf_model)
    captured: Dict[int, torch.Tensor] = {}

    def save_input(module, args, kwargs):
        captured[0] = args[0] if args else kwargs["hidden_states"]

    def save_output(index: int) -> Callable:
        def hook(module, args, output):
            captured[index + 1] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = [layers[0].register_forward_pre_hook(save_input, with_kwargs=True)]
    handles += [layer.register_forward_hook(save_output(i)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            logits = hf_model(tokens).logits
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack([captured[i] for i in range(len(layers) + 1)]), logits


def hooked_transformer_config(hf_config, fold_ln: bool) -> HookedTransformerConfig:
    """What transformer_lens.loading_from_pretrained makes of these architectures' configs."""
    if isinstance(hf_config, GPT2Config):
        cfg_dict = {
            "d_model": hf_config.n_embd,
            "d_head": hf_config.n_embd // hf_config.n_head,
            "n_heads": hf_config.n_head,
            "d_mlp": hf_config.n_embd * 4,
            "n_layers": hf_config.n_layer,
            "n_ctx": hf_config.n_ctx,
            "eps": hf_config.layer_norm_epsilon,
            "d_vocab": hf_config.vocab_size,
            "act_fn": hf_config.activation_function,
            "use_attn_scale": True,
            "use_local_attn": False,
            "scale_attn_by_inverse_layer_idx": hf_config.scale_attn_by_inverse_layer_idx,
            "normalization_type": "LN",
            "original_architecture": "GPT2LMHeadModel",
        }
    else:
        cfg_dict = {
            "d_model": hf_config.hidden_size,
            "d_head": hf_config.hidden_size // hf_config.num_attention_heads,
            "n_heads": hf_config.num_attention_heads,
            "d_mlp": hf_config.intermediate_size,
            "n_layers": hf_config.num_hidden_layers,
            "n_ctx": hf_config.max_position_embeddings,
            "eps": hf_config.layer_norm_eps,
            "d_vocab": hf_config.vocab_size,
            "act_fn": hf_config.hidden_act,
            "use_attn_scale": True,
            "use_local_attn": False,
            "scale_attn_by_inverse_layer_idx": False,
            "parallel_attn_mlp": True,
            "positional_embedding_type": "rotary",
            "rotary_adjacent_pairs": False,
            "normalization_type": "LN",
            "original_architecture": "GPTNeoXForCausalLM",
        }
        cfg_dict["rotary_dim"] = round(hf_config.rotary_pct * cfg_dict["d_head"])
    # As get_pretrained_model_config: folded norms keep only centring and scaling.
    if fold_ln:
        cfg_dict["normalization_type"] = "LNPre"
    return HookedTransformerConfig(**cfg_dict, init_weights=False, device="cpu")


def hooked_transformer_from(hf_model: PreTrainedModel, fold_ln: bool) -> HookedTransformer:
    """As from_pretrained (fold_ln=True) or from_pretrained_no_processing (fold_ln=False)."""
    cfg = hooked_transformer_config(hf_model.config, fold_ln)
    convert = (
        convert_gpt2_weights if isinstance(hf_model, GPT2LMHeadModel) else convert_neox_weights
    )
    state_dict = {name: tensor.detach().clone() for name, tensor in convert(hf_model, cfg).items()}
    model = HookedTransformer(cfg)
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=fold_ln,
        center_writing_weights=fold_ln,
        center_unembed=fold_ln,
        fold_value_biases=fold_ln,
    )
    return model.eval()


def lens_log_probs(model: HookedTransformer, tokens: torch.Tensor, recompute_ln: bool):
    _, cache = model.run_with_cache(tokens)
    with torch.no_grad():
        lens = cache.accumulated_resid(apply_ln=True, recompute_ln=recompute_ln)
        return (lens @ model.W_U + model.b_U).log_softmax(dim=-1)


@pytest.mark.parametrize("fold_ln", [False, True], ids=["fold_ln=False", "fold_ln=True"])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("source", ["random", "pretrained"])
def test_logit_lens_matches_the_hf_models_own_norm_and_unembedding(source, architecture, fold_ln):
    hf_model, tokens, truth = hf_model_and_ground_truth(source, architecture)
    model = hooked_transformer_from(hf_model, fold_ln)

    fresh = lens_log_probs(model, tokens, recompute_ln=True)
    cached = lens_log_probs(model, tokens, recompute_ln=False)

    assert fresh.shape == truth.shape == (hf_model.config.num_hidden_layers + 1, *truth.shape[1:])
    fresh_error = (fresh - truth).abs().flatten(1).amax(dim=1)  # per layer
    cached_error = (cached - truth).abs().flatten(1).amax(dim=1)
    print(
        f"\n{source} {architecture} fold_ln={fold_ln}: max |Δ log-prob| per layer, "
        f"recompute_ln=True: {[f'{e:.1e}' for e in fresh_error.tolist()]}, "
        f"cached scale: {[f'{e:.2f}' for e in cached_error.tolist()]}"
    )
    assert fresh_error.max() < TOLERANCE[source]
    # The test can fail on the old behaviour: the cached final scale misses at the embeddings.
    assert cached_error[0] > CACHED_SCALE_MIN_ERROR
