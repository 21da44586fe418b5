"""Logit lens demo: fresh normalization against the cached final scale, layer by layer.

For one prompt, reads every layer of the residual stream through the final norm and the
unembedding in two ways and compares them:

* **fresh** (``recompute_ln=True``): each layer is normalized with its own mean and scale, the
  logit lens as published (nostalgebraist, 2020; Belrose et al., 2023).
* **cached** (``recompute_ln=False``): each layer is divided by the scale cached for the final
  residual stream, direct logit attribution's convention and the old default of
  ``cache.accumulated_resid(apply_ln=True)``. For a logit lens it acts as a softmax temperature
  that flattens the early layers, whose residual stream is much smaller than the final one.

Per layer it prints the top tokens and their probabilities at the last position, the entropy and
the KL divergence ``KL(p_final || p_layer)`` to the final layer (at the last position and averaged
over positions), and saves three figures: entropy per layer, KL per layer, and a heatmap of the
top-1 probability by layer and position. The statistics come from
:meth:`~transformer_lens.ActivationCache.ActivationCache.logit_lens_stats`.

Usage (from the repository root)::

    .venv/bin/python demos/logit_lens_demo.py                  # the shipped reference model
    .venv/bin/python demos/logit_lens_demo.py --model gpt2     # weights from the local HF cache
    .venv/bin/python demos/logit_lens_demo.py --prompt "..." --out-dir /tmp/figures

It runs offline: the reference model ships with this repository (``reference_model/``), and
``gpt2`` and ``pythia-70m`` are only read from the local Hugging Face cache. The functions are
small so that the notebook ``demos/Logit_Lens.ipynb`` can import them.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

# Never reach the network: the demo must run the same on machines without it.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import matplotlib  # noqa: E402
import torch  # noqa: E402
from huggingface_hub import try_to_load_from_cache  # noqa: E402
from jaxtyping import Float, Int  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from transformer_lens import HookedTransformer  # noqa: E402
from transformer_lens.loading_from_pretrained import get_official_model_name  # noqa: E402

DEMOS_DIR = Path(__file__).resolve().parent
REPO_ROOT = DEMOS_DIR.parent
DEFAULT_OUT_DIR = REPO_ROOT / "docs" / "source" / "_static" / "logit_lens"
# A docstring sentence, the domain the reference model was trained on (Python stdlib docstrings).
# The reference model ends it confidently: '\n' with probability 0.88 at the last position.
DEFAULT_PROMPT = "Return the value of the named attribute of the object."
MODELS = ("reference", "gpt2", "pythia-70m")
REFERENCE_DESCRIPTION = "reference model (4-layer GPT-2 trained on Python stdlib docstrings)"
# Convention name -> recompute_ln.
CONVENTIONS = {"fresh": True, "cached": False}
CONVENTION_TITLES = {
    "fresh": "fresh normalization (recompute_ln=True)",
    "cached": "cached final scale (recompute_ln=False)",
}
# Files a Hugging Face checkpoint of the supported models holds its weights in.
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
FIGURE_NAMES = ("entropy_per_layer", "kl_to_final_per_layer", "top1_probability_heatmap")
DPI = 100
# PNG metadata would otherwise carry the matplotlib version and make the files differ by machine.
PNG_METADATA: Dict[str, Optional[str]] = {"Software": None}


class WeightsNotCachedError(RuntimeError):
    """Raised when pretrained weights are not in the local Hugging Face cache."""


@dataclass
class LensResult:
    """What the logit lens reads at each layer, for one prompt, in one convention.

    Positions start after the bos token: bos is an attention sink with an atypical residual
    stream, and its "prediction" is not part of the prompt.

    Attributes:
        convention: ``"fresh"`` or ``"cached"`` (see :data:`CONVENTIONS`).
        labels: Layer labels from ``accumulated_resid`` (``"0_pre"``, ..., ``"final_post"``).
        entropy_bits: Entropy of each layer's distribution, in bits.
        kl_bits: ``KL(p_final || p_layer)`` in bits; ``p_final`` is the last layer read in the
            same convention.
        top_tokens: The most probable tokens, most probable first.
        top_probs: Their probabilities.
    """

    convention: str
    labels: List[str]
    entropy_bits: Float[torch.Tensor, "layers pos"]
    kl_bits: Float[torch.Tensor, "layers pos"]
    top_tokens: Int[torch.Tensor, "layers pos k"]
    top_probs: Float[torch.Tensor, "layers pos k"]


def weights_are_cached(name: str) -> bool:
    """Whether the config and weights of a TransformerLens model name are in the local HF cache.

    Checked up front because transformers, offline, fails on missing weights with an unrelated
    ``AttributeError`` rather than saying that they are missing.
    """
    repo_id = get_official_model_name(name)

    def cached(filename: str) -> bool:
        return isinstance(try_to_load_from_cache(repo_id, filename), str)

    return cached("config.json") and any(cached(filename) for filename in WEIGHT_FILES)


def missing_weights_message(name: str) -> str:
    """What to tell the user when the weights of ``name`` are not in the local cache."""
    return (
        f"The weights of {name!r} are not in the local Hugging Face cache, and this demo never "
        "downloads. To get them, run once on a machine with network access:\n"
        f'    python -c "from transformer_lens import HookedTransformer; '
        f"HookedTransformer.from_pretrained('{name}')\"\n"
        "or run the demo with the shipped model: --model reference"
    )


def load_model(name: str) -> HookedTransformer:
    """Loads a model for the demo, offline.

    Args:
        name: ``"reference"`` for the small model shipped in ``reference_model/`` (loaded with
            ``fold_ln=True``), or ``"gpt2"`` / ``"pythia-70m"``, read from the local Hugging Face
            cache with ``HookedTransformer.from_pretrained`` and its default weight processing.

    Returns:
        The model in eval mode, on CPU.

    Raises:
        WeightsNotCachedError: If pretrained weights are not in the local cache.
    """
    if name == "reference":
        if str(REPO_ROOT) not in sys.path:  # reference_model/ is a folder of the repository
            sys.path.insert(0, str(REPO_ROOT))
        from reference_model.load import load_hooked_model

        return load_hooked_model(fold_ln=True)
    if not weights_are_cached(name):
        raise WeightsNotCachedError(missing_weights_message(name))
    try:
        model = HookedTransformer.from_pretrained(name, device="cpu")
    except OSError as error:  # a partial cache: the config is there, weights or tokenizer not
        raise WeightsNotCachedError(f"{missing_weights_message(name)}\n({error})") from error
    return model.eval()


def model_description(name: str) -> str:
    """The model's name as figure titles and the table show it."""
    return REFERENCE_DESCRIPTION if name == "reference" else name


