"""Sanity figures for the shipped reference model: loading parity, predictions, logit lens.

Usage::

    HF_HUB_OFFLINE=1 .venv/bin/python -m reference_model.sanity

Prints (1) the max abs difference of TransformerBridge vs Hugging Face log-probabilities in raw
and compatibility mode, (2) top next-token predictions for a few prompts, (3) a hand-made
logit lens on held-out text, for every layer, computed two ways: *fresh* (final LayerNorm applied
with the residual's own statistics) and *cached* (residual centered and divided by the cached
``ln_final.hook_scale`` of the final residual), and (4) the residual-stream norm per layer.
"""

from __future__ import annotations

import math

import torch

from reference_model.load import load_bridge, load_hf_model, load_tokenizer
from reference_model.train import HELDOUT_EVERY, N_CTX, extract_text, stdlib_files

PROMPTS = [
    "Return the number of",
    "If the file does not exist, raise",
    "This module provides",
    "The default value is",
    "See the documentation for",
]
N_WINDOWS = 16


def heldout_tokens(n_windows: int = N_WINDOWS) -> torch.Tensor:
    """Returns ``n_windows`` bos-prefixed windows of held-out text, shape [n_windows, N_CTX]."""
    tokenizer = load_tokenizer()
    ids: list[int] = []
    for path in stdlib_files()[::HELDOUT_EVERY]:
        text = extract_text(path)
        if text:
            ids += tokenizer.backend_tokenizer.encode(text).ids + [tokenizer.eos_token_id]
        if len(ids) >= n_windows * (N_CTX - 1):
            break
    body = torch.tensor(ids[: n_windows * (N_CTX - 1)]).reshape(n_windows, N_CTX - 1)
    bos = torch.full((n_windows, 1), tokenizer.bos_token_id)
    return torch.cat([bos, body], dim=1)


def entropy_bits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in bits of softmax(logits) over the last dimension."""
    log_probs = logits.log_softmax(-1)
    return -(log_probs.exp() * log_probs).sum(-1) / math.log(2)


@torch.no_grad()
def main() -> None:
    """Prints the sanity figures."""
    torch.set_num_threads(2)
    tokens = heldout_tokens()
    hf_model = load_hf_model()
    hf_out = hf_model(tokens, output_hidden_states=True)
    hf_logprobs = hf_out.logits.log_softmax(-1)
    loss = -hf_logprobs[:, :-1].gather(-1, tokens[:, 1:, None]).mean()
    print(f"held-out loss on {tuple(tokens.shape)} tokens: {loss:.3f} nats/token")

    print("\n# TransformerBridge vs HF: max |log_softmax diff|")
    for compatibility_mode in (False, True):
        model = load_bridge(compatibility_mode=compatibility_mode)
        diff = (model(tokens).log_softmax(-1) - hf_logprobs).abs().max().item()
        print(f"compatibility_mode={compatibility_mode}: {diff:.2e}")

    model = load_bridge(compatibility_mode=True)
    print("\n# Top-5 next tokens (final layer)")
    for prompt in PROMPTS:
        top = model(model.to_tokens(prompt))[0, -1].softmax(-1).topk(5)
        shown = ", ".join(f"{model.tokenizer.decode(i)!r} {p:.2f}" for p, i in zip(*top))
        print(f"{prompt!r} -> {shown}")

    _, cache = model.run_with_cache(tokens)
    final_scale = cache["ln_final.hook_scale"]
    names = [f"blocks.{i}.hook_resid_pre" for i in range(model.cfg.n_layers)]
    names.append(f"blocks.{model.cfg.n_layers - 1}.hook_resid_post")
    max_entropy = math.log2(model.cfg.d_vocab)
    print(f"\n# Logit lens on held-out text, positions 1..{N_CTX - 1} (position 0 is bos)")
    print(f"max entropy log2(d_vocab={model.cfg.d_vocab}) = {max_entropy:.2f} bits")
    print("resid          | top1=input | top1=next | H fresh | H cached | H cached (no b_U) | norm")
    for i, name in enumerate(names):
        resid = cache[name]
        centered = resid - resid.mean(-1, keepdim=True)
        fresh = model.unembed(model.ln_final.normalize_without_hooks(resid))[:, 1:]
        cached = model.unembed(centered / final_scale)[:, 1:]
        cached_no_bias = (centered / final_scale)[:, 1:] @ model.W_U
        top1 = fresh.argmax(-1)
        eq_input = (top1 == tokens[:, 1:]).float().mean().item()
        eq_next = (top1[:, :-1] == tokens[:, 2:]).float().mean().item()
        norm = resid[:, 1:].norm(dim=-1).mean().item()
        print(
            f"layer {i} {'pre ' if i < model.cfg.n_layers else 'post'}   | {eq_input:10.3f} | "
            f"{eq_next:9.3f} | {entropy_bits(fresh).mean():7.2f} | "
            f"{entropy_bits(cached).mean():8.2f} | {entropy_bits(cached_no_bias).mean():17.2f} | "
            f"{norm:.2f}"
        )
    hf_fresh = hf_model.lm_head(hf_model.transformer.ln_f(hf_out.hidden_states[0]))[:, 1:]
    own_fresh = model.unembed(model.ln_final.normalize_without_hooks(cache[names[0]]))[:, 1:]
    diff = (hf_fresh.log_softmax(-1) - own_fresh.log_softmax(-1)).abs().max().item()
    print(
        f"layer-0 fresh lens, HF ln_f + lm_head vs folded model: max |log_softmax diff| {diff:.2e}"
    )
    ratio = final_scale[:, 1:].mean() / cache["blocks.0.hook_resid_pre"][:, 1:].std(-1).mean()
    print(f"mean ln_final scale / mean layer-0 residual scale: {ratio:.1f}")


if __name__ == "__main__":
    main()
