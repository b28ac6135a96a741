"""Opt-in 2:4 training: Linear layers with 2:4 weights run their forward (and, where the mask
allows it, their input gradient) on packed semi-structured tensors, re-packed after every
optimizer step.

**Experimental until verified on a GPU:** the CUDA paths were written and tested on the CPU
fallback only; ``python -m benchmarks.gpu_check`` runs their checks in one call.

:class:`SemiStructuredLinearFunction` gives the packed tensors (which have no autograd formula)
one: ``Y = X Wᵀ + b`` and ``dX = dY W`` through the packed tensors when given, ``dW = dYᵀ X``
always dense; with no packed tensors it is the masked dense math (the CPU fallback).

:func:`attach_semi_structured` registers hooks on the model's ``nn.Linear`` layers and a step
post-hook on the optimizer (nothing is patched, nothing is stored on the modules); the returned
:class:`SemiStructuredTraining` holds the handles and the per-layer :class:`LayerPlan` that says
which path each product took and why.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.hooks import RemovableHandle

from bame_optim.core.nm import is_nm_sparse
from bame_optim.core.transposable import is_transposable_24, transposable_mask
from bame_optim.kernels.semi_structured import KernelChooser, pack_semi_structured

__all__ = [
    "INPUT_GRAD_MODES",
    "LayerPlan",
    "LinearKernels",
    "SemiStructuredLinearFunction",
    "SemiStructuredTraining",
    "attach_semi_structured",
    "semi_structured_linear",
]


@dataclass(frozen=True)
class LinearKernels:
    """What one Linear call runs on; ``None`` fields use the dense math.

    Attributes:
        forward: packed ``W [out, in]`` for ``Y = X Wᵀ + b``.
        input_grad: packed ``W_bᵀ [in, out]`` for ``dX = dY W_b`` (needs ``W_b`` transposable).
        backward_weight: dense ``W_b`` when it is not ``W`` (e.g. ``W ⊙ T`` with a transposable
            mask ``T``); used for ``dX`` when ``input_grad`` is ``None``.
        dtype: compute dtype (``None``: the input's dtype).
    """

    forward: Tensor | None = None
    input_grad: Tensor | None = None
    backward_weight: Tensor | None = None
    dtype: torch.dtype | None = None


class SemiStructuredLinearFunction(torch.autograd.Function):
    r"""``Y = X Wᵀ + b`` with the products on packed 2:4 tensors where given.

    .. math::
        Y = X W^\top + b, \quad dX = dY\, W_b, \quad dW = dY^\top X, \quad db = \textstyle\sum dY

    ``W_b = W`` unless :attr:`LinearKernels.backward_weight` is set. ``dW`` is always the dense
    product: BAME scores pruned weights by their gradient on update steps (Eq. 5).

    .. note::
        Autocast is switched off inside; inputs, weight and bias are cast to the kernels' dtype
        (as autocast would for ``F.linear``), and the gradients are cast back to the dtypes of
        ``x``, ``weight`` and ``bias``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, kernels):  # type: ignore[override]
        dtype = kernels.dtype or x.dtype
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            b = None if bias is None else bias.to(dtype)
            if kernels.forward is not None:
                y = F.linear(x2.contiguous(), kernels.forward, b)
            else:
                y = F.linear(x2, weight.to(dtype), b)
        ctx.save_for_backward(x2, weight)
        ctx.kernels = kernels
        ctx.x_meta = (x.shape, x.dtype)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        x2, weight = ctx.saved_tensors
        kernels: LinearKernels = ctx.kernels
        grad_x = grad_w = grad_b = None
        with torch.autocast(grad_y.device.type, enabled=False):
            g2 = grad_y.reshape(-1, grad_y.shape[-1]).to(x2.dtype)
            if ctx.needs_input_grad[0]:
                if kernels.input_grad is not None:
                    gx = F.linear(g2.contiguous(), kernels.input_grad)
                else:
                    w_b = weight if kernels.backward_weight is None else kernels.backward_weight
                    gx = g2 @ w_b.to(x2.dtype)
                grad_x = gx.reshape(ctx.x_meta[0]).to(ctx.x_meta[1])
            if ctx.needs_input_grad[1]:
                grad_w = (g2.T @ x2).to(weight.dtype)
            if ctx.needs_input_grad[2]:
                grad_b = g2.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None