def prompt_tokens(model: HookedTransformer, prompt: str) -> Int[torch.Tensor, "1 pos"]:
    """Tokenizes ``prompt`` with a bos token in front, as the models were trained."""
    return model.to_tokens(prompt, prepend_bos=True)


def display_token(model: HookedTransformer, token: int) -> str:
    """A token as readable text: quoted, with newlines and tabs escaped (``' the'``, ``'\\n'``)."""
    return repr(model.to_string(torch.tensor([token])))


@torch.no_grad()
def run_logit_lens(
    model: HookedTransformer,
    tokens: Int[torch.Tensor, "1 pos"],
    top_k: int = 3,
    incl_mid: bool = False,
) -> Dict[str, LensResult]:
    """Runs the model once and reads every layer with the logit lens in both conventions.

    Args:
        model: The model.
        tokens: One sequence starting with bos.
        top_k: How many top tokens to keep per layer and position.
        incl_mid: Also read the residual stream between attention and MLP of each block.

    Returns:
        A :class:`LensResult` per convention, keyed ``"fresh"`` and ``"cached"``.
    """
    _, cache = model.run_with_cache(tokens)
    results = {}
    for convention, recompute_ln in CONVENTIONS.items():
        stats = cache.logit_lens_stats(top_k=top_k, incl_mid=incl_mid, recompute_ln=recompute_ln)
        assert stats.top_k_tokens is not None and stats.top_k_probs is not None
        after_bos = slice(1, None)
        results[convention] = LensResult(
            convention=convention,
            labels=stats.labels,
            entropy_bits=stats.entropy_bits[:, 0, after_bos],
            kl_bits=stats.kl_to_final[:, 0, after_bos] / math.log(2),
            top_tokens=stats.top_k_tokens[:, 0, after_bos],
            top_probs=stats.top_k_probs[:, 0, after_bos],
        )
    return results


