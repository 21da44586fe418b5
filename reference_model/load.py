"""Load the shipped reference model as a HuggingFace model or a TransformerLens HookedTransformer.

Everything loads from the files in ``reference_model/weights/``; no network access is needed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GPT2LMHeadModel, GPT2TokenizerFast

from transformer_lens import HookedTransformer
from transformer_lens.loading_from_pretrained import get_pretrained_model_config
from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def load_hf_model(weights_dir: Path = WEIGHTS_DIR) -> GPT2LMHeadModel:
    """Loads the reference model as a float32 ``GPT2LMHeadModel`` in eval mode.

    Args:
        weights_dir: Directory holding ``config.json`` and ``model.safetensors``.

    Returns:
        The HuggingFace model (weights are stored in float16 and upcast to float32).
    """
    model = GPT2LMHeadModel.from_pretrained(weights_dir, dtype=torch.float32, local_files_only=True)
    return model.eval()


def load_tokenizer(weights_dir: Path = WEIGHTS_DIR) -> GPT2TokenizerFast:
    """Loads the byte-level BPE tokenizer; ``<|endoftext|>`` is its bos, eos and unk token.

    Args:
        weights_dir: Directory holding ``tokenizer.json`` and ``tokenizer_config.json``.

    Returns:
        The tokenizer. Like GPT-2's, it does not add a bos token itself.
    """
    return GPT2TokenizerFast.from_pretrained(weights_dir, local_files_only=True)


def load_hooked_model(
    fold_ln: bool = True,
    center_writing_weights: bool = True,
    center_unembed: bool = True,
    weights_dir: Path = WEIGHTS_DIR,
) -> HookedTransformer:
    """Loads the reference model into TransformerLens through its GPT-2 loading path.

    The config comes from ``get_pretrained_model_config`` on the local weights directory (with
    ``fold_ln=True`` its normalization type becomes ``"LNPre"``), the weights from
    ``convert_gpt2_weights`` and ``HookedTransformer.load_and_process_state_dict``.

    Args:
        fold_ln: Fold LayerNorm weights and biases into the following linear layers.
        center_writing_weights: Center the weights that write to the residual stream.
        center_unembed: Center the unembedding over the vocabulary.
        weights_dir: Directory holding the shipped files.

    Returns:
        A float32 ``HookedTransformer`` on CPU in eval mode, with the tokenizer set (so
        ``to_tokens`` prepends ``<|endoftext|>`` as bos by default).
    """
    if any(word in str(weights_dir).lower() for word in ("llama", "gemma")):
        # get_pretrained_model_config picks the architecture from such names, not config.json.
        raise ValueError(f"weights_dir must not contain 'llama' or 'gemma': {weights_dir}")
    cfg = get_pretrained_model_config(str(weights_dir), fold_ln=fold_ln, device="cpu")
    model = HookedTransformer(cfg)
    state_dict = convert_gpt2_weights(load_hf_model(weights_dir), cfg)
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=fold_ln,
        center_writing_weights=center_writing_weights,
        center_unembed=center_unembed,
        fold_value_biases=True,
    )
    model.set_tokenizer(load_tokenizer(weights_dir))
    return model.eval()
