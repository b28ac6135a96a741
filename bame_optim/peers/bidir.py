"""BAME with bidirectional masks (the paper's BAME†, after Bi-Mask, Zhang et al. 2023,
"Bi-directional Masks for Efficient N:M Sparse Training").

The forward mask ``B`` makes each row of ``W`` N:M (blocks along the input dimension), but the
input gradient ``dX = dY · W`` uses ``Wᵀ``, whose rows run along the *output* dimension and are
not N:M. A backward mask ``Bᵀ`` keeps the ``N`` largest ``|W ⊙ B|`` in every block of ``M``
consecutive output weights, so the weight used for the input gradient, ``W ⊙ B ⊙ Bᵀ``, is N:M
along the transposed direction too. The weight gradient ``dW = dYᵀ X`` is unchanged.

* :func:`backward_mask` is the pure function,
* :class:`BidirBAMESGD` keeps ``state["backward_mask"]`` fresh after every step,
* :func:`attach_backward_masks` registers forward hooks that make a model's sparse layers use
  it for their input gradient (the hooks read the optimizer's state; nothing is stored on the
  modules).

Training-FLOPs profile: as BAME, with the input-gradient product N:M in hardware terms too.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.hooks import RemovableHandle

from bame_optim.core.nm import blocks_to_param, param_to_blocks, top_n_mask
from bame_optim.groups import SPARSE_LAYER_TYPES
from bame_optim.optim.sgd import BAMESGD
from bame_optim.optim.sharded import is_sharded

__all__ = ["BidirBAMESGD", "attach_backward_masks", "backward_mask"]


def _transposed(tensor: Tensor) -> Tensor:
    return tensor.transpose(0, 1)


def backward_mask(weight: Tensor, n: int, m: int) -> Tensor:
    """Backward mask ``[K', M]`` (block view of ``Wᵀ``): the ``n`` largest ``|W|`` of every
    block of ``m`` consecutive output weights (dimension 0), ties to the lower index."""
    scores = param_to_blocks(_transposed(weight), m).abs()
    return top_n_mask(scores.to(torch.promote_types(scores.dtype, torch.float32)), n)


def backward_mask_as_param(mask: Tensor, shape: torch.Size) -> Tensor:
    """The backward mask in the parameter's layout."""
    transposed = (shape[1], shape[0], *shape[2:])
    return _transposed(blocks_to_param(mask, transposed))


class BidirBAMESGD(BAMESGD):
    """:class:`BAMESGD` that also keeps a backward mask (``state["backward_mask"]``) for every
    sparse parameter whose output dimension divides by ``m``, recomputed at the end of each
    ``step()`` (the :meth:`_after_step` hook) from the updated sparse weights. Use with
    :func:`attach_backward_masks`."""

    _exact_dtype_state = (*BAMESGD._exact_dtype_state, "backward_mask")
    blocks_along_dim0 = False

    def _after_step(self, advanced: bool) -> None:
        super()._after_step(advanced)
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state and "kept" in state and is_sharded(p):
                    raise ValueError(
                        f"Invalid sparse parameter of shape {tuple(p.shape)}: backward masks "
                        "run along dimension 0, which FSDP2 shards; use BAMESGD"
                    )
                if state and "kept" in state and p.shape[0] % group["m"] == 0:
                    state["backward_mask"] = backward_mask(p, group["n"], group["m"])


class _MaskedInputGrad(torch.autograd.Function):
    """Identity on the layer's output; backward computes ``dX`` with the backward-masked
    weight and ``dW``, ``db`` as usual, so the layer's own backward never runs."""

    @staticmethod
    def forward(ctx, output, x, weight, bias, masked_weight, conv):  # type: ignore[override]
        ctx.save_for_backward(x, weight, masked_weight)
        ctx.conv = conv
        ctx.has_bias = bias is not None
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, weight, masked_weight = ctx.saved_tensors
        grad_bias = None
        if ctx.conv is None:
            grad_x = grad_out @ masked_weight
            grad_weight = grad_out.reshape(-1, grad_out.shape[-1]).T @ x.reshape(-1, x.shape[-1])
            if ctx.has_bias:
                grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        else:
            dims, kwargs = ctx.conv
            grad_input_fn = getattr(torch.nn.grad, f"conv{dims}d_input")
            grad_weight_fn = getattr(torch.nn.grad, f"conv{dims}d_weight")
            grad_x = grad_input_fn(x.shape, masked_weight, grad_out, **kwargs)
            grad_weight = grad_weight_fn(x, weight.shape, grad_out, **kwargs)
            if ctx.has_bias:
                grad_bias = grad_out.sum(dim=[d for d in range(grad_out.ndim) if d != 1])
        return None, grad_x, grad_weight, grad_bias, None, None


def _conv_arguments(module: nn.Module) -> tuple[int, dict[str, Any]] | None:
    if not isinstance(module, nn.modules.conv._ConvNd):
        return None
    kwargs = dict(
        stride=module.stride,
        padding=module.padding,
        dilation=module.dilation,
        groups=module.groups,
    )
    return len(module.kernel_size), kwargs


def attach_backward_masks(model: nn.Module, optimizer: BidirBAMESGD) -> list[RemovableHandle]:
    """Make every Linear/ConvNd of ``model`` whose weight has a backward mask in ``optimizer``
    use ``W ⊙ Bᵀ`` for its input gradient. Returns the hook handles (``handle.remove()``
    detaches them).

    Layers with string padding (``"same"``) or a non-zero ``padding_mode`` keep their ordinary
    backward, as do layers before the optimizer's first step (no mask yet).
    """
    if not isinstance(optimizer, BidirBAMESGD):
        raise ValueError(
            f"Invalid optimizer value: {type(optimizer).__name__} (BidirBAMESGD needed)"
        )
    handles = []
    for module in model.modules():
        if not isinstance(module, SPARSE_LAYER_TYPES):
            continue
        conv = _conv_arguments(module)
        if conv is not None and (isinstance(module.padding, str) or module.padding_mode != "zeros"):
            continue
        handles.append(module.register_forward_hook(_make_hook(optimizer, conv)))
    return handles


def _make_hook(optimizer: BidirBAMESGD, conv: tuple[int, dict[str, Any]] | None):
    def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor | None:
        weight = module.weight
        mask = optimizer.state.get(weight, {}).get("backward_mask")
        if mask is None or not torch.is_grad_enabled():
            return None
        masked = weight.detach() * backward_mask_as_param(mask, weight.shape)
        return _MaskedInputGrad.apply(output, inputs[0], weight, module.bias, masked, conv)

    return hook


def _dense_reference(module: nn.Module, x: Tensor, weight: Tensor) -> Tensor:
    """The layer's forward with another weight (used by the tests to check the gradients)."""
    conv = _conv_arguments(module)
    if conv is None:
        return F.linear(x, weight, module.bias)
    dims, kwargs = conv
    return getattr(F, f"conv{dims}d")(x, weight, module.bias, **kwargs)