def format_table(
    model: HookedTransformer,
    results: Dict[str, LensResult],
    tokens: Int[torch.Tensor, "1 pos"],
    description: str,
) -> str:
    """The per-layer table: top tokens, entropy and KL to the final layer, for each convention.

    "last" columns are at the last position of the prompt, "mean" columns averaged over its
    positions (bos excluded). Entropy and KL are in bits.
    """
    last_token = display_token(model, int(tokens[0, -1]))
    n_positions = tokens.shape[1] - 1
    lines = [
        f"Logit lens of the {description}",
        f"prompt: {model.to_string(tokens[0, 1:])!r} ({n_positions} tokens after bos)",
        f"entropy and KL in bits; 'last' = last position (input {last_token}), "
        f"'mean' = mean over the {n_positions} positions; "
        f"maximum entropy log2(d_vocab) = {math.log2(model.cfg.d_vocab):.2f} bits",
    ]
    header = (
        f"{'layer':<12} {'top tokens at the last position':<46} "
        f"{'H last':>7} {'H mean':>7} {'KL last':>8} {'KL mean':>8}"
    )
    for convention, result in results.items():
        lines += ["", CONVENTION_TITLES[convention], header, "-" * len(header)]
        for layer, label in enumerate(result.labels):
            top = ", ".join(
                f"{display_token(model, int(token))} {float(prob):.2f}"
                for token, prob in zip(result.top_tokens[layer, -1], result.top_probs[layer, -1])
            )
            lines.append(
                f"{label:<12} {top:<46} "
                f"{result.entropy_bits[layer, -1]:>7.2f} {result.entropy_bits[layer].mean():>7.2f} "
                f"{result.kl_bits[layer, -1]:>8.2f} {result.kl_bits[layer].mean():>8.2f}"
            )
    return "\n".join(lines)


def plot_per_layer(
    results: Dict[str, LensResult],
    quantity: str,
    ylabel: str,
    title: str,
    max_entropy_bits: Optional[float] = None,
) -> Figure:
    """Line plot of a per-layer statistic averaged over positions, one line per convention.

    Args:
        results: Output of :func:`run_logit_lens`.
        quantity: ``"entropy_bits"`` or ``"kl_bits"`` (a field of :class:`LensResult`).
        ylabel: Label of the y axis.
        title: Figure title.
        max_entropy_bits: If given, draws the maximum entropy ``log2(d_vocab)`` as a dashed line.
    """
    figure = Figure(figsize=(6.4, 4.6), dpi=DPI, layout="constrained")
    axes = figure.subplots()
    for convention, result in results.items():
        values = getattr(result, quantity).mean(dim=-1)
        axes.plot(
            range(len(values)), values.tolist(), marker="o", label=CONVENTION_TITLES[convention]
        )
    if max_entropy_bits is not None:
        axes.axhline(
            max_entropy_bits,
            color="grey",
            linestyle="--",
            label=f"maximum, uniform: {max_entropy_bits:.2f}",
        )
    labels = next(iter(results.values())).labels
    axes.set_xticks(range(len(labels)), labels)
    axes.set_xlabel("layer (residual stream read by the lens)")
    axes.set_ylabel(ylabel)
    axes.set_ylim(bottom=0)
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    # Below the axes, so that it covers neither the curves nor the maximum-entropy line.
    axes.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2)
    return figure


