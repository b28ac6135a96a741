"""The mask updates of a param group's sparse parameters on an update step.

:func:`update_masks` runs, for each sparse parameter, the mask rule of the current phase
(:class:`~bame_optim.optim.rules.MaskRules`) and applies its result through the engine
(:meth:`~bame_optim.optim.engine.NMEngine.apply_mask`); BAME's evolve rule runs through the
fused passes of :mod:`bame_optim.optim.fused_evolve` where they can, one run per group, equal
bit for bit. :func:`finalize_group` is ``finalize_masks()`` of one group. docs/design.md
sections 2-3 give the phases and the evolve update.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from bame_optim.core.evolution import magnitude_mask, obf_freeze, score_dtype
from bame_optim.core.nm import num_blocks, param_to_blocks
from bame_optim.core.schedule import Phase, phase
from bame_optim.optim.engine import NMEngine
from bame_optim.optim.fused_evolve import evolve_fused_many, fused_evolve_runs
from bame_optim.optim.rules import MaskContext, MaskRules, lma_obf
from bame_optim.optim.sharded import block_range, gather_blocks, is_sharded, local_tensor
from bame_optim.optim.sparsity import blocked
from bame_optim.optim.stacklevel import user_stacklevel

__all__ = ["finalize_group", "update_masks"]

Sparse = tuple[Tensor, dict[str, Any], int]
"""A sparse parameter, its state and its index over all param groups."""


def update_masks(
    engine: NMEngine, rules: MaskRules, group: dict[str, Any], sparse: list[Sparse], *,
    update: bool, reapply: bool, owner: str,
) -> None:
    """On an update step (``update``) the mask rule of every parameter of ``sparse``; on a
    step that re-applies the masks (``reapply``) its pruned weights set to 0 first, so that a
    weight the update revives restarts from 0 (docs/design.md section 4)."""
    m = group["m"]
    batch: list[Sparse] = []  # evolve updates, fused
    for p, state, index in sparse:
        fused = update and _evolves_fused(engine, rules, p, state, group)
        if reapply and not fused:  # (the fused passes set the pruned weights to 0 too)
            engine.zero_pruned_(blocked(p, group), state, m, fused=group.get("fused"))
        if fused:
            batch.append((p, state, index))
        elif update:
            _update_mask(engine, rules, p, state, group, index, owner)
    if batch:
        items = [(blocked(p, group), blocked(p.grad, group), state) for p, state, _ in batch]
        finite = evolve_fused_many(engine, items, group)
        for (p, _, index), ok in zip(batch, finite, strict=True):
            if not ok:
                _warn_non_finite(owner, p, index, group["step"])


def _evolves_fused(engine: NMEngine, rules: MaskRules, p: Tensor, state: dict[str, Any],
                   group: dict[str, Any]) -> bool:
    """Whether this update step's mask update of ``p`` is BAME's evolve rule run by the fused
    passes (``ValueError`` with ``fused=True`` where they cannot run)."""
    t, t_i, m = group["step"], group["t_i"], group["m"]
    current = phase(t, t_i, group["t_f"])
    if current is not Phase.EVOLVE or p.grad is None:
        return False
    rule = rules.rule_for(current, t_i, untouched=state["kept_count"] == m)
    return rule is lma_obf and fused_evolve_runs(
        engine, blocked(p, group), blocked(p.grad, group), state, group
    )


def _update_mask(engine: NMEngine, rules: MaskRules, p: Tensor, state: dict[str, Any],
                 group: dict[str, Any], index: int, owner: str) -> None:
    """The eager mask update of one parameter (the rule, then :meth:`NMEngine.apply_mask`)."""
    t, t_i, t_f, m = group["step"], group["t_i"], group["t_f"], group["m"]
    weight = blocked(p, group)
    current = phase(t, t_i, t_f)
    rule = rules.rule_for(current, t_i, untouched=state["kept_count"] == m)
    grad = None
    if current is Phase.EVOLVE:
        if p.grad is None:
            return
        if not _all_finite(p.grad):
            _warn_non_finite(owner, p, index, t)
            return
        grad = param_to_blocks(local_tensor(blocked(p.grad, group)), m)
    kept = engine.kept_mask(state, m)
    oscillation = None
    if current is Phase.EVOLVE and rules.tracks_oscillation():
        oscillation = engine.oscillation(weight, state, m, score_dtype(p.dtype))
    first, _ = block_range(weight, m)
    context = MaskContext(
        step=t, index=index, total_blocks=num_blocks(weight.shape, m), first_block=first,
        freeze=_sharded_freeze(p, group) if is_sharded(p) else None,
    )
    result = rule(param_to_blocks(local_tensor(weight), m), grad, kept, oscillation, group,
                  context)
    if result.oscillation is not None:
        engine.store_oscillation(weight, state, result.oscillation, m)
    changed = engine.apply_mask(weight, state, result.kept, result.count, m)
    state["last_flips"] = int(torch.count_nonzero(changed))
    frozen = result.frozen
    state["last_frozen"] = 0 if frozen is None else int(torch.count_nonzero(frozen))


def finalize_group(engine: NMEngine, group: dict[str, Any], sparse: list[tuple[Tensor, dict]]
                   ) -> None:
    """Prune the sparse parameters of ``group`` (``(p, state)``) to their ``n`` largest
    ``|W|`` per block now and fix the masks from this step on (``t_i = t_f`` = the step)."""
    m, n = group["m"], group["n"]
    for p, state in sparse:
        weight = blocked(p, group)
        if not engine.initialised(state):
            engine.initialise(weight, state, m)
        kept = engine.kept_mask(state, m)
        new = magnitude_mask(param_to_blocks(local_tensor(weight), m), kept, n)
        changed = engine.apply_mask(weight, state, new, n, m)
        engine.zero_pruned_(weight, state, m, fused=group.get("fused"))
        state.pop("oscillation", None)
        state["last_flips"], state["last_frozen"] = int(torch.count_nonzero(changed)), 0
    if sparse:
        group["t_i"] = group["t_f"] = group["step"]


def _warn_non_finite(owner: str, p: Tensor, index: int, t: int) -> None:
    warnings.warn(
        f"{owner}: the gradient of parameter {index} (shape {tuple(p.shape)}) has NaN or Inf "
        f"at step {t}; its mask update is skipped for this step",
        RuntimeWarning,
        stacklevel=user_stacklevel(),
    )


def _all_finite(tensor: Tensor) -> bool:
    # A finite sum proves every entry finite (NaN and inf make the sum NaN or inf) in one
    # reduction without a bool copy; a non-finite sum may be an overflow of finite values, so
    # then every entry is checked.
    total = tensor.sum()
    if bool((total.full_tensor() if is_sharded(total) else total).isfinite()):
        return True
    finite = tensor.isfinite().all()
    return bool(finite.full_tensor() if is_sharded(finite) else finite)


def _sharded_freeze(p: Tensor, group: dict[str, Any]) -> Callable[[Tensor, Tensor], Tensor]:
    """OBF (Eq. 10) for one shard: rank the blocks of all shards, keep this rank's."""
    m = group["m"]
    first, count = block_range(p, m)

    def freeze(oscillation: Tensor, norms: Tensor) -> Tensor:
        whole = obf_freeze(
            gather_blocks(oscillation, p, m), gather_blocks(norms, p, m), group["alpha"],
            group["beta"],
        )
        return whole[first : first + count]

    return freeze
