"""Fresh normalization of residual stream stacks.

The logit lens asks what a model would predict if its residual stream stopped at some layer, so a
norm module (usually ``ln_final``) has to be applied to each intermediate residual with statistics
computed from that residual alone, together with the norm's own weight and bias. This module
computes exactly that, for every norm component of TransformerLens, without calling the module:
no :class:`~transformer_lens.hook_points.HookPoint` fires, and any number of leading dimensions is
handled in one fused call.

:meth:`transformer_lens.ActivationCache.ActivationCache.apply_ln_to_stack` uses it when called with
``recompute_ln=True``. The default there is the other convention, which divides every component by
the scale cached on the forward pass, so that components add up to the normalized final residual
(direct logit attribution).
"""

from typing import TYPE_CHECKING, Optional, cast

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import nn

from transformer_lens.components import (
    LayerNorm,
    LayerNormPre,
    RMSNorm,
    RMSNormPre,
    TransformerBlock,
)

if TYPE_CHECKING:
    from transformer_lens.HookedTransformer import HookedTransformer


def resolve_norm_layer(layer: Optional[int], n_layers: int) -> int:
    """Resolve the layer whose input a stack is normalized for.

    Args:
        layer: ``None`` or ``-1`` for the input to the unembed, otherwise a layer in
            ``[0, n_layers]`` (``n_layers`` also means the unembed).
        n_layers: The number of layers of the model.

    Returns:
        The layer index in ``[0, n_layers]``.

    Raises:
        ValueError: If ``layer`` is outside ``[-1, n_layers]``.

    Examples:
        >>> resolve_norm_layer(None, n_layers=12)
        12
        >>> resolve_norm_layer(3, n_layers=12)
        3
    """
    if layer is None or layer == -1:
        return n_layers
    if not 0 <= layer <= n_layers:
        raise ValueError(
            f"layer={layer} is outside [-1, n_layers={n_layers}]: pass a layer index in "
            f"[0, {n_layers}], or None (or -1) for the input to the unembed."
        )
    return layer


def get_target_norm(model: "HookedTransformer", layer: int, mlp_input: bool) -> nn.Module:
    """Get the norm module that reads the residual stream at the input to ``layer``.

    Args:
        model: A :class:`~transformer_lens.HookedTransformer` with normalization.
        layer: A layer in ``[0, n_layers]``, as returned by :func:`resolve_norm_layer`;
            ``n_layers`` means the unembed, read by ``ln_final``.
        mlp_input: Take the block's MLP norm (``ln2``) instead of its attention norm (``ln1``).

    Returns:
        ``model.ln_final``, ``model.blocks[layer].ln1`` or ``model.blocks[layer].ln2``.

    Raises:
        ValueError: If ``mlp_input`` is set for the unembed or an attention-only model, which
            have no MLP.
    """
    if layer == model.cfg.n_layers:
        if mlp_input:
            raise ValueError(
                f"mlp_input=True asks for the MLP input of layer {layer}, but layer {layer} "
                f"(n_layers) is the unembed, which ln_final reads: pass mlp_input=False, or a "
                f"layer in [0, {layer - 1}]."
            )
        return model.ln_final
    if mlp_input and model.cfg.attn_only:
        raise ValueError(
            "mlp_input=True asks for the MLP input, but this model is attention-only "
            "(cfg.attn_only) and has no MLP norm: pass mlp_input=False."
        )
    block = cast(TransformerBlock, model.blocks[layer])
    return block.ln2 if mlp_input else block.ln1


