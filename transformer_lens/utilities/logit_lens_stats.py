"""Logit-lens statistics in bounded memory.

The logit lens reads every layer of the accumulated residual stream through the final norm and the
unembedding. Summaries of those distributions (entropy, KL divergence to the model's own output,
the probability and rank of a target token, the top tokens) are what most analyses need, but
computing them naively materializes logits of shape ``[layers, batch, pos, d_vocab]``: 21 GB for
GPT-2 small at a batch of 8 sequences of 1,024 tokens, five times that for a 256k vocabulary.

:func:`compute_logit_lens_stats` streams instead. It walks the vocabulary in chunks (and the
layers in chunks within each), keeps per-row running statistics with an online log-sum-exp, and
never holds more than one chunk of logits, ``[layer_chunk_size, batch * pos, vocab_chunk_size]``
in float32, besides the normalized residual stack (``[layers, batch, pos, d_model]``, which
:meth:`~transformer_lens.ActivationCache.ActivationCache.accumulated_resid` returns anyway).

Conventions of the results (:class:`LogitLensStats`):

* Logits are computed in float32 from the normalized residual, whatever the model's dtype, and
  include ``b_U`` and the output soft cap (``cfg.output_logits_soft_cap``) as the model applies
  them. All reductions run in float32.
* ``entropy`` is in nats; ``entropy_bits`` gives bits.
* ``kl_to_final`` is ``KL(p_final || p_layer)`` in nats, the direction of the tuned-lens paper
  (Belrose et al., 2023): the expected extra surprise of reading the layer instead of the final
  distribution, under the final distribution. ``p_final`` is the lens applied to the last residual
  stream (``final_post``) in the same convention; with ``recompute_ln=True`` that is the model's
  own output distribution.
* ``target_rank`` counts the tokens whose logit is strictly greater than the target's: 0 means
  the target is the top prediction.
"""

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Optional, Tuple, Union

import torch
from jaxtyping import Float, Int

from transformer_lens.utils import Slice, SliceInput

if TYPE_CHECKING:
    from transformer_lens.ActivationCache import ActivationCache

#: Default bound on the logits held at once (elements of a float32 chunk: 256 MiB).
DEFAULT_CHUNK_ELEMENTS = 2**26
#: Smallest vocabulary chunk chosen by default: only with more than 8,192 batch positions does a
#: chunk of one layer exceed ``DEFAULT_CHUNK_ELEMENTS``.
MIN_DEFAULT_VOCAB_CHUNK_SIZE = 8192


@dataclass
class LogitLensStats:
    """Per-layer statistics of the logit lens, as returned by :func:`compute_logit_lens_stats`.

    Every tensor is float32 (or int64 for tokens and ranks) and has the layers of the accumulated
    residual stream first, then the batch and position dimensions of the cache (after
    ``pos_slice``), e.g. ``[layers_covered, batch, pos]``.

    Attributes:
        labels: One label per layer, as
            :meth:`~transformer_lens.ActivationCache.ActivationCache.accumulated_resid` gives them
            (``"0_pre"``, ..., ``"final_post"``).
        entropy: Entropy of each layer's distribution, in nats (see :attr:`entropy_bits`).
        kl_to_final: ``KL(p_final || p_layer)`` in nats, where ``p_final`` is the lens's
            distribution for the final residual stream (the model's output with fresh
            normalization). Zero at ``final_post``.
        target_prob: Probability of the target token, if targets were given.
        target_rank: Number of tokens with a logit strictly greater than the target's (0 = top),
            if targets were given.
        top_k_tokens: The ``k`` most probable tokens, most probable first, if ``top_k`` was given.
        top_k_probs: Their probabilities.
    """

    labels: List[str]
    entropy: Float[torch.Tensor, "layers_covered *batch_and_pos_dims"]
    kl_to_final: Float[torch.Tensor, "layers_covered *batch_and_pos_dims"]
    target_prob: Optional[Float[torch.Tensor, "layers_covered *batch_and_pos_dims"]] = None
    target_rank: Optional[Int[torch.Tensor, "layers_covered *batch_and_pos_dims"]] = None
    top_k_tokens: Optional[Int[torch.Tensor, "layers_covered *batch_and_pos_dims k"]] = None
    top_k_probs: Optional[Float[torch.Tensor, "layers_covered *batch_and_pos_dims k"]] = None

    @property
    def entropy_bits(self) -> Float[torch.Tensor, "layers_covered *batch_and_pos_dims"]:
        """Entropy of each layer's distribution in bits (``entropy / ln 2``)."""
        return self.entropy / math.log(2)


