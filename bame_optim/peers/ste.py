"""Shared machinery of the dense-weight, straight-through peers (SR-STE, LBC).

These methods keep *dense* weights ``W`` and train them with the dense gradient of the masked
weight (the straight-through estimator), so they do not fit BAME's "the parameter is the
weight" shape. :class:`DenseSTESGD` fits them into the optimizer shape instead:

* the optimizer keeps ``W`` in ``state["dense_weight"]`` (parameter layout, parameter dtype),
  copied from the parameter at the first ``step()``;
* the parameter holds ``W ⊙ B`` (``B``: ``state["mask"]``, ``[K, M]`` bool block view; MaxQ
  also scales the kept weights, :meth:`DenseSTESGD._forward_weight`) for the forward, so
  ``p.grad = dL/d(W ⊙ B)`` (dense) is the straight-through gradient of ``W``;
* ``step()`` runs :func:`torch.optim.sgd.sgd` (momentum buffer, weight decay and update
  are dense) on ``W``, asks the subclass for
  the new mask, and writes ``W ⊙ B`` back into the parameter.

Dense parameters are passed to the same call unchanged, so they follow ``torch.optim.SGD``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim.sgd import sgd

from bame_optim.core.nm import blocks_to_param, num_blocks
from bame_optim.optim.base import NM_KEYWORDS, SGD_DEFAULTS, NMOptimizer
from bame_optim.optim.sharded import is_sharded

__all__ = ["DenseSTESGD"]

_SGD_KEYS = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize", "foreach")


class DenseSTESGD(NMOptimizer):
    """Base class of the straight-through peers: :class:`~bame_optim.optim.base.NMOptimizer`'s
    validation, step counter, ``load_state_dict`` and ``sparsity_report``, with dense weights
    in the optimizer state.

    Subclasses set :attr:`method_defaults` (their own group keywords and defaults, validated in
    :meth:`_prepare_group`) and implement :meth:`_new_mask`; they may override
    :meth:`_dense_grad` (change the gradient of ``W``), :meth:`_observe` (read ``G`` and ``W``
    before the update), :meth:`_forward_weight` (what the parameter holds) and
    :meth:`_init_state`.
    """

    method_defaults: ClassVar[dict[str, Any]] = {}
    """The subclass's own keywords and their defaults."""
    _exact_dtype_state: ClassVar[tuple[str, ...]] = ("mask",)
    blocks_along_dim0 = False

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        n: int = 2,
        m: int = 4,
        sparse: bool | None = None,
        **method_keywords: Any,
    ) -> None:
        unknown = sorted(set(method_keywords) - set(self.method_defaults))
        if unknown:
            raise TypeError(f"{type(self).__name__}() got unexpected keyword arguments: {unknown}")
        defaults = SGD_DEFAULTS | dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
            nesterov=nesterov, maximize=maximize, foreach=foreach, n=n, m=m, sparse=sparse,
        ) | self.method_defaults | method_keywords
        super().__init__(params, defaults)

    @classmethod
    def accepted_keywords(cls) -> frozenset[str]:
        return frozenset(SGD_DEFAULTS) | NM_KEYWORDS | set(cls.method_defaults)

    def _sparse_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = self.state[p]
        if "dense_weight" not in state:
            if is_sharded(p):
                raise ValueError(
                    f"Invalid sparse parameter of shape {tuple(p.shape)}: {type(self).__name__} "
                    "does not support sharded (FSDP2 DTensor) parameters; use BAMESGD"
                )
            k = num_blocks(p.shape, group["m"])
            state["dense_weight"] = p.detach().clone()
            # The first forward ran on the untouched (dense) parameter: every weight was kept.
            state["mask"] = torch.ones(k, group["m"], dtype=torch.bool, device=p.device)
            state["last_flips"] = 0
            self._init_state(state, p, group)
        return state

    def _init_state(self, state: dict[str, Any], p: Tensor, group: dict[str, Any]) -> None:
        """Add the subclass's own state entries for a new sparse parameter."""

    def _dense_grad(self, grad: Tensor, state: dict[str, Any], group: dict[str, Any]) -> Tensor:
        """The gradient passed to the SGD arithmetic for ``state["dense_weight"]``."""
        return grad

    def _observe(self, p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        """Called before the SGD update on every step that advances the counter, for sparse
        parameters that have a gradient."""

    def _new_mask(self, p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> Tensor:
        """The mask ``[K, M]`` bool after this step's update of ``state["dense_weight"]``."""
        raise NotImplementedError

    def _forward_weight(self, p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> Tensor:
        """What the parameter holds for the next forward: ``W ⊙ B`` here (``W`` =
        ``state["dense_weight"]``, ``B`` = ``state["mask"]``); a subclass may scale the kept
        weights (MaxQ's soft masks), never revive a pruned one."""
        return torch.where(blocks_to_param(state["mask"], p.shape), state["dense_weight"], 0)

    def _step_group(self, group: dict[str, Any], *, first_index: int, advance: bool) -> None:
        targets, grads, buffers, owners = [], [], [], []
        sparse = []
        for p in group["params"]:
            target, state = p, None
            if self._is_sparse(p, group):
                state = self._sparse_state(p, group)
                sparse.append((p, state))
                target = state["dense_weight"]
            if p.grad is None:
                continue
            grad = p.grad
            if state is not None:
                if advance:
                    self._observe(p, state, group)
                grad = self._dense_grad(grad, state, group)
            targets.append(target)
            grads.append(grad)
            buffers.append(self.state[p].get("momentum_buffer"))
            owners.append(p)
        if targets:
            sgd(targets, grads, buffers, **{k: group[k] for k in _SGD_KEYS})
            if group["momentum"] != 0:
                for p, buffer in zip(owners, buffers, strict=True):
                    self.state[p]["momentum_buffer"] = buffer
        if not advance:  # the state-initialising call: state exists now, nothing else changes
            return
        # Every sparse parameter gets its mask, with or without a gradient, so the parameter
        # is always ``dense_weight ⊙ mask``.
        for p, state in sparse:
            old, new = state["mask"], self._new_mask(p, state, group)
            state["last_flips"] = int((old != new).sum())
            state["mask"] = new
            p.copy_(self._forward_weight(p, state, group))

    def kept_mask(self, p: Tensor) -> Tensor | None:
        """The mask of the forward weight ``p = W ⊙ B`` (``state["mask"]``, ``[K, M]`` bool)."""
        mask = self.state.get(p, {}).get("mask")
        return None if mask is None else mask.clone()

    def momentum_buffer(self, p: Tensor) -> Tensor | None:
        """The (dense) momentum buffer of ``W``, in the parameter's layout."""
        buffer = self.state.get(p, {}).get("momentum_buffer")
        return None if buffer is None else buffer.clone()

    def phase_name(self, group: dict[str, Any]) -> str:
        return "evolve"

    def mask_update_due(self, group: dict[str, Any], t: int) -> bool:
        return True

    def last_mask_update(self, group: dict[str, Any]) -> int | None:
        return None
