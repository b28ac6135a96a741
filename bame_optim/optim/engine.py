"""The state engine of N:M sparse parameters: compact storage, mask changes, checkpoint form.

Every optimizer over the engine (:class:`bame_optim.BAMESGD`, its rule variants, and any
other update rule) keeps the same per-parameter state in ``optimizer.state[p]``:

* ``kept``: the *kept code*, the kept set of every block of ``M`` weights stored compactly by
  :func:`bame_optim.core.kept.encode_kept` (one colex rank per block, ``[K]``); variables
  holding it are named ``code``, and ``kept`` / ``mask`` name the ``[K, M]`` bool *kept mask*
  it decodes to (docs/design.md, "State of a sparse parameter");
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

from bame_optim.core.kept import (
    decode_kept,
    encode_kept,
    gather_kept,
    kept_indices,
    mask_from_indices,
    remap_kept,
)
from bame_optim.core.kept import scatter_kept_ as scatter_kept_
from bame_optim.core.nm import block_view, blocks_to_param
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
        code = local_state(state["kept"])
        blocks = local_tensor(p).numel() // m
        if code.shape[0] != blocks or state["kept_count"] > m:
            raise ValueError(
                f"Invalid state for {name} (shape {tuple(p.shape)}): it holds {code.shape[0]} "
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
    def local_code(state: State) -> Tensor:
        """The kept code of this rank's blocks (``[K]`` ranks or ``[K, count]`` positions)."""
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

    @staticmethod
    def kept_mask(state: State, m: int) -> Tensor:
        """The kept mask (``[K, M]`` bool) of this rank's blocks, decoded from the kept code."""
        return decode_kept(local_state(state["kept"]), state["kept_count"], m)

    def dense_buffer(self, p: Tensor, state: State, name: str, m: int) -> Tensor | None:
        """Buffer ``name`` in the parameter's layout (zeros at pruned entries), or ``None``."""
        buffer = state.get(name)
        if buffer is None:
            return None
        return scatter_kept_(torch.zeros_like(local_tensor(p)), self.positions(state, m),
                             local_state(buffer), m)

    def local_buffers(self, p: Tensor, state: State) -> list[Tensor | None]:
        """This rank's compact buffers, in the order of :attr:`buffers`."""
        return [
            None if state.get(name) is None else local_state(state[name]) if is_sharded(p)
            else state[name]
            for name in self.buffers
        ]

    def local_view(self, p: Tensor, state: State) -> State:
        """``state`` of sharded ``p`` with this rank's kept code and buffers, for a step."""
        view = dict(state, kept=local_state(state["kept"]))
        for name, buffer in zip(self.buffers, self.local_buffers(p, state), strict=True):
            if buffer is not None:
                view[name] = buffer
        return view

    def store_local(self, p: Tensor, state: State, view: State, m: int) -> None:
        """Store what an update step wrote into ``view`` (from :meth:`local_view`) in
        ``state``, the buffers as per-block state of ``p`` again."""
        for key, value in view.items():
            if key in self.buffers and value is not None:
                state[key] = distribute_state(value, p, m)
            elif key != "kept" and key not in self.buffers and state.get(key) is not value:
                state[key] = value

    # -- mask changes --------------------------------------------------------------------

    def apply_mask(self, p: Tensor, state: State, new: Tensor, count: int, m: int) -> Tensor:
        """Make ``new`` (``[K, M]`` bool, ``count`` kept per block) the mask of ``p``.

        Newly pruned weights are set to 0; every buffer keeps the values of weights kept by
        both masks, and revived weights (newly kept) start at 0. Returns ``changed``
        (``[K, M]`` bool: entries whose mask flipped).

        .. note:: Where the count stays, only the blocks whose stored kept set changed are
           decoded and rewritten (usually a few percent: OBF freezes blocks, and most LMA
           proposals keep the mask); the buffers' rows of those blocks change in place.
        """
        old_code, old_count = local_state(state["kept"]), state["kept_count"]
        new_code = encode_kept(new, count)
        state["kept"] = distribute_state(new_code, p, m)
        state["kept_count"] = count
        local = local_tensor(p)
        buffers = [(name, local_state(state[name])) for name in self.buffers
                   if state.get(name) is not None]
        rows = None  # the blocks whose kept set changed (None: all of them)
        exact_by_rows = not any(_rewrites_nans(t) for t in [local, *(b for _, b in buffers)])
        if count == old_count and exact_by_rows:
            moved = old_code != new_code
            rows = (moved if moved.ndim == 1 else moved.any(dim=1)).nonzero().squeeze(1)
            if 2 * rows.numel() > moved.shape[0]:
                rows = None
        if rows is None:
            old = decode_kept(old_code, old_count, m)
            changed = old != new
            local.masked_fill_(blocks_to_param(old.logical_and_(changed), local.shape), 0)
        else:
            changed = torch.zeros_like(new, memory_format=torch.contiguous_format)
            if rows.numel() == 0:
                return changed
            old = decode_kept(old_code.index_select(0, rows), old_count, m)
            changed_rows = old != new.index_select(0, rows)
            changed.index_copy_(0, rows, changed_rows)
            _zero_in_blocks_(local, m, rows, old.logical_and_(changed_rows))
        for name, buffer in buffers:
            if rows is None:
                buffer = remap_kept(buffer, old_code, old_count, new_code, count, m)
            else:
                moved_values = remap_kept(
                    buffer.index_select(0, rows), old_code.index_select(0, rows), old_count,
                    new_code.index_select(0, rows), count, m,
                )
                buffer.index_copy_(0, rows, moved_values)
            state[name] = distribute_state(buffer, p, m)
        return changed

    def apply_evolution(
        self, ps: list[Tensor], states: list[State], proposed: list[Tensor],
        frozen: list[Tensor], m: int,
    ) -> list[int]:
        """:meth:`apply_mask` of evolve updates whose count stays, through the fused pass
        (``bame_optim::apply_evolved_``; on the CPU one native call for all of ``ps``): frozen
        blocks keep their kept set, the others take ``proposed`` (stored as ``kept`` is).
        Returns the flipped entries per parameter. Buffers are remapped in place; equal to
        :meth:`apply_mask` bit for bit."""
        counts = [state["kept_count"] for state in states]
        buffers = [[b for b in self.local_buffers(p, state) if b is not None]
                   for p, state in zip(ps, states, strict=True)]
        locals_ = [local_tensor(p) for p in ps]
        kept = [local_state(state["kept"]) for state in states]
        if locals_ and locals_[0].is_cuda:
            from bame_optim.kernels import ops

            done = [ops.apply_evolved_(*args, m) for args in
                    zip(locals_, buffers, kept, counts, proposed, frozen, strict=True)]
            new_kept, flips = [k for k, _ in done], [int(f) for _, f in done]
        else:
            from bame_optim.kernels import evolve_cpu

            new_kept, flips = evolve_cpu.apply_evolved_many(locals_, buffers, kept, counts,
                                                            proposed, frozen, m)
        for p, state, codes in zip(ps, states, new_kept, strict=True):
            state["kept"] = distribute_state(codes, p, m)
        return flips

    def zero_pruned_(self, p: Tensor, state: State, m: int, *, fused: bool | None = None
                     ) -> None:
        """Set every pruned weight of ``p`` to 0 (weights written from outside the optimizer,
        e.g. by a model ``load_state_dict``, may have put values there). On the CPU, unless
        ``fused`` is False, one native pass does it where it runs
        (:func:`bame_optim.kernels.evolve_cpu.zero_pruned_`, the same bits)."""
        local = local_tensor(p)
        code, count = local_state(state["kept"]), state["kept_count"]
        if fused is False or not _zero_pruned_natively(local, code, count, m):
            _zero_pruned_eagerly(local, code, count, m)

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


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _zero_pruned_natively(local: Tensor, code: Tensor, count: int, m: int) -> bool:
    """:meth:`NMEngine.zero_pruned_` of a CPU tensor through the native pass, if it runs for
    it (False: it does not, nothing was done)."""
    if local.is_cuda or local.is_meta:
        return False
    from bame_optim.kernels import evolve_cpu

    if not (evolve_cpu.supports(local, local, code, count, m) and evolve_cpu.available()):
        return False
    evolve_cpu.zero_pruned_(local, code, count, m)
    return True


