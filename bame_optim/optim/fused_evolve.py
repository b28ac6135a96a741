"""BAME's evolve-phase mask updates of a group's parameters through the fused passes (issue 19).

:func:`evolve_fused_many` is the update :func:`bame_optim.optim.rules.lma_obf` and
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

__all__ = ["evolve_fused_many", "fused_evolve_runs"]


def fused_evolve_runs(
    engine: NMEngine, weight: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any]
) -> bool:
    """Whether :func:`evolve_fused_many` runs for this parameter (``weight``, ``grad`` in the block
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
        supported = evolve_cpu.supports(*args)
        ok = supported and evolve_cpu.available()
        reason = (f"the fused evolve CPU passes are unavailable ({evolve_cpu.error()})"
                  if supported else "the fused evolve CPU passes do not support these tensors "
                  "(see bame_optim.kernels.evolve_cpu.supports)")
    if fused and not ok:
        raise ValueError(
            f"Invalid fused value: True for a parameter of shape {tuple(weight.shape)} "
            f"({weight.dtype} on {weight.device}, strides {weight.stride()}): {reason}"
        )
    return ok


def evolve_fused_many(
    engine: NMEngine,
    items: list[tuple[Tensor, Tensor, dict[str, Any]]],
    group: dict[str, Any],
) -> list[bool]:
    """The LMA + OBF updates (Eq. 4-10) of parameters of ``group`` for which
    :func:`fused_evolve_runs` holds, ``items`` of ``(weight, grad, state)`` (block layout), in
    place on the weights and states: first every pruned weight set to 0
    (:meth:`NMEngine.zero_pruned_ <bame_optim.optim.engine.NMEngine.zero_pruned_>`), then
    the update, for each parameter whose gradient is finite. Returns, per item, whether it was
    (a parameter with NaN or inf in its gradient keeps its mask, as the eager rule does). On
    the CPU each pass is one native call for all items."""
    if not items:
        return []
    devices = [weight.device for weight, _, _ in items]
    if len(set(devices)) > 1:  # one run per device
        finite = [False] * len(items)
        for device in dict.fromkeys(devices):
            where = [i for i, d in enumerate(devices) if d == device]
            for i, ok in zip(where, evolve_fused_many(engine, [items[i] for i in where], group),
                             strict=True):
                finite[i] = ok
        return finite
    m, n = group["m"], group["n"]
    weights, grads, states = (list(column) for column in zip(*items, strict=True))
    hyper = dict(n=n, m=m, lr=float(group["lr"]), gamma=group["gamma"],
                 revive=group.get("revive_score", "sgd"))
    kept = [engine.local_code(state) for state in states]
    counts = [state["kept_count"] for state in states]
    oscillations = [state.get("oscillation") for state in states]
    if weights[0].is_cuda:
        results, finite = _evolve_cuda(engine, weights, grads, kept, counts, oscillations,
                                       states, hyper)
        done = [i for i, ok in enumerate(finite) if ok]
        from bame_optim.kernels import ops

        frozen = [ops.obf_freeze(results[i][1], results[i][2], group["alpha"], group["beta"])
                  for i in done]
    else:
        results, finite = evolve_cpu.evolve_blocks_many(
            weights, grads, kept, counts, oscillations, zero_pruned=True, **hyper)
        done = [i for i, ok in enumerate(finite) if ok]
        frozen = evolve_cpu.obf_freeze_many([results[i][1] for i in done],
                                            [results[i][2] for i in done], group["alpha"],
                                            group["beta"])
    flips = engine.apply_evolution([weights[i] for i in done], [states[i] for i in done],
                                   [results[i][0] for i in done], frozen, m)
    for i, flipped, blocks in zip(done, flips, frozen, strict=True):
        engine.store_oscillation(weights[i], states[i], results[i][1], m)
        states[i]["last_flips"] = flipped
        states[i]["last_frozen"] = int(torch.count_nonzero(blocks))
    return finite


def _evolve_cuda(engine, weights, grads, kept, counts, oscillations, states, hyper):
    """Pass 1 on CUDA, one parameter at a time (``bame_optim::evolve_blocks``); a parameter
    with a non-finite gradient only has its pruned weights set to 0."""
    from bame_optim.kernels import ops

    results, finite = [], []
    for weight, grad, codes, count, oscillation, state in zip(
        weights, grads, kept, counts, oscillations, states, strict=True
    ):
        ok = bool(torch.isfinite(grad).all())
        finite.append(ok)
        if not ok:
            engine.zero_pruned_(weight, state, hyper["m"])
            results.append(None)
            continue
        results.append(ops.evolve_blocks(weight, grad, codes, oscillation, count, hyper["n"],
                                         hyper["m"], hyper["lr"], hyper["gamma"],
                                         hyper["revive"], True))
    return results, finite
