"""What an N:M optimizer reports about its masks: the rows of ``sparsity_report()``, the
``check_nm()`` verdict, the schedule summary and the warnings of an unfinished schedule.

Functions of an optimizer (:class:`~bame_optim.optim.base.NMOptimizer`; the schedule ones of a
:class:`~bame_optim.optim.masked.MaskedOptimizer`), which calls them from its public methods
of the same names (docs/design.md section 5, "State of a sparse parameter" and "The end of
training").
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

from bame_optim.core.nm import is_nm_sparse, nm_layout, num_blocks
from bame_optim.core.schedule import describe_schedule
from bame_optim.optim.sharded import local_tensor
from bame_optim.optim.sparsity import is_sparse
from bame_optim.optim.stacklevel import user_stacklevel

if TYPE_CHECKING:
    from bame_optim.optim.base import NMOptimizer

__all__ = ["check_finished", "check_nm", "schedule_summary", "sparsity_report",
           "warn_past_total_steps"]

_COUNT_ADVICE = ("total_steps counts optimizer steps (with gradient accumulation, "
                 "len(loader) // accumulation per epoch); call finalize_masks() to prune to N:M "
                 "now")


def sparsity_report(opt: NMOptimizer) -> list[dict[str, Any]]:
    """The rows of :meth:`NMOptimizer.sparsity_report
    <bame_optim.optim.base.NMOptimizer.sparsity_report>`, one per parameter."""
    rows = []
    for g, group in enumerate(opt.param_groups):
        names = group.get("param_names")
        for j, p in enumerate(group["params"]):
            sparse = is_sparse(p, group)
            state = opt.state.get(p, {})
            mask = opt.kept_mask(p) if sparse else None
            rows.append({
                "name": names[j] if names else f"group{g}.param{j}",
                "group": g,
                "shape": tuple(p.shape),
                "sparse": sparse,
                "n": group["n"] if sparse else None,
                "m": group["m"] if sparse else None,
                "step": group["step"],
                "phase": opt.phase_name(group),
                "density": float(mask.float().mean()) if mask is not None else 1.0,
                "nm_valid": is_nm_sparse(
                    nm_layout(local_tensor(p).detach(), group["nm_dim"]), group["n"],
                    group["m"],
                )
                if sparse
                else None,
                "flips": state.get("last_flips", 0),
                "frozen_blocks": state.get("last_frozen", 0),
                "blocks": num_blocks(nm_layout(p, group["nm_dim"]).shape, group["m"])
                if sparse else None,
                "nm_dim": group["nm_dim"] if sparse else None,
            })
    return rows


def check_nm(opt: NMOptimizer) -> list[str]:
    """The names of the sparse parameters checked; ``RuntimeError`` when there is none or
    one is not N:M (:meth:`NMOptimizer.check_nm <bame_optim.optim.base.NMOptimizer.check_nm>`)."""
    owner = type(opt).__name__
    rows = [row for row in opt.sparsity_report() if row["sparse"]]
    checked = [row["name"] for row in rows]
    broken = [f"{row['name']} {row['shape']} (phase {row['phase']!r} at step {row['step']})"
              for row in rows if not row["nm_valid"]]
    if not checked:
        raise RuntimeError(
            f"{owner}.check_nm: no parameter is N:M sparse, so there is nothing to check "
            "(every group is dense; see nm_param_groups)"
        )
    if broken:
        raise RuntimeError(
            f"{owner}.check_nm: {len(broken)} of {len(checked)} sparse parameter(s) are not "
            f"N:M: " + "; ".join(broken) + ". Before t_i the masks keep more than n per block: "
            "finalize_masks() prunes to N:M now"
        )
    return checked


def schedule_summary(opt: NMOptimizer) -> str:
    """One line: per group with sparse parameters, its N:M pattern, the steps of each phase
    and the number of mask updates in the gradual and evolve phases."""
    parts = []
    for index, group in enumerate(opt.param_groups):
        if not any(is_sparse(p, group) for p in group["params"]):
            continue
        parts.append(f"group {index} " + describe_schedule(
            group["n"], group["m"], group["t_i"], group["t_f"], group["delta_t"],
            group.get("total_steps"),
        ))
    return f"{type(opt).__name__}: " + ("; ".join(parts) or "no sparse parameters")


def check_finished(opt: NMOptimizer) -> bool:
    """``True`` when every sparse parameter keeps exactly ``n`` per block; otherwise a
    ``UserWarning`` per unfinished group (its step, ``t_i``, ``total_steps`` and what its
    blocks keep) and ``False``."""
    finished = True
    for index, group in enumerate(opt.param_groups):
        counts = [opt.state.get(p, {}).get("kept_count", group["m"])
                  for p in group["params"] if is_sparse(p, group)]
        if not counts or max(counts) <= group["n"]:
            continue
        finished = False
        warnings.warn(
            f"{type(opt).__name__}: training ended at step {group['step']}, before t_i="
            f"{group['t_i']} (total_steps={group.get('total_steps')}): param group {index} "
            f"still keeps up to {max(counts)} of {group['m']} weights per block, so the model "
            f"is not {group['n']}:{group['m']}. " + _COUNT_ADVICE,
            UserWarning,
            stacklevel=user_stacklevel(),
        )
    return finished


def warn_past_total_steps(opt: NMOptimizer, group: dict[str, Any]) -> None:
    """Warn when a ``step()`` of ``group`` ran past its ``total_steps`` while its masks still
    keep more than ``n`` per block (the schedule has not reached ``t_i``)."""
    total = group.get("total_steps")
    if total is None or group["step"] < total:
        return
    if any(opt.state.get(p, {}).get("kept_count", 0) > group["n"] for p in group["params"]):
        warnings.warn(
            f"{type(opt).__name__}: step() ran past total_steps={total} while the masks "
            f"still keep more than {group['n']} of {group['m']} weights per block (the "
            "schedule has not reached t_i): the model is not N:M. " + _COUNT_ADVICE,
            UserWarning,
            stacklevel=user_stacklevel(),
        )
