"""The state engine of N:M sparse parameters: compact storage, mask changes, checkpoint form.

Every optimizer over the engine (:class:`bame_optim.BAMESGD`, its rule variants, and any
other update rule) keeps the same per-parameter state in ``optimizer.state[p]``:

* ``kept``: the kept set of every block of ``M`` weights, stored compactly by
  :func:`bame_optim.core.kept.encode_kept` (one colex rank per block, ``[K]``);
* ``kept_count``: weights kept per block (``N``, or the gradual budget ``n(t)``);
* the update rule's buffers (``momentum_buffer`` for SGD), each ``[K, kept_count]``: values of
  the kept weights only, in block order;
* ``oscillation`` (the EMA of Eq. 8, ``[K]``) while masks evolve, ``last_flips`` and
  ``last_frozen`` for reporting.

The engine is the one place that reads or writes those entries. It works on this rank's
blocks of an FSDP2-sharded parameter (:mod:`bame_optim.optim.sharded`): per-block state is a
``DTensor`` in row layout there, and :meth:`NMEngine.checkpoint_form` gives a form whose shapes
do not depend on the phase, because ``torch.distributed.checkpoint`` loads into the shapes a
fresh optimizer's state has.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from bame_optim.core.kept import encode_kept, gather_kept, kept_indices, mask_from_indices
from bame_optim.core.kept import scatter_kept_ as scatter_kept_
from bame_optim.core.nm import blocks_to_param
from bame_optim.optim.sharded import (
    block_range,
    check_row_sharded,
    distribute_state,
    is_sharded,
    local_state,
    local_tensor,
)

__all__ = ["NMEngine"]

State = dict[str, Any]


class NMEngine:
    """Compact state of the sparse parameters of one optimizer.

    Args:
        buffers: names of the update rule's per-weight buffers (``("momentum_buffer",)`` for
            SGD); each is stored for kept weights only and restarts at 0 for a revived weight.
    """

    def __init__(self, buffers: tuple[str, ...]) -> None:
        self.buffers = buffers

    # -- storage -------------------------------------------------------------------------

    @staticmethod
    def initialised(state: State) -> bool:
        """Whether ``state`` holds a mask (``False`` before the parameter's first step)."""
        return "kept" in state

    def initialise(self, p: Tensor, state: State, m: int) -> None:
        """Every weight kept: the first forward ran on the untouched (dense) parameter."""
        if is_sharded(p):
            check_row_sharded(p)
        local = local_tensor(p)
        everything = torch.ones(block_range(p, m)[1], m, dtype=torch.bool, device=local.device)
        state["kept"] = distribute_state(encode_kept(everything, m), p, m)
        state["kept_count"] = m
        state["last_flips"] = 0
        state["last_frozen"] = 0

    @staticmethod
    def check(p: Tensor, state: State, m: int, name: str) -> None:
        """``ValueError`` naming ``name`` if ``state`` was not made for ``p`` at block size
        ``m`` (e.g. the group's ``n`` / ``m`` were changed after a state dict was loaded)."""
        kept = local_state(state["kept"])
        blocks = local_tensor(p).numel() // m
        if kept.shape[0] != blocks or state["kept_count"] > m:
            raise ValueError(
                f"Invalid state for {name} (shape {tuple(p.shape)}): it holds {kept.shape[0]} "
                f"blocks keeping {state['kept_count']} each, but m={m} gives {blocks} blocks; "
                "the state was made at another N:M pattern (load a state dict made at this "
                "pattern, or keep the loaded pattern)"
            )

    def adopt_dense(self, p: Tensor, state: State, m: int) -> None:
        """Take over the state of a dense optimizer (e.g. :class:`torch.optim.SGD`'s
        parameter-shaped ``momentum_buffer``): every weight kept, buffers compacted."""
        dense = {name: state.pop(name) for name in self.buffers if name in state}
        self.initialise(p, state, m)
        positions = self.positions(state, m)
        for name, buffer in dense.items():
            compact = gather_kept(local_tensor(buffer).to(local_tensor(p).dtype), positions, m)
            state[name] = distribute_state(compact, p, m)

    @staticmethod
    def positions(state: State, m: int) -> Tensor:
        """Sorted kept positions ``[K, count]`` (``int64``) of this rank's blocks."""
        return kept_indices(local_state(state["kept"]), state["kept_count"], m)

    @staticmethod
    def local_kept(state: State) -> Tensor:
        """The stored kept sets of this rank's blocks (``[K]`` ranks or ``[K, count]``)."""
        return local_state(state["kept"])

    @staticmethod
    def oscillation(p: Tensor, state: State, m: int, dtype: torch.dtype) -> Tensor:
        """This rank's oscillation EMA ``[K]``; zeros when absent (Eq. 8: ``O`` starts at 0
        with the evolve phase)."""
        oscillation = state.get("oscillation")
        if oscillation is not None:
            return local_state(oscillation)
        device = local_tensor(p).device
        return torch.zeros(block_range(p, m)[1], dtype=dtype, device=device)

    @staticmethod
    def store_oscillation(p: Tensor, state: State, oscillation: Tensor, m: int) -> None:
        """Store this rank's oscillation EMA (the inverse of :meth:`oscillation`)."""
        state["oscillation"] = distribute_state(oscillation, p, m)

    def kept_mask(self, state: State, m: int) -> Tensor:
        """``[K, M]`` bool mask of this rank's blocks."""
        return mask_from_indices(self.positions(state, m), m)

    def dense_buffer(self, p: Tensor, state: State, name: str, m: int) -> Tensor | None:
        """Buffer ``name`` in the parameter's layout (zeros at pruned entries), or ``None``."""
        buffer = state.get(name)
        if buffer is None:
            return None
        local = local_tensor(p)
        positions = self.positions(state, m)
        return scatter_kept_(torch.zeros_like(local), positions, local_state(buffer), m)

    def local_buffers(self, p: Tensor, state: State) -> list[Tensor | None]:
        """This rank's compact buffers, in the order of :attr:`buffers`."""
        return [
            None if state.get(name) is None else local_state(state[name]) if is_sharded(p)
            else state[name]
            for name in self.buffers
        ]

    def store_buffers(self, p: Tensor, state: State, buffers: list[Tensor | None], m: int) -> None:
        """Store compact buffers computed on this rank's blocks (the inverse of
        :meth:`local_buffers`); ``None`` entries are left out."""
        for name, buffer in zip(self.buffers, buffers, strict=True):
            if buffer is not None:
                state[name] = distribute_state(buffer, p, m) if is_sharded(p) else buffer

    # -- mask changes --------------------------------------------------------------------

    def apply_mask(self, p: Tensor, state: State, new: Tensor, count: int, m: int) -> Tensor:
        """Make ``new`` (``[K, M]`` bool, ``count`` kept per block) the mask of ``p``.

        Newly pruned weights are set to 0; every buffer keeps the values of weights kept by
        both masks, and revived weights (newly kept) start at 0. Returns ``changed``
        (``[K, M]`` bool: entries whose mask flipped).
        """
        old_positions = self.positions(state, m)
        old = mask_from_indices(old_positions, m)
        changed = old != new
        local = local_tensor(p)
        local.masked_fill_(blocks_to_param(old & ~new, local.shape), 0)
        state["kept"] = distribute_state(encode_kept(new, count), p, m)
        state["kept_count"] = count
        new_positions = self.positions(state, m)
        for name in self.buffers:
            buffer = state.get(name)
            if buffer is None:
                continue
            buffer = local_state(buffer)
            dense = torch.zeros(old.shape, dtype=buffer.dtype, device=buffer.device)
            dense.scatter_(1, old_positions, buffer).masked_fill_(changed, 0)
            state[name] = distribute_state(dense.gather(1, new_positions), p, m)
        return changed

    def zero_pruned_(self, p: Tensor, state: State, m: int) -> None:
        """Set every pruned weight of ``p`` to 0 (weights written from outside the optimizer,
        e.g. by a model ``load_state_dict``, may have put values there)."""
        local = local_tensor(p)
        local.masked_fill_(blocks_to_param(~self.kept_mask(state, m), local.shape), 0)

    # -- checkpoints ---------------------------------------------------------------------

    def checkpoint_form(self, p: Tensor, state: State, m: int, oscillation_dtype) -> State:
        """The phase-independent form of a sharded parameter's state: ``kept_mask`` (``[K, M]``
        bool, row layout), every buffer dense like the parameter, and ``oscillation`` (zeros
        when absent). :meth:`compact_form` turns it back."""
        positions = self.positions(state, m)
        form = {k: v for k, v in state.items() if k != "kept" and k not in self.buffers}
        form["kept_mask"] = distribute_state(mask_from_indices(positions, m), p, m)
        if "oscillation" not in state:
            zeros = torch.zeros(
                positions.shape[0], dtype=oscillation_dtype, device=positions.device
            )
            form["oscillation"] = distribute_state(zeros, p, m)
        local = local_tensor(p)
        for name in self.buffers:
            buffer = state.get(name)
            if buffer is not None:
                dense = scatter_kept_(torch.zeros_like(local), positions, local_state(buffer), m)
                form[name] = _like(dense, p)
        return form

    def compact_form(self, p: Tensor, state: State, m: int) -> None:
        """Inverse of :meth:`checkpoint_form`, in place on ``state``."""
        mask = local_state(state.pop("kept_mask"))
        state["kept"] = distribute_state(encode_kept(mask, state["kept_count"]), p, m)
        positions = self.positions(state, m)
        for name in self.buffers:
            buffer = state.get(name)
            if buffer is not None:
                compact = gather_kept(local_tensor(buffer), positions, m)
                state[name] = distribute_state(compact, p, m)


def _like(local: Tensor, p: Tensor) -> Tensor:
    """``local`` (this rank's part, shaped like ``p``'s) as a ``DTensor`` sharded as ``p``."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
    )
