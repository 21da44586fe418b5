"""Logit lens with fresh normalization against the cached final scale, layer by layer.

Reads every layer of the residual stream through the final norm and the unembedding in the two
conventions of ``ActivationCache.accumulated_resid`` and compares them:

* ``fresh`` (``recompute_ln=True``): each layer is normalized with statistics of its own, as the
  final norm would normalize it if the model stopped there. This is the logit lens.
* ``cached`` (``recompute_ln=False``): each layer is divided by the scale the final norm cached
  on the forward pass. This is the convention of direct logit attribution; read as a lens, it
  acts as a softmax temperature ``T = cached scale / own scale`` on each layer.

Per layer it reports the entropy of the lens distribution, its KL divergence from the final
layer's distribution and the temperature, averaged over the positions of each sequence (a window
of the text file, or a prompt) and then summarized over the sequences (mean and 10th-90th
percentile), and writes three SVG figures and a CSV table to ``--out-dir``; every label says
which sequences the data are from. Entropy and KL are in nats (natural logarithms), the unit of
the logit-lens tool ``transformer_lens.tools.analysis.logit_lens``. The figures need matplotlib;
the script checks for it before doing any work.

Repository-only (not part of the pull requests). Examples, from the repository root::

    .venv/bin/python examples/logit_lens_demo.py                # the shipped reference model
    .venv/bin/python examples/logit_lens_demo.py --prompt "Return the number of"
    .venv/bin/python examples/logit_lens_demo.py --model openai-community/gpt2 \\
        --text-file held_out.txt --windows 256 --window-len 64 --out-dir lens_figures

``--model`` takes a local directory in Hugging Face format (default: the reference model shipped
in ``reference_model/weights``, which needs no network) or a Hugging Face model name. The script
sets no environment variable; to run offline, set ``HF_HUB_OFFLINE=1`` yourself and pass a local
directory (or a model already in the Hugging Face cache). Missing matplotlib, a model that
cannot be loaded, a device that is not there and bad arguments each give a one-line ``error:`` and
exit status 2;
nothing is written, and no output folder is created, before the model has loaded. ``--help``
imports neither torch nor transformers.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import math
import os
import sys
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence

# torch (and transformers, through transformer_lens) are imported where they are used, so that
# `--help` and argument errors answer at once.
if TYPE_CHECKING:
    import torch

CONVENTIONS = {"fresh": True, "cached": False}  # convention -> recompute_ln
CONVENTION_LABELS = {
    "fresh": "fresh normalization (recompute_ln=True)",
    "cached": "cached final scale (recompute_ln=False)",
}
COLORS = {"fresh": "#1f77b4", "cached": "#d62728"}
FIGURES = ("entropy_per_layer", "kl_to_final_per_layer", "temperature_per_layer")
# The 4-layer GPT-2 this repository ships (reference_model/README.md): loads offline.
DEFAULT_MODEL = str(Path(__file__).resolve().parent.parent / "reference_model" / "weights")
DEFAULT_MODEL_LABEL = "reference model (4-layer GPT-2 trained on Python stdlib docstrings)"
DEFAULT_PROMPT = "Return the list of"
DEFAULT_OUT_DIR = "logit_lens_output"


class UsageError(ValueError):
    """A command-line argument that cannot be used; the message says how to fix it."""


class ModelLoadError(UsageError):
    """The model named by ``--model`` could not be loaded; the message says how to run offline."""

    def __init__(self, name: str, reason: str):
        super().__init__(
            f"could not load the model {name!r} ({reason}); to run offline, pass --model DIR, a "
            "local folder with a model in Hugging Face format (config.json, weights, tokenizer), "
            "and set HF_HUB_OFFLINE=1"
        )


def one_line(error: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message``, shortened to ``limit`` characters."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0].strip()}" if lines else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class LayerStats:
    """Per-window statistics of one convention: every tensor is ``[windows, layers]``.

    Each value is a mean over the window's positions (the bos position left out).
    """

    labels: List[str]
    entropy_nats: torch.Tensor
    kl_nats: torch.Tensor
    temperature: torch.Tensor


def entropy_nats(log_probs: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of distributions given as log-probabilities over the last axis."""
    return -(log_probs.exp() * log_probs).sum(-1)


