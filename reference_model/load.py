"""Load the shipped reference model as a Hugging Face model or a TransformerLens bridge.

Everything loads from the files in ``reference_model/weights/``; no network access is needed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GPT2LMHeadModel, GPT2TokenizerFast

from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.model_bridge.sources import build_bridge_from_module

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


def load_bridge(compatibility_mode: bool = False, weights_dir: Path = WEIGHTS_DIR) -> TransformerBridge:
    """Wraps the reference model in a TransformerLens ``TransformerBridge``, offline.

    Args:
        compatibility_mode: Call ``enable_compatibility_mode()`` (fold_ln, centring), which gives
            HookedTransformer-equivalent numerics; raw mode keeps Hugging Face's.
        weights_dir: Directory holding the shipped files.

    Returns:
        A float32 bridge on CPU in eval mode, with the tokenizer set.
    """
    hf_model = load_hf_model(weights_dir)
    bridge = build_bridge_from_module(
        hf_model,
        "GPT2LMHeadModel",
        hf_config=hf_model.config,
        tokenizer=load_tokenizer(weights_dir),
        dtype=torch.float32,
        device="cpu",
    )
    if compatibility_mode:
        bridge.enable_compatibility_mode()
    return bridge.eval()
