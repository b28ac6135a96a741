"""Shared machinery of the dense-weight, straight-through peers (SR-STE, LBC).

These methods keep *dense* weights ``W`` and train them with the dense gradient of the masked
weight (the straight-through estimator), so they do not fit BAME's "the parameter is the
weight" shape. :class:`DenseSTESGD` fits them into the optimizer shape instead:

* the optimizer keeps ``W`` in ``state["dense_weight"]`` (parameter layout, parameter dtype),
  copied from the parameter at the first ``step()``;
* the parameter holds ``W ⊙ B`` (``B``: ``state["mask"]``, ``[K, M]`` bool block view) for the
  forward, so ``p.grad = dL/d(W ⊙ B)`` (dense) is the straight-through gradient of ``W``;
* ``step()`` runs the SGD arithmetic (:func:`bame_optim.optim.masked_sgd.masked_sgd` with every mask
  ``None``: momentum buffer, weight decay and update are dense) on ``W``, asks the subclass for
  the new mask, and writes ``W ⊙ B`` back into the parameter.

Dense parameters are passed to the same call unchanged, so they follow ``torch.optim.SGD``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from bame_optim.core.nm import blocks_to_param, num_blocks
from bame_optim.optim.bame_sgd import BAMESGD
from bame_optim.optim.sharded import is_sharded

__all__ = ["DenseSTESGD"]


class DenseSTESGD(BAMESGD):
    """Base class: :class:`BAMESGD`'s validation, param groups, step counter,
    ``load_state_dict`` and ``sparsity_report``, with dense weights in the optimizer state.

    Subclasses set :attr:`_extra_defaults` (their own group keywords, validated in
    :meth:`_validate_extra`) and implement :meth:`_new_mask`; they may override
    :meth:`_dense_grad` (change the gradient of ``W``) and :meth:`_observe` (read ``G`` and ``W``
    before the update). The private hooks of :class:`BAMESGD` used are ``_step_group`` and
    ``_sparse_state``.
    """

    _exact_dtype_state: tuple[str, ...] = ("mask",)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (see :meth:`BAMESGD.add_param_group`), validating the extra keywords."""
        super().add_param_group(param_group)
        self._validate_extra(self.param_groups[-1])

    def _validate_extra(self, group: dict[str, Any]) -> None:
        """Raise ``ValueError`` naming a bad group keyword of the subclass."""

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

    def _step_group(self, group: dict[str, Any], *, first_index: int, evolve: bool) -> None:
        targets, grads, owners = [], [], []
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
                if evolve:
                    self._observe(p, state, group)
                grad = self._dense_grad(grad, state, group)
            targets.append(target)
            grads.append(grad)
            owners.append(p)
        self._sgd_update(group, targets, grads, [None] * len(targets), owners)
        if not evolve:  # the state-initialising call: state exists now, nothing else changes
            return
        # Every sparse parameter gets its mask, with or without a gradient, so the parameter
        # is always ``dense_weight ⊙ mask``.
        for p, state in sparse:
            old, new = state["mask"], self._new_mask(p, state, group)
            state["last_flips"] = int((old != new).sum())
            state["mask"] = new
            weight = state["dense_weight"]
            p.copy_(torch.where(blocks_to_param(new, p.shape), weight, 0))

    def kept_mask(self, p: Tensor) -> Tensor | None:
        """The mask of the forward weight ``p = W ⊙ B`` (``state["mask"]``, ``[K, M]`` bool)."""
        mask = self.state.get(p, {}).get("mask")
        return None if mask is None else mask.clone()

    def momentum_buffer(self, p: Tensor) -> Tensor | None:
        """The (dense) momentum buffer of ``W``, in the parameter's layout."""
        buffer = self.state.get(p, {}).get("momentum_buffer")
        return None if buffer is None else buffer.clone()

    def sparsity_report(self) -> list[dict[str, Any]]:
        """As :meth:`BAMESGD.sparsity_report`, with ``phase`` from :meth:`_phase_name`."""
        rows = super().sparsity_report()
        for row in rows:
            row["phase"] = self._phase_name(self.param_groups[row["group"]])
        return rows

    def _phase_name(self, group: dict[str, Any]) -> str:
        return "evolve"