def _zero_pruned_eagerly(local: Tensor, code: Tensor, count: int, m: int) -> None:
    """:meth:`NMEngine.zero_pruned_` through torch ops (any device and dtype)."""
    pruned = None
    # The fill changes nothing where every pruned entry already holds +0.0 (all bits 0;
    # -0.0 is not), the usual case: find that out by reading, cheaper than writing.
    bits = _bits(local)
    if bits is None or _rewrites_nans(local):
        dirty = True
    elif 4 * count <= m:  # few kept: are all nonzero entries kept ones?
        kept_bits = gather_kept(bits, kept_indices(code, count, m), m)
        dirty = bool(torch.count_nonzero(bits) != torch.count_nonzero(kept_bits))
    else:
        pruned = blocks_to_param(decode_kept(code, count, m, pruned=True), local.shape)
        dirty = bool(pruned.logical_and(bits != 0).any())
    if dirty:
        if pruned is None:
            pruned = blocks_to_param(decode_kept(code, count, m, pruned=True), local.shape)
        local.masked_fill_(pruned, 0)


def _bits(tensor: Tensor) -> Tensor | None:
    """``tensor`` viewed as integers of its element size (0 exactly where it holds +0.0), or
    ``None`` for an element size without one."""
    dtype = _SAME_SIZE_INT.get(tensor.element_size())
    return None if dtype is None else tensor.view(dtype)


def _rewrites_nans(tensor: Tensor) -> bool:
    """Whether ATen's CPU ``masked_fill_`` / ``scatter_`` / ``gather`` change the bits of NaNs in
    ``tensor`` (float16: signalling NaNs quieted; bfloat16: every NaN to ``0xFFFF``; they go
    through float32), also at entries they leave unchanged. Such tensors take the paths that
    rewrite every entry, as the dense formulation did, so results stay equal bit for bit."""
    return tensor.is_floating_point() and tensor.element_size() < 4


def _zero_in_blocks_(tensor: Tensor, m: int, rows: Tensor, zero: Tensor) -> None:
    """Set to 0 the entries ``zero`` (``[J, M]`` bool) of the blocks ``rows`` (``[J]``) of a
    parameter-shaped ``tensor``, in place; other entries are rewritten unchanged."""
    blocks = block_view(tensor, m)
    index = torch.unravel_index(rows, blocks.shape[:-1])
    blocks[index] = blocks[index].masked_fill_(zero, 0)


def _like(local: Tensor, p: Tensor) -> Tensor:
    """``local`` (this rank's part, shaped like ``p``'s) as a ``DTensor`` sharded as ``p``."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
    )