def semi_structured_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, kernels: LinearKernels | None = None
) -> Tensor:
    """:class:`SemiStructuredLinearFunction` with checked arguments (``kernels=None``: the
    dense masked math, equal to ``F.linear`` and its gradients)."""
    if weight.ndim != 2:
        raise ValueError(f"Invalid weight shape: {tuple(weight.shape)} (2-D [out, in] needed)")
    if x.ndim < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"Invalid input shape: {tuple(x.shape)} (last dim {weight.shape[1]})")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"Invalid bias shape: {tuple(bias.shape)} ({weight.shape[0]},) needed")
    return SemiStructuredLinearFunction.apply(x, weight, bias, kernels or LinearKernels())


INPUT_GRAD_MODES = ("exact", "transposable", "dense")
"""How ``dX = dY W`` is computed: ``exact`` uses the packed ``Wᵀ`` only when ``W``'s own mask is
transposable (else dense, exact either way); ``transposable`` uses ``W ⊙ T``, ``T`` the best
transposable 2:4 mask of ``|W|`` (an approximation, as the backward mask of BAME†);
``dense`` always uses the dense ``W``."""


@dataclass
class LayerPlan:
    """The paths of one Linear layer at its last call (inspectable, for logs and tests)."""

    name: str
    shape: tuple[int, int]
    forward: str = "dense: not called yet"
    input_grad: str = "dense: not called yet"
    calls: int = 0


class _Layer:
    """Per-layer state: masks checks, packed tensors and the pending call of the hooks."""

    def __init__(self, name: str, module: nn.Linear, mode: str, chooser: KernelChooser) -> None:
        self.module, self.mode, self.chooser = module, mode, chooser
        self.plan = LayerPlan(name, (module.out_features, module.in_features))
        self.version: int | None = None
        self.is_24 = self.transposable = False
        self.backward_weight: Tensor | None = None
        self.packed: dict[tuple[str, torch.dtype], Tensor] = {}
        self.last_call: tuple[int, torch.dtype] | None = None
        self.pending: list[tuple[Tensor, LinearKernels]] = []

    def update(self) -> None:
        """Re-check the weight's 2:4 pattern and drop the packs (the weight changed)."""
        weight = self.module.weight.detach()
        out_features, in_features = weight.shape
        tiles = out_features % 4 == 0 and in_features % 4 == 0
        self.is_24 = in_features % 4 == 0 and is_nm_sparse(weight, 2, 4)
        self.transposable = self.is_24 and tiles and is_transposable_24(weight)
        self.backward_weight = None
        if self.mode == "transposable" and self.is_24 and tiles and not self.transposable:
            self.backward_weight = weight * transposable_mask(weight)
        self.packed.clear()
        self.version = self.module.weight._version

    def _pack(self, role: str, rows: int, dtype: torch.dtype) -> Tensor | None:
        weight = self.module.weight
        shape = self.plan.shape if role == "forward" else self.plan.shape[::-1]
        choice = self.chooser.choose(rows, shape, dtype, weight.device)
        label = "sparse" if choice.sparse else "dense"
        if role == "input_grad" and self.backward_weight is not None:
            label += " W⊙T"
        setattr(self.plan, role, f"{label}: {choice.reason}")
        if not choice.sparse:
            return None
        if (role, dtype) not in self.packed:
            source = weight.detach()
            if role == "input_grad":
                source = (source if self.backward_weight is None else self.backward_weight).T
            self.packed[role, dtype] = pack_semi_structured(
                source.to(dtype).contiguous(), choice.backend
            )
        return self.packed[role, dtype]

    def kernels(self, rows: int, dtype: torch.dtype) -> LinearKernels | None:
        """The kernels of a call with ``rows`` rows in ``dtype`` (``None``: plain Linear)."""
        if self.module.weight._version != self.version:
            self.update()
        self.last_call = (rows, dtype)
        forward = input_grad = None
        if self.is_24:
            forward = self._pack("forward", rows, dtype)
        else:
            self.plan.forward = "dense: weight is not 2:4 along the input dimension"
        if self.mode == "dense":
            self.plan.input_grad = "dense: input_grad='dense'"
        elif self.transposable or self.backward_weight is not None:
            input_grad = self._pack("input_grad", rows, dtype)
        elif not self.is_24:
            self.plan.input_grad = "dense: weight is not 2:4 along the input dimension"
        else:
            self.plan.input_grad = "dense: weight is not transposable 2:4 (4x4 tiles)"
        if forward is None and input_grad is None and self.backward_weight is None:
            return None
        return LinearKernels(forward, input_grad, self.backward_weight, dtype)


def _compute_dtype(x: Tensor, weight: Tensor) -> torch.dtype | None:
    """The dtype ``F.linear`` would compute in (autocast's, or the input's when it matches the
    weight's), ``None`` when the call is left to the module (it would raise or is float64)."""
    device_type = x.device.type
    if x.dtype != torch.float64 and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype if x.dtype == weight.dtype else None