def plot_entropy(results: Dict[str, LensResult], d_vocab: int, description: str) -> Figure:
    """Entropy per layer, mean over positions, both conventions and the maximum entropy."""
    return plot_per_layer(
        results,
        "entropy_bits",
        "entropy (bits), mean over positions",
        f"Logit lens entropy per layer\n{description}",
        max_entropy_bits=math.log2(d_vocab),
    )


def plot_kl(results: Dict[str, LensResult], description: str) -> Figure:
    """KL divergence to the final layer per layer, mean over positions, both conventions."""
    return plot_per_layer(
        results,
        "kl_bits",
        "KL(p_final || p_layer) (bits), mean over positions",
        f"Logit lens KL divergence to the final layer\n{description}",
    )


def plot_top1_heatmap(
    model: HookedTransformer,
    results: Dict[str, LensResult],
    tokens: Int[torch.Tensor, "1 pos"],
    description: str,
) -> Figure:
    """Top-1 probability by layer and position, fresh and cached side by side.

    Each cell is annotated with the top-1 token; the x tick labels are the input tokens.
    """
    input_labels = [display_token(model, int(token)) for token in tokens[0, 1:]]
    n_layers, n_positions = next(iter(results.values())).entropy_bits.shape
    width = max(8.0, 1.3 * n_positions)
    figure = Figure(figsize=(width, 1.6 + 0.55 * n_layers + 0.9), dpi=DPI, layout="constrained")
    all_axes = figure.subplots(1, len(results), sharey=True)
    image = None
    for axes, (convention, result) in zip(all_axes, results.items()):
        top1_probs = result.top_probs[..., 0]
        image = axes.imshow(top1_probs, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        for layer in range(n_layers):
            for pos in range(n_positions):
                prob = float(top1_probs[layer, pos])
                axes.text(
                    pos,
                    layer,
                    display_token(model, int(result.top_tokens[layer, pos, 0]))[1:-1],
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="black" if prob > 0.6 else "white",
                )
        axes.set_xticks(range(n_positions), input_labels, rotation=90, fontsize=7)
        axes.set_yticks(range(n_layers), result.labels, fontsize=8)
        axes.set_xlabel("input token")
        axes.set_title(CONVENTION_TITLES[convention], fontsize=10)
    all_axes[0].set_ylabel("layer")
    assert image is not None
    figure.colorbar(image, ax=list(all_axes), label="top-1 probability", shrink=0.9)
    figure.suptitle(
        f"Logit lens top-1 token and probability by layer and position\n{description}",
        fontsize=10,
    )
    return figure


def save_figures(
    model: HookedTransformer,
    results: Dict[str, LensResult],
    tokens: Int[torch.Tensor, "1 pos"],
    description: str,
    out_dir: Path,
) -> List[Path]:
    """Draws the three figures and saves them as PNGs in ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = (
        plot_entropy(results, model.cfg.d_vocab, description),
        plot_kl(results, description),
        plot_top1_heatmap(model, results, tokens, description),
    )
    paths = []
    for name, figure in zip(FIGURE_NAMES, figures):
        path = out_dir / f"{name}.png"
        figure.savefig(path, dpi=DPI, metadata=PNG_METADATA)
        paths.append(path)
    return paths


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODELS, default="reference", help="default: reference")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="default: %(default)r")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="for the PNGs")
    parser.add_argument("--top-k", type=int, default=3, help="top tokens shown per layer")
    parser.add_argument(
        "--incl-mid", action="store_true", help="also read between attention and MLP"
    )
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Prints the table and saves the figures; returns the exit code (2: weights not cached)."""
    args = parse_args(argv)
    matplotlib.use("Agg")
    torch.manual_seed(0)
    try:
        model = load_model(args.model)
    except WeightsNotCachedError as error:
        print(error, file=sys.stderr)
        return 2
    description = model_description(args.model)
    tokens = prompt_tokens(model, args.prompt)
    results = run_logit_lens(model, tokens, top_k=args.top_k, incl_mid=args.incl_mid)
    print(format_table(model, results, tokens, description))
    print()
    for path in save_figures(model, results, tokens, description, args.out_dir):
        print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
