"""A short logit lens, offline: fresh normalization against the cached scale.

Runs the reference model shipped in ``reference_model/`` (a small GPT-2 trained here, since
pretrained weights cannot be downloaded offline) on one prompt, and prints, for the last position,
each layer's top token, its probability and the entropy of the layer's distribution, computed two
ways: with ``recompute_ln=True`` (the logit lens) and with the cached final scale (the old
``apply_ln=True`` behaviour, which is direct logit attribution's convention).

Usage: ``.venv/bin/python examples/quickstart.py [PROMPT]``
"""

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from reference_model.load import load_hooked_model  # noqa: E402

DEFAULT_PROMPT = "Return the number of items in the list"


def lens_distributions(cache, model, recompute_ln: bool) -> torch.Tensor:
    """Per-layer log-probabilities at the last position, shape [layer, d_vocab]."""
    resid = cache.accumulated_resid(apply_ln=True, recompute_ln=recompute_ln, pos_slice=-1)
    return (resid[:, 0] @ model.W_U + model.b_U).log_softmax(dim=-1)


def main(prompt: str) -> None:
    model = load_hooked_model(fold_ln=True)
    tokens = model.to_tokens(prompt)
    logits, cache = model.run_with_cache(tokens)
    _, labels = cache.accumulated_resid(return_labels=True)
    fresh = lens_distributions(cache, model, recompute_ln=True)
    cached = lens_distributions(cache, model, recompute_ln=False)

    print(f"prompt: {prompt!r}; last input token: {model.to_string(tokens[0, -1])!r}")
    print(
        f"max entropy (uniform over {model.cfg.d_vocab} tokens): "
        f"{math.log2(model.cfg.d_vocab):.2f} bits"
    )
    print(f"{'layer':<11} {'recompute_ln=True (logit lens)':<38} cached scale (old apply_ln=True)")
    for label, f, c in zip(labels, fresh, cached):
        print(f"{label:<11} {describe(model, f):<38} {describe(model, c)}")
    same = torch.allclose(fresh[-1], logits[0, -1].log_softmax(-1), atol=1e-4)
    print(f"last lens row equals the model's own output: {same}")


def describe(model, log_probs: torch.Tensor) -> str:
    """Top token, its probability and the distribution's entropy in bits."""
    top = int(log_probs.argmax())
    entropy_bits = -(log_probs.exp() * log_probs).sum().item() / math.log(2)
    token = repr(model.to_string(top))[:12]
    return f"{token:<13} p={log_probs[top].exp().item():.3f} H={entropy_bits:5.2f} bits"


if __name__ == "__main__":
    main(" ".join(sys.argv[1:]) or DEFAULT_PROMPT)