class SemiStructuredTraining:
    """Handles and plans of :func:`attach_semi_structured`; ``remove()`` detaches everything."""

    def __init__(self, layers: list[_Layer]) -> None:
        self._layers = layers
        self.handles: list[RemovableHandle] = []

    @property
    def plans(self) -> dict[str, LayerPlan]:
        """Per-layer paths, by module name."""
        return {layer.plan.name: layer.plan for layer in self._layers}

    def refresh(self) -> None:
        """Re-check masks and re-pack every layer for its last call's rows and dtype (run by
        the optimizer's step post-hook)."""
        for layer in self._layers:
            layer.update()
            if layer.last_call is not None:
                layer.kernels(*layer.last_call)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def __str__(self) -> str:
        lines = []
        for plan in self.plans.values():
            shape = "x".join(map(str, plan.shape))
            lines.append(f"{plan.name} [{shape}] calls={plan.calls}")
            lines.append(f"    forward:    {plan.forward}")
            lines.append(f"    input grad: {plan.input_grad}")
        return "\n".join(lines)


def attach_semi_structured(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    chooser: KernelChooser | None = None,
    input_grad: str = "exact",
    layers: list[str] | None = None,
) -> SemiStructuredTraining:
    """Run the 2:4 Linear layers of ``model`` on semi-structured kernels while training with
    ``optimizer`` (any optimizer; BAME's keeps the weights 2:4 after its pruning step).

    Every ``nn.Linear`` whose weight ``optimizer`` trains (and whose name matches one of the
    ``fnmatch`` patterns ``layers``, if given) gets a forward pre-hook and a forward hook; the
    optimizer gets a step post-hook that re-packs the weights. A call goes through
    :class:`~bame_optim.kernels.semi_structured.SemiStructuredLinearFunction` when its weight is 2:4
    along the input dimension and ``chooser`` measured the packed product faster for that
    call's rows, shape and dtype (or when ``input_grad="transposable"`` changes ``dX``);
    every other call is the module's own ``F.linear``. On CPU nothing is packed, so results
    equal the dense masked model (with ``"transposable"``: ``dX = dY (W ⊙ T)`` on both).

    .. note::
        The pre-hook hands the module a zero-row input, so its dense ``F.linear`` costs nothing,
        and the forward hook (run first) returns the real output; hooks registered before see
        the real input, later forward hooks the real output. Modules whose weight is used by
        their parent without calling their ``forward`` (``nn.MultiheadAttention.out_proj``)
        never see the hooks: their plan keeps ``calls=0``.
    """
    if input_grad not in INPUT_GRAD_MODES:
        raise ValueError(f"Invalid input_grad value: {input_grad!r} (one of {INPUT_GRAD_MODES})")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"Invalid optimizer value: {type(optimizer).__name__}")
    chooser = chooser or KernelChooser()
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    chosen = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or id(module.weight) not in trained:
            continue
        if layers is None or any(fnmatchcase(name, pattern) for pattern in layers):
            chosen.append(_Layer(name, module, input_grad, chooser))
    training = SemiStructuredTraining(chosen)
    for layer in chosen:
        module = layer.module
        training.handles.append(module.register_forward_pre_hook(_make_pre_hook(layer)))
        training.handles.append(module.register_forward_hook(_forward_hook(layer), prepend=True))
    training.handles.append(optimizer.register_step_post_hook(lambda *_: training.refresh()))
    return training


def _make_pre_hook(layer: _Layer):
    def pre_hook(module: nn.Linear, args: tuple[Any, ...]) -> tuple[Tensor] | None:
        layer.plan.calls += 1
        if len(args) != 1 or not isinstance(args[0], Tensor) or args[0].ndim < 1:
            return None
        x = args[0]
        dtype = _compute_dtype(x, module.weight)
        if dtype is None or x.shape[-1] != module.in_features:
            return None
        kernels = layer.kernels(x.numel() // module.in_features, dtype)
        if kernels is None:
            return None
        layer.pending.append((x, kernels))
        return (x.new_empty((0, module.in_features)),)

    return pre_hook


def _forward_hook(layer: _Layer):
    def hook(module: nn.Linear, args: tuple[Any, ...], output: Tensor) -> Tensor | None:
        if not layer.pending:
            return None
        x, kernels = layer.pending.pop()
        return SemiStructuredLinearFunction.apply(x, module.weight, module.bias, kernels)

    return hook