def apply_fresh_norm(
    norm: nn.Module,
    residual_stack: Float[torch.Tensor, "... d_model"],
) -> Float[torch.Tensor, "... d_model"]:
    """Apply a norm module to each residual vector of a stack, with statistics of its own.

    Gives what ``norm(residual_stack)`` gives, to float rounding: the mean (where the norm centres)
    and the scale come from each vector alone, with the module's ``eps``, weight and bias. Unlike
    calling the module, no hook fires and the whole stack is normalized at once, over any number
    of leading dimensions: one fused :func:`torch.nn.functional.layer_norm` for LayerNorm, one
    reduction and one scaling pass for RMSNorm (see :func:`_rms_norm`). As in the modules,
    half-precision inputs get their statistics in float32; the result has the model's dtype and
    lives on the norm's device.

    Args:
        norm: A :class:`~transformer_lens.components.LayerNorm`,
            :class:`~transformer_lens.components.LayerNormPre`,
            :class:`~transformer_lens.components.RMSNorm` or
            :class:`~transformer_lens.components.RMSNormPre` module.
        residual_stack: Residual stream vectors, with ``d_model`` as the last dimension.

    Returns:
        The normalized stack, of the same shape.

    Raises:
        ValueError: If the last dimension is not ``d_model``, or the module is not a norm.

    Examples:
        >>> import torch
        >>> from transformer_lens import HookedTransformerConfig
        >>> from transformer_lens.components import LayerNorm
        >>> cfg = HookedTransformerConfig(n_layers=1, d_model=4, n_ctx=4, d_head=2, act_fn="relu")
        >>> norm = LayerNorm(cfg)
        >>> stack = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]])
        >>> apply_fresh_norm(norm, stack)  # each row is scaled by its own statistics
        tensor([[-1.3416, -0.4472,  0.4472,  1.3416],
                [-1.3416, -0.4472,  0.4472,  1.3416]], grad_fn=<NativeLayerNormBackward0>)
    """
    if not isinstance(norm, (LayerNorm, LayerNormPre, RMSNorm, RMSNormPre)):
        raise ValueError(
            f"Cannot recompute a {type(norm).__name__}: fresh normalization supports LayerNorm, "
            "LayerNormPre, RMSNorm and RMSNormPre. Use recompute_ln=False for the cached scale."
        )
    d_model = norm.cfg.d_model
    if residual_stack.shape[-1] != d_model:
        raise ValueError(
            f"The stack's last dimension is {residual_stack.shape[-1]}, but the norm expects "
            f"d_model={d_model}: pass residual stream vectors of shape [..., d_model]."
        )
    weight: Optional[torch.Tensor] = getattr(norm, "w", None)
    bias: Optional[torch.Tensor] = getattr(norm, "b", None)
    device = residual_stack.device if weight is None else weight.device
    # A no-op when the stack already has the model's dtype and device: no extra copy is made.
    stack = residual_stack.to(device=device, dtype=norm.cfg.dtype)
    if isinstance(norm, (LayerNorm, LayerNormPre)):
        return F.layer_norm(stack, (d_model,), weight, bias, norm.eps)
    return _rms_norm(stack, weight, norm.eps)


def _rms_norm(
    stack: Float[torch.Tensor, "... d_model"],
    weight: Optional[Float[torch.Tensor, "d_model"]],
    eps: float,
) -> Float[torch.Tensor, "... d_model"]:
    """RMSNorm in two passes over the stack.

    :func:`torch.nn.functional.rms_norm` is not a fused kernel on CPU (torch 2.13): it makes
    several stack-sized temporaries and runs about 2.5 times as long as dividing by a cached scale.
    Here a read-only reduction gives the scale (in float32, without an upcast copy of a
    half-precision stack), and one product, scaled in place, gives the result.
    """
    norm = torch.linalg.vector_norm(stack, dim=-1, keepdim=True, dtype=torch.float32)
    rms = (norm.square() / stack.shape[-1] + eps).sqrt()
    if stack.requires_grad:
        # Out of place, so that autograd keeps the tensors it saved.
        normalized = stack / rms.to(stack.dtype)
        return normalized if weight is None else normalized * weight
    # Scaling in place is safe: without grad on the stack, the scale needs none either.
    if weight is not None:
        return (stack * weight).div_(rms)
    # A half-precision stack divided by the float32 scale would give a float32 copy.
    return stack / rms if stack.dtype == rms.dtype else stack.clone().div_(rms)