class _RunningLogSumExp:
    """Online log-sum-exp and entropy of rows whose logits arrive in chunks of the vocabulary.

    Keeps, per row, the running maximum ``m``, ``s = sum exp(z - m)`` and
    ``t = sum exp(z - m) * (z - m)``; both sums are rescaled when ``m`` grows, so nothing
    overflows and the entropy ``log s - t / s`` needs no second pass. Methods update the rows
    selected by ``rows`` (a slice of the first dimension).
    """

    def __init__(self, shape: Tuple[int, ...], device: torch.device):
        # A finite floor rather than -inf keeps (old_max - new_max) * 0 at 0 on the first chunk.
        self.max = torch.full(shape, torch.finfo(torch.float32).min, device=device)
        self.sum = torch.zeros(shape, device=device)
        self.weighted_shift = torch.zeros(shape, device=device)

    def update_max(self, chunk_max: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        """Raise the running maximum to ``chunk_max``, rescale the sums, return the rescaling."""
        new_max = torch.maximum(self.max[rows], chunk_max)
        shift = self.max[rows] - new_max
        rescale = shift.exp()
        self.weighted_shift[rows] = rescale * (self.weighted_shift[rows] + shift * self.sum[rows])
        self.sum[rows] *= rescale
        self.max[rows] = new_max
        return rescale

    def add_shifted(self, shifted: torch.Tensor, rows: slice = slice(None)) -> None:
        """Add a chunk of ``z - max`` (overwritten in place) after :meth:`update_max`."""
        weights = shifted.exp_()
        self.sum[rows] += weights.sum(dim=-1)
        # exp(z - m) * (z - m) = xlogy(w, w), computed in place so no second chunk is allocated.
        self.weighted_shift[rows] += torch.special.xlogy(weights, weights, out=weights).sum(dim=-1)

    def add(self, logits: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        """Add a chunk of logits (overwritten in place); return the rescaling of earlier sums."""
        rescale = self.update_max(logits.amax(dim=-1), rows)
        self.add_shifted(logits.sub_(self.max[rows][..., None]), rows)
        return rescale

    @property
    def log_partition(self) -> torch.Tensor:
        return self.max + self.sum.log()

    @property
    def entropy(self) -> torch.Tensor:
        return self.sum.log() - self.weighted_shift / self.sum


def _add_bias_and_soft_cap(
    logits: Float[torch.Tensor, "... vocab"], bias: Float[torch.Tensor, "vocab"], soft_cap: float
) -> Float[torch.Tensor, "... vocab"]:
    """Finish float32 logits in place as the model does: add ``b_U``, then the output soft cap."""
    logits += bias
    if soft_cap > 0.0:
        logits.div_(soft_cap).tanh_().mul_(soft_cap)
    return logits


def _unembed_chunk(
    residual: Float[torch.Tensor, "... d_model"],
    W_U_chunk: Float[torch.Tensor, "d_model vocab_chunk"],
    b_U_chunk: Float[torch.Tensor, "vocab_chunk"],
    soft_cap: float,
) -> Float[torch.Tensor, "... vocab_chunk"]:
    """Float32 logits of one vocabulary chunk, with the bias and the soft cap as the model has."""
    return _add_bias_and_soft_cap(torch.matmul(residual.float(), W_U_chunk), b_U_chunk, soft_cap)


def _target_logits(
    normalized: Float[torch.Tensor, "layers n d_model"],
    targets: Int[torch.Tensor, "n"],
    W_U: Float[torch.Tensor, "d_model d_vocab"],
    b_U: Float[torch.Tensor, "d_vocab"],
    soft_cap: float,
) -> Float[torch.Tensor, "layers n"]:
    """The target token's float32 logit for some layers and every row, without the others."""
    logits = torch.einsum("lnd,nd->ln", normalized, W_U[:, targets].T.float())
    return _add_bias_and_soft_cap(logits, b_U[targets].float(), soft_cap)


def _count_above(
    logits: Float[torch.Tensor, "layers n vocab_chunk"],
    target_logits: Float[torch.Tensor, "layers n"],
    targets: Int[torch.Tensor, "n"],
    vocab_start: int,
) -> Int[torch.Tensor, "layers n"]:
    """Count the logits of a chunk that are strictly greater than the target's.

    The target's own entry is left out: its logit here comes from a matmul, ``target_logits`` from
    a dot product, and a rounding difference must not count the target as above itself.
    """
    # One layer at a time, summed in int32: a bool mask of the whole chunk summed to int64 would
    # allocate twice the chunk's size.
    counts = torch.stack(
        [
            (layer_logits > layer_targets[:, None]).sum(dim=-1, dtype=torch.int32)
            for layer_logits, layer_targets in zip(logits, target_logits)
        ]
    ).long()
    offsets = targets - vocab_start
    in_chunk = (offsets >= 0) & (offsets < logits.shape[-1])
    own_index = offsets.clamp(0, logits.shape[-1] - 1).expand(logits.shape[0], -1)
    own_logits = logits.gather(-1, own_index[..., None])[..., 0]
    return counts - (in_chunk & (own_logits > target_logits)).long()


def _row_dot(
    logits: Float[torch.Tensor, "layers n vocab_chunk"],
    weights: Float[torch.Tensor, "n vocab_chunk"],
) -> Float[torch.Tensor, "layers n"]:
    """``(logits * weights).sum(-1)``, as a batched matrix-vector product: no chunk-sized temp."""
    return torch.einsum("lnv,nv->ln", logits, weights)


def _merge_top_k(
    best_values: Float[torch.Tensor, "layers n k"],
    best_tokens: Int[torch.Tensor, "layers n k"],
    logits: Float[torch.Tensor, "layers n vocab_chunk"],
    vocab_start: int,
) -> Tuple[Float[torch.Tensor, "layers n k"], Int[torch.Tensor, "layers n k"]]:
    """Merge a chunk's largest logits (and their token ids) into the running top k."""
    k = best_values.shape[-1]
    chunk_values, chunk_tokens = logits.topk(min(k, logits.shape[-1]), dim=-1)
    values = torch.cat([best_values, chunk_values], dim=-1)
    tokens = torch.cat([best_tokens, chunk_tokens + vocab_start], dim=-1)
    values, order = values.topk(k, dim=-1)
    return values, tokens.gather(-1, order)


def _normalized_rows(
    cache: "ActivationCache",
    stack: Float[torch.Tensor, "layers_covered *batch_and_pos_dims d_model"],
    rows: slice,
    pos_slice: Slice,
    recompute_ln: bool,
    device: torch.device,
) -> Float[torch.Tensor, "layers n d_model"]:
    """Some rows of the stack through the final norm, flattened to rows of float32 vectors.

    Normalizing a few layers at a time, again for each vocabulary chunk, costs little next to the
    unembedding and keeps a second full stack (and its dtype promotion) out of memory.
    """
    normalized = cache.apply_ln_to_stack(
        stack[rows], None, pos_slice=pos_slice, recompute_ln=recompute_ln
    )
    return normalized.to(device=device, dtype=torch.float32).flatten(1, -2)


def default_chunk_sizes(
    n_layers_covered: int,
    n_rows: int,
    d_vocab: int,
    layer_chunk_size: Optional[int] = None,
    vocab_chunk_size: Optional[int] = None,
) -> Tuple[int, int]:
    """The layer and vocabulary chunk sizes, filling in those not given.

    Defaults keep a chunk of logits within ``DEFAULT_CHUNK_ELEMENTS`` (256 MiB of float32) and as
    large as that allows, since fewer chunks mean fewer passes: the vocabulary chunk spans all
    layers' rows in the budget (at least ``MIN_DEFAULT_VOCAB_CHUNK_SIZE`` entries), then the layer
    chunk takes as many layers as still fit (at least one).

    Args:
        n_layers_covered: Layers of the accumulated residual stream.
        n_rows: Batch elements times positions.
        d_vocab: Size of the vocabulary.
        layer_chunk_size: A layer chunk size to keep, or None.
        vocab_chunk_size: A vocabulary chunk size to keep, or None.

    Returns:
        ``(layer_chunk_size, vocab_chunk_size)``, each at least 1 and at most the dimension.

    Examples:
        >>> default_chunk_sizes(13, 8 * 1024, 50257)  # GPT-2 small, 8 x 1,024 tokens
        (1, 8192)
        >>> default_chunk_sizes(13, 20, 50257)  # one short prompt: a single chunk
        (13, 50257)
    """
    rows_per_layer_chunk = n_rows * (layer_chunk_size or n_layers_covered)
    if vocab_chunk_size is None:
        by_budget = DEFAULT_CHUNK_ELEMENTS // max(1, rows_per_layer_chunk)
        vocab_chunk_size = max(MIN_DEFAULT_VOCAB_CHUNK_SIZE, by_budget)
    vocab_chunk_size = min(vocab_chunk_size, d_vocab)
    if layer_chunk_size is None:
        layer_chunk_size = DEFAULT_CHUNK_ELEMENTS // max(1, n_rows * vocab_chunk_size)
    return max(1, min(layer_chunk_size, n_layers_covered)), vocab_chunk_size


def _check_arguments(
    d_vocab: int,
    batch_and_pos_shape: torch.Size,
    target_tokens: Optional[torch.Tensor],
    top_k: Optional[int],
    layer_chunk_size: Optional[int],
    vocab_chunk_size: Optional[int],
) -> None:
    if top_k is not None and not 1 <= top_k <= d_vocab:
        raise ValueError(f"top_k={top_k} must be in [1, d_vocab={d_vocab}], or None.")
    if layer_chunk_size is not None and layer_chunk_size < 1:
        raise ValueError(f"layer_chunk_size={layer_chunk_size} must be at least 1, or None.")
    if vocab_chunk_size is not None and vocab_chunk_size < 1:
        raise ValueError(f"vocab_chunk_size={vocab_chunk_size} must be at least 1, or None.")
    if target_tokens is None:
        return
    if target_tokens.is_floating_point() or target_tokens.is_complex():
        raise ValueError(
            f"target_tokens must hold token ids (integers), not {target_tokens.dtype}."
        )
    try:
        torch.broadcast_shapes(target_tokens.shape, batch_and_pos_shape)
    except RuntimeError:
        raise ValueError(
            f"target_tokens of shape {tuple(target_tokens.shape)} do not broadcast to the cache's "
            f"batch and position dimensions {tuple(batch_and_pos_shape)} (after pos_slice): "
            "give one target per batch element and position, or a shape that broadcasts."
        ) from None
    if target_tokens.numel() and not (0 <= target_tokens.min() and target_tokens.max() < d_vocab):
        raise ValueError(f"target_tokens must be token ids in [0, d_vocab={d_vocab}).")


@torch.no_grad()
def compute_logit_lens_stats(
    cache: "ActivationCache",
    target_tokens: Optional[Int[torch.Tensor, "..."]] = None,
    top_k: Optional[int] = None,
    layer: Optional[int] = None,
    incl_mid: bool = False,
    pos_slice: Optional[Union[Slice, SliceInput]] = None,
    recompute_ln: bool = True,
    layer_chunk_size: Optional[int] = None,
    vocab_chunk_size: Optional[int] = None,
) -> LogitLensStats:
    """Compute logit-lens statistics of every layer without materializing all the logits.

    Reads each layer of ``cache.accumulated_resid(layer, incl_mid, pos_slice=pos_slice)`` through
    ``ln_final`` and the unembedding, and returns per layer, batch element and position the
    entropy, the KL divergence to the final layer and optionally the target token's probability
    and rank and the top-k tokens. The results equal those of the full computation
    (``log_softmax`` of ``[layers, batch, pos, d_vocab]`` float32 logits) to float rounding, but
    memory beyond the residual stack is bounded by one chunk of logits,
    ``[layer_chunk_size, batch * pos, vocab_chunk_size]`` float32. See the module docstring for
    the conventions.

    Args:
        cache: The activation cache of a model with an unembedding.
        target_tokens: Token ids whose probability and rank to report, broadcastable to the
            cache's batch and position dimensions after ``pos_slice`` (e.g. ``[batch, pos]``, or
            a single id for all positions). None skips ``target_prob`` and ``target_rank``.
        top_k: Also return the ``top_k`` most probable tokens and their probabilities.
        layer: Passed to ``accumulated_resid``: the residual streams up to the input of this
            layer; None (the default) includes ``final_post``. Every row is read out through
            ``ln_final`` and the unembedding.
        incl_mid: Passed to ``accumulated_resid``: include ``resid_mid`` of each layer.
        pos_slice: Passed to ``accumulated_resid``: the positions to keep.
        recompute_ln: Normalize each layer with statistics of its own (the logit lens, the
            default), or with the scale cached for the final residual (direct logit attribution's
            convention, for comparison). See ``accumulated_resid``.
        layer_chunk_size: Layers unembedded at once. None (the default) and
            ``vocab_chunk_size=None`` pick the largest chunks within ``DEFAULT_CHUNK_ELEMENTS``
            (2**26 float32, 256 MiB); see :func:`default_chunk_sizes`.
        vocab_chunk_size: Vocabulary entries unembedded at once (the last chunk may be shorter).

    Returns:
        The statistics, float32, on the unembedding's device.

    Raises:
        ValueError: If ``top_k``, a chunk size or ``target_tokens`` is out of range, or the
            arguments are invalid for ``accumulated_resid``.

    Examples:
        >>> import torch
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> cfg = HookedTransformerConfig(
        ...     n_layers=2, d_model=16, d_head=4, n_ctx=8, d_vocab=50, act_fn="gelu",
        ...     normalization_type="LN", seed=0,
        ... )
        >>> model = HookedTransformer(cfg)
        >>> tokens = torch.tensor([[1, 2, 3, 4]])
        >>> logits, cache = model.run_with_cache(tokens)
        >>> stats = compute_logit_lens_stats(
        ...     cache, target_tokens=tokens, top_k=3, vocab_chunk_size=16
        ... )
        >>> stats.labels
        ['0_pre', '1_pre', 'final_post']
        >>> stats.entropy.shape, stats.top_k_tokens.shape  # layer, batch, pos (, k)
        (torch.Size([3, 1, 4]), torch.Size([3, 1, 4, 3]))

        The last row is the model itself:

        >>> log_probs = logits.log_softmax(dim=-1)
        >>> torch.allclose(stats.entropy[-1], -(log_probs.exp() * log_probs).sum(-1), atol=1e-5)
        True
        >>> torch.allclose(stats.kl_to_final[-1], torch.zeros(1, 4), atol=1e-5)
        True
        >>> bool((stats.top_k_tokens[-1, ..., 0] == logits.argmax(dim=-1)).all())
        True
    """
    model = cache.model
    if not isinstance(pos_slice, Slice):
        pos_slice = Slice(pos_slice)
    stack, labels = cache.accumulated_resid(
        layer=layer, incl_mid=incl_mid, pos_slice=pos_slice, return_labels=True
    )
    W_U, b_U = model.W_U, model.b_U
    d_vocab = W_U.shape[-1]
    batch_and_pos_shape = stack.shape[1:-1]
    _check_arguments(
        d_vocab, batch_and_pos_shape, target_tokens, top_k, layer_chunk_size, vocab_chunk_size
    )
    device = W_U.device
    n_layers_covered, n_rows = stack.shape[0], math.prod(batch_and_pos_shape)
    layer_chunk_size, vocab_chunk_size = default_chunk_sizes(
        n_layers_covered, n_rows, d_vocab, layer_chunk_size, vocab_chunk_size
    )

    layer_chunks = [
        slice(start, start + layer_chunk_size)
        for start in range(0, n_layers_covered, layer_chunk_size)
    ]

    def normalized(rows: slice) -> Float[torch.Tensor, "layers n d_model"]:
        return _normalized_rows(cache, stack, rows, pos_slice, recompute_ln, device)

    final_resid = pos_slice.apply(cache[("resid_post", model.cfg.n_layers - 1)], dim=-2)
    final = cache.apply_ln_to_stack(
        final_resid[None], None, pos_slice=pos_slice, recompute_ln=recompute_ln
    )
    final = final.to(device=device, dtype=torch.float32).reshape(n_rows, -1)
    soft_cap = float(model.cfg.output_logits_soft_cap)

    targets = None
    if target_tokens is not None:
        targets = torch.broadcast_to(target_tokens.to(device), batch_and_pos_shape).reshape(-1)
        target_logits = torch.cat(
            [_target_logits(normalized(rows), targets, W_U, b_U, soft_cap) for rows in layer_chunks]
        )
        target_rank = torch.zeros(n_layers_covered, n_rows, dtype=torch.long, device=device)
    if top_k is not None:
        top_values = torch.full((n_layers_covered, n_rows, top_k), -math.inf, device=device)
        top_tokens = torch.zeros(n_layers_covered, n_rows, top_k, dtype=torch.long, device=device)
    lens = _RunningLogSumExp((n_layers_covered, n_rows), device)
    reference = _RunningLogSumExp((n_rows,), device)
    # sum_v exp(f_v - m_f) * (f_v - z_v) per layer and row, with m_f the reference's running max:
    # divided by the reference's sum at the end it is E_final[f - z].
    kl_numerator = torch.zeros(n_layers_covered, n_rows, device=device)

    for vocab_start in range(0, d_vocab, vocab_chunk_size):
        vocab_end = min(vocab_start + vocab_chunk_size, d_vocab)
        W_U_chunk = W_U[:, vocab_start:vocab_end].float()
        b_U_chunk = b_U[vocab_start:vocab_end].float()
        final_logits = _unembed_chunk(final, W_U_chunk, b_U_chunk, soft_cap)
        kl_numerator *= reference.update_max(final_logits.amax(dim=-1))
        final_weights = (final_logits - reference.max[:, None]).exp_()
        kl_numerator += _row_dot(final_logits[None], final_weights)
        reference.add(final_logits)

        for rows in layer_chunks:
            logits = _unembed_chunk(normalized(rows), W_U_chunk, b_U_chunk, soft_cap)
            kl_numerator[rows] -= _row_dot(logits, final_weights)
            if targets is not None:
                target_rank[rows] += _count_above(logits, target_logits[rows], targets, vocab_start)
            if top_k is not None:
                top_values[rows], top_tokens[rows] = _merge_top_k(
                    top_values[rows], top_tokens[rows], logits, vocab_start
                )
            lens.add(logits, rows)  # overwrites logits
            # Free this chunk before the next one is allocated, or two are held at once.
            del logits

    log_partition = lens.log_partition
    kl = kl_numerator / reference.sum - reference.log_partition + log_partition
    out_shape = (n_layers_covered, *batch_and_pos_shape)
    stats = LogitLensStats(
        labels=labels,
        entropy=lens.entropy.reshape(out_shape),
        # KL is non-negative; float rounding can leave -1e-7 where the two distributions agree.
        kl_to_final=kl.clamp_(min=0.0).reshape(out_shape),
    )
    if targets is not None:
        stats.target_prob = (target_logits - log_partition).exp().reshape(out_shape)
        stats.target_rank = target_rank.reshape(out_shape)
    if top_k is not None:
        stats.top_k_tokens = top_tokens.reshape(*out_shape, top_k)
        stats.top_k_probs = (top_values - log_partition[..., None]).exp().reshape(*out_shape, top_k)
    return stats