def kl_nats(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``KL(p || q)`` in nats over the last axis, from log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def lens_logits(model, normalized: torch.Tensor) -> torch.Tensor:
    """Logits of a normalized stack, through the unembedding and the adapter's output transform.

    The transform (Gemma-2's soft cap, Granite's ``logits_scaling``, ...) is the identity on
    models that have none; the cast is for bfloat16 models, whose cached-scale stack is float32.
    """
    unembedded = normalized.to(model.W_U.dtype) @ model.W_U + model.b_U
    return model.adapter.apply_output_logits_transform(unembedded)


def lens_statistics(model, tokens: torch.Tensor, skip_first: int = 1) -> Dict[str, LayerStats]:
    """Entropy, KL to the final layer and temperature per layer, for a ``[batch, pos]`` batch.

    Args:
        model: A ``TransformerBridge`` whose final norm is folded (compatibility mode), so that
            both conventions give the model's logits at the last layer.
        tokens: Token ids, ``[batch, pos]``.
        skip_first: Positions left out at the start of each row (the bos token).

    Returns:
        One :class:`LayerStats` per convention.
    """
    _, cache = model.run_with_cache(tokens)
    out: Dict[str, LayerStats] = {}
    normalized = {}
    for name, recompute in CONVENTIONS.items():
        lens, labels = cache.accumulated_resid(
            apply_ln=True, recompute_ln=recompute, return_labels=True
        )
        normalized[name] = lens[:, :, skip_first:]
    # Both conventions centre the same residual and differ only in the scale they divide by.
    temperature = normalized["fresh"].norm(dim=-1) / normalized["cached"].norm(dim=-1)
    for name, lens in normalized.items():
        log_probs = lens_logits(model, lens).float().log_softmax(-1)  # layer, batch, pos, vocab
        entropy = entropy_nats(log_probs)
        kl = kl_nats(log_probs[-1:], log_probs)
        out[name] = LayerStats(
            labels=labels,
            entropy_nats=entropy.mean(-1).T,
            kl_nats=kl.mean(-1).T,
            temperature=temperature.mean(-1).T,
        )
    return out


def merge(parts: Sequence[Dict[str, LayerStats]]) -> Dict[str, LayerStats]:
    """Concatenates per-batch statistics along the window axis."""
    import torch

    return {
        name: LayerStats(
            labels=parts[0][name].labels,
            entropy_nats=torch.cat([p[name].entropy_nats for p in parts]),
            kl_nats=torch.cat([p[name].kl_nats for p in parts]),
            temperature=torch.cat([p[name].temperature for p in parts]),
        )
        for name in CONVENTIONS
    }


def summarize(values: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Mean and 10th/90th percentiles over windows of a ``[windows, layers]`` tensor."""
    return {
        "mean": values.mean(0),
        "p10": values.quantile(0.1, dim=0),
        "p90": values.quantile(0.9, dim=0),
    }


def top_tokens_table(model, prompt_tokens: torch.Tensor, top_k: int) -> str:
    """The top-k tokens and probabilities at the last position, per layer, in both conventions."""
    _, cache = model.run_with_cache(prompt_tokens)
    lines = []
    for name, recompute in CONVENTIONS.items():
        lens, labels = cache.accumulated_resid(
            apply_ln=True, recompute_ln=recompute, return_labels=True, pos_slice=-1
        )
        probs = lens_logits(model, lens[:, 0]).float().softmax(-1)  # layer, vocab
        top = probs.topk(top_k, dim=-1)
        lines.append(f"top {top_k} at the last position, {CONVENTION_LABELS[name]}:")
        for label, ids, ps in zip(labels, top.indices.tolist(), top.values.tolist()):
            cells = ", ".join(f"{model.tokenizer.decode([i])!r} {p:.3f}" for i, p in zip(ids, ps))
            lines.append(f"  {label:>10}: {cells}")
    return "\n".join(lines)


def tokenize_prompt(model, prompt: str) -> torch.Tensor:
    """Tokens of one prompt with bos, truncated (with a warning) to the model's context."""
    tokens = model.to_tokens(prompt, truncate=False)
    n_ctx = model.cfg.n_ctx
    if tokens.shape[1] > n_ctx:
        warnings.warn(
            f"the prompt is {tokens.shape[1]} tokens long and the model's context is {n_ctx}: "
            f"only its first {n_ctx} tokens are read",
            stacklevel=2,
        )
        tokens = tokens[:, :n_ctx]
    return tokens


def text_windows(model, text: str, windows: int, window_len: int) -> torch.Tensor:
    """Non-overlapping windows of ``window_len`` tokens from a text, each starting with bos."""
    import torch

    ids = model.to_tokens(text, prepend_bos=False, truncate=False)[0]
    body = window_len - 1
    available = len(ids) // body
    if available == 0:
        raise UsageError(
            f"the text file holds {len(ids)} tokens, fewer than one window of {body}: "
            "pass a longer file or a smaller --window-len"
        )
    if available < windows:
        warnings.warn(
            f"the text file holds only {available} windows of {window_len} tokens; "
            f"using {available} instead of --windows {windows}",
            stacklevel=2,
        )
        windows = available
    rows = ids[: windows * body].view(windows, body)
    bos = torch.full((windows, 1), model.tokenizer.bos_token_id, dtype=rows.dtype)
    return torch.cat([bos, rows.to(bos.device)], dim=1)


def mean_label(n: int, unit: str) -> str:
    """What a plotted mean is over: ``n`` sequences of kind ``unit`` ("window" or "prompt")."""
    if n == 1:
        return f"mean over the {unit}'s positions"
    return f"mean over {n} {unit}s"


def layer0_caption(stats: Dict[str, LayerStats]) -> Optional[str]:
    """Why the fresh lens has the larger KL at the first entry, where the data shows it does."""
    label = stats["fresh"].labels[0]
    fresh_kl = float(stats["fresh"].kl_nats[:, 0].mean())
    cached_kl = float(stats["cached"].kl_nats[:, 0].mean())
    temperature = float(stats["fresh"].temperature[:, 0].mean())
    if not (fresh_kl > cached_kl and temperature > 1):
        return None
    return (
        f"At {label} the residual is the embedding alone, far from what the model outputs, so the "
        f"fresh lens is far from the final distribution (mean KL {fresh_kl:.1f} nats). The cached "
        f"scale divides its logits by T (mean {temperature:.1f}), flattening them toward uniform: "
        f"that lowers the KL ({cached_kl:.1f} nats) without reading {label} any better."
    )


def plot(
    stats: Dict[str, LayerStats],
    out_dir: Path,
    title: str,
    source: str,
    unit: str,
    vocab_size: int,
) -> List[Path]:
    """Writes the three figures as SVG files and returns their paths.

    ``unit`` names what each row of the statistics is ("window" or "prompt"): the spreads and
    the means are over those rows.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = stats["fresh"].labels
    x = list(range(len(labels)))
    n_windows = stats["fresh"].entropy_nats.shape[0]
    specs = {
        "entropy_per_layer": ("entropy_nats", "entropy of the lens (nats)", False),
        "kl_to_final_per_layer": ("kl_nats", "KL(final || layer) (nats)", False),
        "temperature_per_layer": ("temperature", "temperature T = cached / own scale", True),
    }
    paths = []
    # Text stays text in the SVG (smaller files, selectable labels); the salt fixes element ids.
    with plt.rc_context({"svg.hashsalt": "logit-lens", "svg.fonttype": "none", "font.size": 11}):
        for name, (field, ylabel, log_y) in specs.items():
            fig, ax = plt.subplots(figsize=(8, 4.5))
            conventions = ["fresh"] if field == "temperature" else list(CONVENTIONS)
            for conv in conventions:
                s = summarize(getattr(stats[conv], field))
                label = (
                    mean_label(n_windows, unit)
                    if field == "temperature"
                    else CONVENTION_LABELS[conv]
                )
                ax.plot(x, s["mean"], marker="o", color=COLORS[conv], label=label)
                if n_windows > 1:
                    ax.fill_between(x, s["p10"], s["p90"], color=COLORS[conv], alpha=0.2)
            if field == "entropy_nats":
                ax.axhline(math.log(vocab_size), color="grey", ls="--", lw=1)
                ax.annotate(
                    f"uniform over {vocab_size:,} tokens",
                    (x[-1], math.log(vocab_size)),
                    xytext=(0, -4),
                    textcoords="offset points",
                    ha="right",
                    va="top",
                    color="grey",
                    fontsize=9,
                )
            if field == "temperature":
                ax.axhline(1.0, color="grey", ls="--", lw=1)
            if log_y:
                ax.set_yscale("log")
            ax.set_xticks(x, labels)
            ax.set_xlabel("residual stream read (accumulated_resid label)")
            ax.set_ylabel(ylabel)
            band = f"; band: 10th-90th percentile over {unit}s" if n_windows > 1 else ""
            ax.set_title(f"{title}\n{source}{band}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=9, loc="lower right" if field == "entropy_nats" else "upper right")
            caption = layer0_caption(stats) if field == "kl_nats" else None
            if caption:
                # Under the axes, so that the figure explains its first point wherever it is shown.
                fig.text(0.01, 0.01, textwrap.fill(caption, 120), fontsize=8, va="bottom")
                fig.tight_layout(rect=(0, 0.1, 1, 1))
            else:
                fig.tight_layout()
            path = out_dir / f"{name}.svg"
            fig.savefig(path, metadata={"Date": None})
            plt.close(fig)
            paths.append(path)
    return paths


def write_csv(stats: Dict[str, LayerStats], path: Path) -> None:
    """One row per convention and layer: mean and 10th/90th percentiles of each statistic."""
    fields = ["entropy_nats", "kl_nats", "temperature"]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        header = ["convention", "layer"]
        header += [f"{field}_{q}" for field in fields for q in ("mean", "p10", "p90")]
        writer.writerow(header + ["sequences"])
        for conv, st in stats.items():
            summaries = {field: summarize(getattr(st, field)) for field in fields}
            for i, label in enumerate(st.labels):
                row: List[object] = [conv, label]
                for field in fields:
                    row += [f"{float(summaries[field][q][i]):.4f}" for q in ("mean", "p10", "p90")]
                writer.writerow(row + [st.entropy_nats.shape[0]])


def format_table(stats: Dict[str, LayerStats], unit: str) -> str:
    """A plain-text table of the per-layer means over the ``unit`` rows ("window", "prompt")."""
    fresh, cached = stats["fresh"], stats["cached"]
    lines = [
        f"{'layer':>10} | {'H fresh':>8} {'H cached':>8} | {'KL fresh':>8} {'KL cached':>9} | "
        f"{'T':>6}   ({mean_label(fresh.entropy_nats.shape[0], unit)}; nats)"
    ]
    for i, label in enumerate(fresh.labels):
        lines.append(
            f"{label:>10} | {fresh.entropy_nats[:, i].mean():8.3f} "
            f"{cached.entropy_nats[:, i].mean():8.3f} | {fresh.kl_nats[:, i].mean():8.3f} "
            f"{cached.kl_nats[:, i].mean():9.3f} | {fresh.temperature[:, i].mean():6.2f}"
        )
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="local directory or Hugging Face model name (default: the shipped reference model)",
    )
    parser.add_argument(
        "--model-label",
        help="name of the model in figure titles (default: the name of --model's folder, or the "
        "Hub name; for the shipped model, 'reference model (...)')",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    source.add_argument("--text-file", type=Path, help="read windows from this UTF-8 text file")
    parser.add_argument("--windows", type=int, default=128, help="windows to read from the file")
    parser.add_argument("--window-len", type=int, default=64, help="tokens per window, with bos")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=5, help="tokens shown per layer for a prompt")
    parser.add_argument("--out-dir", type=Path, default=Path(DEFAULT_OUT_DIR))
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.prompt is None and args.text_file is None:
        args.prompt = [DEFAULT_PROMPT]
    return args


def validate_args(args: argparse.Namespace) -> None:
    """Checks what can be checked before loading the model; raises UsageError."""
    for prompt in args.prompt or []:
        if not prompt.strip():
            raise UsageError("--prompt is empty: pass some text, e.g. --prompt 'The capital of'")
    if args.text_file is not None and not args.text_file.is_file():
        raise UsageError(f"--text-file {args.text_file} is not a file")
    if args.top_k < 1:
        raise UsageError(f"--top-k must be at least 1, got {args.top_k}")
    if args.windows < 1:
        raise UsageError(f"--windows must be at least 1, got {args.windows}")
    if args.window_len < 2:
        raise UsageError(
            f"--window-len must be at least 2 (bos and one token), got {args.window_len}"
        )
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    out = args.out_dir
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out-dir {out} exists and is not a folder: pick another path")
    # The folder is created only once the model has loaded (prepare_out_dir); here, only check
    # that the nearest existing folder above it could hold it.
    parent = out.absolute()
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out-dir {out} cannot be created in {parent}: pick another folder")


def require_matplotlib() -> None:
    """Refuses to start without matplotlib, which draws the figures; raises UsageError.

    Checked before any work, so that a run does not print its tables and then fail.
    """
    try:
        found = importlib.util.find_spec("matplotlib") is not None
    except ValueError:  # in sys.modules without a spec: treat as absent
        found = False
    if not found:
        raise UsageError(
            f"matplotlib is not installed, and the script draws its figures with it: install it "
            f"with `{sys.executable} -m pip install matplotlib` (this repository's `make setup` "
            "installs it into .venv)"
        )


def check_device(name: str) -> None:
    """Refuses a device torch does not know or cannot see, before the model is loaded."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(
            f"--device {name!r} is not a torch device: pass e.g. cpu or cuda"
        ) from None
    with warnings.catch_warnings():  # a driver warning would make the error two lines
        warnings.simplefilter("ignore")
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise UsageError(
                    f"--device {name} was asked for, but this torch ({torch.__version__}) sees no "
                    "CUDA device: pass --device cpu, or install a CUDA build of torch"
                )
            count = torch.cuda.device_count()
            if device.index is not None and device.index >= count:
                raise UsageError(
                    f"--device {name} was asked for, but torch sees {count} CUDA device(s): "
                    f"pass --device cuda:0 to cuda:{count - 1}, or --device cpu"
                )
        elif device.type == "mps" and not torch.backends.mps.is_available():
            raise UsageError(f"--device {name} was asked for, but MPS is not available here")


def prepare_out_dir(out: Path) -> None:
    """Creates the output folder and checks that it is writable; raises UsageError."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out-dir {out} cannot be created: {e.strerror}") from None
    probe = out / ".write_test"
    try:
        probe.write_text("")
        probe.unlink()
    except OSError:
        raise UsageError(f"--out-dir {out} is not writable: pick another folder") from None


def model_label(name: str) -> str:
    """The model's name for figure titles: never a local absolute path."""
    path = Path(name)
    if path.is_dir():
        if path.resolve() == Path(DEFAULT_MODEL).resolve():
            return DEFAULT_MODEL_LABEL
        return path.resolve().name
    return name


def load_model(name: str, device: str):
    """A bridge in compatibility mode, so that the final norm is folded into the unembedding."""
    from transformer_lens.model_bridge import TransformerBridge

    model = TransformerBridge.boot_transformers(name, device=device).eval()
    model.enable_compatibility_mode(disable_warnings=True)
    return model


def run(args: argparse.Namespace) -> Dict[str, LayerStats]:
    require_matplotlib()
    validate_args(args)
    check_device(args.device)
    import torch

    torch.set_grad_enabled(False)
    try:
        model = load_model(args.model, args.device)
    except Exception as e:  # any failure to load: one line, not a traceback
        raise ModelLoadError(args.model, one_line(e)) from None
    if args.top_k > model.cfg.d_vocab:
        raise UsageError(f"--top-k {args.top_k} exceeds the vocabulary ({model.cfg.d_vocab})")
    if args.window_len > model.cfg.n_ctx:
        raise UsageError(f"--window-len {args.window_len} exceeds the context ({model.cfg.n_ctx})")
    prepare_out_dir(args.out_dir)
    if args.text_file is not None:
        text = args.text_file.read_text(encoding="utf-8")
        tokens = text_windows(model, text, args.windows, args.window_len).to(args.device)
        batches = tokens.split(args.batch_size)
        source = f"{tokens.shape[0]} windows of {tokens.shape[1]} tokens from {args.text_file.name}"
        unit = "window"
    else:
        batches = [tokenize_prompt(model, p) for p in args.prompt]
        for prompt, tokens in zip(args.prompt, batches):
            shown = prompt if len(prompt) <= 80 else prompt[:77] + "..."
            print(f"prompt {shown!r} ({tokens.shape[1]} tokens with bos)")
            print(top_tokens_table(model, tokens, args.top_k))
        source = f"{len(batches)} prompts" if len(batches) > 1 else f"the prompt {shown!r}"
        unit = "prompt"
    stats = merge([lens_statistics(model, b) for b in batches])
    print(format_table(stats, unit))
    title = args.model_label or model_label(args.model)
    paths = plot(stats, args.out_dir, title, source, unit, model.cfg.d_vocab)
    write_csv(stats, args.out_dir / "logit_lens_stats.csv")
    print(f"wrote {', '.join(p.name for p in paths)} and logit_lens_stats.csv to {args.out_dir}")
    return stats


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
