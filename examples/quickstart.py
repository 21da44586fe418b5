"""A short logit lens on the shipped reference model, offline: fresh normalization against the
cached final scale, at the last position of one prompt. Entropy is in nats, the unit of the
logit-lens tool (``transformer_lens.tools.analysis.logit_lens``).

Run with ``.venv/bin/python examples/quickstart.py`` (``make example``).
"""

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from reference_model.load import load_bridge  # noqa: E402

PROMPT = "Return the list of"


def main() -> None:
    torch.set_grad_enabled(False)
    model = load_bridge(compatibility_mode=True)
    _, cache = model.run_with_cache(PROMPT)
    max_nats = math.log(model.cfg.d_vocab)
    print(f"prompt {PROMPT!r}, last position; maximum entropy {max_nats:.2f} nats")
    print("layer      | fresh: top-1, p, entropy      | cached scale: top-1, p, entropy")
    rows = []
    for recompute_ln in (True, False):
        stack, labels = cache.accumulated_resid(
            apply_ln=True, recompute_ln=recompute_ln, pos_slice=-1, return_labels=True
        )
        # The adapter's output transform is the identity on GPT-2; it is part of the recipe.
        logits = model.adapter.apply_output_logits_transform(stack[:, 0] @ model.W_U + model.b_U)
        log_probs = logits.log_softmax(-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        top_p, top_id = log_probs.exp().max(-1)
        rows.append([(model.tokenizer.decode(i), p, h) for i, p, h in zip(top_id, top_p, entropy)])
    for label, fresh, cached in zip(labels, *rows):
        print(
            f"{label:10} | {fresh[0]!r:>10} {fresh[1]:.3f} {fresh[2]:5.2f} nats"
            f"    | {cached[0]!r:>10} {cached[1]:.3f} {cached[2]:5.2f} nats"
        )


if __name__ == "__main__":
    main()
