#!/usr/bin/env python3
"""Write a local Hugging Face Hub cache of full-size, random-init `gpt2` and `EleutherAI/pythia-70m`.

The acceptance tests load those two models by name, as upstream's acceptance tier does, and this
offline machine cannot reach the Hub. This script writes the cache layout that `huggingface_hub`
reads offline (`models--<org>--<name>/refs/main` naming a revision, its files under
`snapshots/<revision>/`), with each model's real `config.json` (so every shape, the norms, the
rotary fraction and the parallel residual are the real ones) and weights drawn at random, seeded.
The tokenizer is the shipped reference model's (byte-level BPE, vocab 2048, `<|endoftext|>` id 0),
whose ids all fall inside both vocabularies.

So the tests run the real loading path (`TransformerBridge.boot_transformers`, Hugging Face's
`from_pretrained`) and their comparisons on real shapes, but not on the trained weights.

Usage:
    tools/build_hub_cache.py [--out build/hub-cache]    # then HF_HUB_CACHE=build/hub-cache/hub
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict

import torch

REFERENCE_WEIGHTS = Path(__file__).resolve().parent.parent / "reference_model" / "weights"
SEED = 0

# config.json of each model on the Hub (main revision), verbatim but for key order.
CONFIGS: Dict[str, Dict[str, Any]] = {
    "gpt2": {
        "activation_function": "gelu_new",
        "architectures": ["GPT2LMHeadModel"],
        "attn_pdrop": 0.1,
        "bos_token_id": 50256,
        "embd_pdrop": 0.1,
        "eos_token_id": 50256,
        "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05,
        "model_type": "gpt2",
        "n_ctx": 1024,
        "n_embd": 768,
        "n_head": 12,
        "n_layer": 12,
        "n_positions": 1024,
        "resid_pdrop": 0.1,
        "summary_activation": None,
        "summary_first_dropout": 0.1,
        "summary_proj_to_labels": True,
        "summary_type": "cls_index",
        "summary_use_proj": True,
        "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}},
        "vocab_size": 50257,
    },
    "EleutherAI/pythia-70m": {
        "architectures": ["GPTNeoXForCausalLM"],
        "bos_token_id": 0,
        "eos_token_id": 0,
        "hidden_act": "gelu",
        "hidden_size": 512,
        "initializer_range": 0.02,
        "intermediate_size": 2048,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": 2048,
        "model_type": "gpt_neox",
        "num_attention_heads": 8,
        "num_hidden_layers": 6,
        "rotary_emb_base": 10000,
        "rotary_pct": 0.25,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "transformers_version": "4.24.0",
        "use_cache": True,
        "use_parallel_residual": True,
        "vocab_size": 50304,
    },
}
# The dtype each checkpoint is stored in on the Hub (pythia's is float16, as its config says).
STORED_DTYPES = {"gpt2": torch.float32, "EleutherAI/pythia-70m": torch.float16}
# Each model's tokenizer_config.json differs from the reference model's only here.
TOKENIZER_OVERRIDES: Dict[str, Dict[str, Any]] = {
    "gpt2": {"model_max_length": 1024, "tokenizer_class": "GPT2Tokenizer"},
    "EleutherAI/pythia-70m": {
        "model_max_length": 1000000000000000019884624838656,
        "tokenizer_class": "GPTNeoXTokenizer",
    },
}
TOKENIZER_FILES = ("tokenizer.json", "special_tokens_map.json")


def _write_json(path: Path, content: Dict[str, Any]) -> None:
    path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")


def _random_weights(name: str, folder: Path) -> None:
    """`model.safetensors` of a seeded, random-init model with the real configuration."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as scratch:
        _write_json(Path(scratch) / "config.json", CONFIGS[name])
        config = AutoConfig.from_pretrained(scratch)
    # The same seed and init order give the same weights: no other draw happens in this process
    # between the seed and the init.
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config)
    model.to(STORED_DTYPES[name])
    with tempfile.TemporaryDirectory() as scratch:
        model.save_pretrained(scratch, safe_serialization=True)
        shutil.copyfile(Path(scratch) / "model.safetensors", folder / "model.safetensors")


def _tokenizer(name: str, folder: Path) -> None:
    for file in TOKENIZER_FILES:
        shutil.copyfile(REFERENCE_WEIGHTS / file, folder / file)
    tokenizer_config = json.loads((REFERENCE_WEIGHTS / "tokenizer_config.json").read_text())
    tokenizer_config.update(TOKENIZER_OVERRIDES[name])
    _write_json(folder / "tokenizer_config.json", tokenizer_config)


def _revision(name: str) -> str:
    """A fixed revision per configuration and seed, in the Hub's 40-hex form."""
    key = json.dumps([name, CONFIGS[name], str(STORED_DTYPES[name]), SEED], sort_keys=True)
    return hashlib.sha1(key.encode()).hexdigest()


def build_model(name: str, hub_cache: Path) -> None:
    """Write one model's repository folder, replacing any previous one whole."""
    repo = hub_cache / ("models--" + name.replace("/", "--"))
    revision = _revision(name)
    staging = hub_cache / (repo.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    snapshot = staging / "snapshots" / revision
    snapshot.mkdir(parents=True)
    _write_json(snapshot / "config.json", CONFIGS[name])
    _tokenizer(name, snapshot)
    _random_weights(name, snapshot)
    (staging / "refs").mkdir()
    (staging / "refs" / "main").write_text(revision)
    shutil.rmtree(repo, ignore_errors=True)
    staging.rename(repo)
    print(f"{name}: {repo} (revision {revision}, random weights, seed {SEED})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("build/hub-cache"), help="HF_HOME")
    args = parser.parse_args()
    hub_cache = args.out / "hub"
    hub_cache.mkdir(parents=True, exist_ok=True)
    for name in CONFIGS:
        build_model(name, hub_cache)


if __name__ == "__main__":
    main()
