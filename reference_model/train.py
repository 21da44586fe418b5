"""Train the small GPT-2-architecture reference model, fully offline and deterministically.

Corpus: the docstrings and comments of the Python standard library source files of the running
interpreter (PSF licence), extracted with ``ast`` and ``tokenize`` from a sorted file list. Every
``HELDOUT_EVERY``-th file is held out for evaluation.

Usage::

    HF_HUB_OFFLINE=1 .venv/bin/python -m reference_model.train --out reference_model/weights
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import io
import json
import math
import re
import sys
import sysconfig
import time
import tokenize
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

EOT = "<|endoftext|>"
SKIP_DIRS = {"site-packages", "test", "tests", "idle_test", "lib2to3", "__pycache__"}
HELDOUT_EVERY = 10
DEFAULT_OUT = Path(__file__).resolve().parent / "weights"

VOCAB_SIZE = 2048
N_CTX = 128
N_LAYER = 4
N_EMBD = 128
N_HEAD = 4

SEED = 0
NUM_THREADS = 2
BATCH_SIZE = 32
STEPS = 560
WARMUP_STEPS = 50
LR = 3e-3
WEIGHT_DECAY = 0.1
EVAL_BATCHES = 40


def stdlib_files() -> list[Path]:
    """Returns the sorted list of stdlib ``.py`` files used as the corpus (tests excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(
        p for p in root.rglob("*.py") if not SKIP_DIRS.intersection(p.relative_to(root).parts)
    )


def _comment_blocks(source: str) -> list[tuple[int, str]]:
    """Groups consecutive comment lines of a source file into (first line, text) blocks."""
    blocks: list[tuple[int, str]] = []
    start, last = 0, -2
    lines: list[str] = []
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return blocks
    for tok in tokens:
        if tok.type != tokenize.COMMENT:
            continue
        text = tok.string.lstrip("#").strip()
        row = tok.start[0]
        if row != last + 1 and lines:
            blocks.append((start, "\n".join(lines)))
            lines = []
        if not lines:
            start = row
        last = row
        # Drop shebangs, coding cookies and ruler lines such as "# -----".
        if text and not text.startswith("!") and re.search(r"[A-Za-z]{2}", text):
            lines.append(text)
    if lines:
        blocks.append((start, "\n".join(lines)))
    return [b for b in blocks if b[1]]


def extract_text(path: Path) -> str:
    """Returns the docstrings and comment blocks of one source file, in source order."""
    source = path.read_text(encoding="utf-8", errors="replace")
    pieces = _comment_blocks(source)
    try:
        tree = ast.parse(source)
    except SyntaxError:
        tree = None
    if tree is not None:
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and node.body:
                    pieces.append((node.body[0].lineno, doc.strip()))
    return "\n\n".join(text for _, text in sorted(pieces))


def build_corpus() -> tuple[list[str], list[str]]:
    """Returns (train documents, held-out documents), one document per non-empty file."""
    train: list[str] = []
    heldout: list[str] = []
    for i, path in enumerate(stdlib_files()):
        text = extract_text(path)
        if text:
            (heldout if i % HELDOUT_EVERY == 0 else train).append(text)
    return train, heldout


def train_tokenizer(docs: list[str]) -> GPT2TokenizerFast:
    """Trains a GPT-2-style byte-level BPE tokenizer with ``<|endoftext|>`` as bos/eos/unk."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    return GPT2TokenizerFast(
        tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=EOT, model_max_length=N_CTX
    )


def encode_stream(tokenizer: GPT2TokenizerFast, docs: list[str]) -> torch.Tensor:
    """Encodes documents into one token stream, each document followed by ``<|endoftext|>``."""
    ids: list[int] = []
    for encoding in tokenizer.backend_tokenizer.encode_batch(docs):
        ids.extend(encoding.ids)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def make_batch(stream: torch.Tensor, starts: torch.Tensor, bos_id: int) -> torch.Tensor:
    """Returns windows ``[bos] + stream[s : s + N_CTX - 1]`` for each start ``s``."""
    offsets = torch.arange(N_CTX - 1)
    body = stream[starts[:, None] + offsets[None, :]]
    bos = torch.full((len(starts), 1), bos_id, dtype=torch.long)
    return torch.cat([bos, body], dim=1)


@torch.no_grad()
def heldout_loss(model: GPT2LMHeadModel, stream: torch.Tensor, bos_id: int) -> float:
    """Mean next-token loss over fixed, non-overlapping held-out windows."""
    model.eval()
    n_windows = min((len(stream) - 1) // (N_CTX - 1), EVAL_BATCHES * BATCH_SIZE)
    starts = torch.arange(n_windows) * (N_CTX - 1)
    losses = []
    for chunk in starts.split(BATCH_SIZE):
        batch = make_batch(stream, chunk, bos_id)
        losses.append(model(batch, labels=batch).loss.item() * len(chunk))
    model.train()
    return sum(losses) / n_windows


def lr_at(step: int) -> float:
    """Linear warmup then cosine decay to 10% of the peak learning rate."""
    if step < WARMUP_STEPS:
        return LR * (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, STEPS - WARMUP_STEPS)
    return LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def main(argv: list[str] | None = None) -> None:
    """Builds corpus and tokenizer, trains the model, and writes config, weights and tokenizer."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    parser.add_argument("--steps", type=int, default=STEPS, help="optimizer steps")
    args = parser.parse_args(argv)
    t0 = time.time()
    torch.manual_seed(SEED)
    torch.set_num_threads(NUM_THREADS)
    torch.use_deterministic_algorithms(True)

    train_docs, heldout_docs = build_corpus()
    digest = hashlib.sha256("\x00".join(train_docs + heldout_docs).encode()).hexdigest()
    n_chars = sum(map(len, train_docs + heldout_docs))
    print(
        f"python {sys.version.split()[0]}: {len(train_docs)} train / {len(heldout_docs)} "
        f"held-out files, {n_chars} chars, sha256 {digest[:16]}"
    )
    tokenizer = train_tokenizer(train_docs)
    train_stream = encode_stream(tokenizer, train_docs)
    heldout_stream = encode_stream(tokenizer, heldout_docs)
    bos_id = tokenizer.bos_token_id
    print(
        f"vocab {len(tokenizer)}, {len(train_stream)} train / {len(heldout_stream)} held-out "
        f"tokens ({time.time() - t0:.0f}s)"
    )

    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=N_CTX,
        n_ctx=N_CTX,
        n_embd=N_EMBD,
        n_layer=N_LAYER,
        n_head=N_HEAD,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=bos_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    model = GPT2LMHeadModel(config)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0}],
        lr=LR,
        betas=(0.9, 0.95),
    )
    generator = torch.Generator().manual_seed(SEED)
    max_start = len(train_stream) - N_CTX
    print(f"{sum(p.numel() for p in model.parameters())} parameters; training {args.steps} steps")
    t_train = time.time()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        starts = torch.randint(0, max_start, (BATCH_SIZE,), generator=generator)
        batch = make_batch(train_stream, starts, bos_id)
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.3f}  ({time.time() - t_train:.0f}s)")
    train_seconds = time.time() - t_train
    final_loss = heldout_loss(model, heldout_stream, bos_id)
    print(f"held-out loss (float32): {final_loss:.3f} nats/token; trained in {train_seconds:.0f}s")

    args.out.mkdir(parents=True, exist_ok=True)
    model.half().save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out, legacy_format=False)
    info = {
        "python": sys.version.split()[0],
        "corpus_sha256": digest,
        "train_tokens": len(train_stream),
        "heldout_tokens": len(heldout_stream),
        "steps": args.steps,
        "heldout_loss_float32": round(final_loss, 4),
        "heldout_loss_float16_weights": round(
            heldout_loss(model.float(), heldout_stream, bos_id), 4
        ),
    }
    (args.out / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))
    print(f"total time {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
