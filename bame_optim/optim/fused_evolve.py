"""BAME's evolve-phase mask update of one parameter through the fused passes (issue 19).

:func:`evolve_fused` is the update :func:`bame_optim.optim.rules.lma_obf` and
:meth:`bame_optim.optim.engine.NMEngine.apply_mask` make, in three fused passes over the
compact state (:mod:`bame_optim.kernels.evolve_cpu` on the CPU, the Triton kernels of
:mod:`bame_optim.kernels.triton_evolve` on CUDA, as the ``torch.library`` ops of
:mod:`bame_optim.kernels.ops`): equal bit for bit on the weights and every state entry
(``kept``, the buffers, ``oscillation``, ``last_flips``, ``last_frozen``).

The group's ``fused`` chooses, as for the ordinary step: ``False`` never uses the passes,
``None`` uses them where they run, ``True`` requires them (``ValueError`` naming the
parameter where they cannot run). They never run for a sharded (FSDP2) parameter, whose OBF
ranks the blocks of all shards, nor when the kept count is not ``n`` (a state from another
pattern): the eager path does those, whatever ``fused`` says.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from bame_optim.kernels import evolve_cpu
from bame_optim.optim.engine import NMEngine
from bame_optim.optim.sharded import is_sharded

__all__ = ["evolve_fused", "fused_evolve_runs"]


def fused_evolve_runs(
    engine: NMEngine, weight: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any]
) -> bool:
    """Whether :func:`evolve_fused` runs for this parameter (``weight``, ``grad`` in the block
    layout); with ``fused=True`` a ``ValueError`` where it cannot."""
    fused = group.get("fused")
    if fused is False or is_sharded(weight) or state["kept_count"] != group["n"]:
        return False
    buffers = [b for b in engine.local_buffers(weight, state) if b is not None]
    args = (weight, grad, state["kept"], state["kept_count"], group["m"],
            state.get("oscillation"), buffers)
    if weight.is_cuda:
        from bame_optim.kernels import triton_evolve

        ok = triton_evolve.available() and triton_evolve.supports(*args)
        reason = "the Triton evolve kernels are unavailable or do not support these tensors"
    else:
        ok = evolve_cpu.supports(*args) and evolve_cpu.available()
        reason = (f"the fused evolve CPU passes are unavailable ({evolve_cpu.error()})"
                  if evolve_cpu.supports(*args) else "the fused evolve CPU passes do not support "
                  "these tensors (see bame_optim.kernels.evolve_cpu.supports)")
    if fused and not ok:
        raise ValueError(
            f"Invalid fused value: True for a parameter of shape {tuple(weight.shape)} "
            f"({weight.dtype} on {weight.device}, strides {weight.stride()}): {reason}"
        )
    return ok


def evolve_fused(
    engine: NMEngine,
    weight: Tensor,
    grad: Tensor,
    state: dict[str, Any],
    group: dict[str, Any],
    *,
    zero_pruned: bool = False,
) -> None:
    """One LMA + OBF update (Eq. 4-10) of a parameter for which :func:`fused_evolve_runs`
    holds, in place on ``weight`` and ``state``; with ``zero_pruned`` the pruned weights are
    set to 0 first (:meth:`NMEngine.zero_pruned_ <bame_optim.optim.engine.NMEngine.
    zero_pruned_>`), in the same pass."""
    from bame_optim.kernels import ops

    m, count = group["m"], state["kept_count"]
    kept = engine.local_code(state)
    if weight.is_cuda:
        proposed, oscillation, norms = ops.evolve_blocks(
            weight, grad, kept, state.get("oscillation"), count, group["n"], m,
            float(group["lr"]), group["gamma"], group.get("revive_score", "sgd"), zero_pruned,
        )
        frozen = ops.obf_freeze(oscillation, norms, group["alpha"], group["beta"])
    else:  # the native passes directly: a custom op's dispatch costs more than a small pass
        proposed, oscillation, norms = evolve_cpu.evolve_blocks(
            weight, grad, kept, count, state.get("oscillation"), n=group["n"], m=m,
            lr=float(group["lr"]), gamma=group["gamma"],
            revive=group.get("revive_score", "sgd"), zero_pruned=zero_pruned,
        )
        frozen = evolve_cpu.obf_freeze(oscillation, norms, group["alpha"], group["beta"])
    engine.store_oscillation(weight, state, oscillation, m)
    state["last_flips"] = engine.apply_evolution(weight, state, proposed, frozen, m)
    state["last_frozen"] = int(torch.count_nonzero(frozen))
