"""Which parameters of a param group are N:M sparse, and how their blocks lie.

A group's ``sparse`` is ``True`` (every parameter must be N:M-divisible), ``False`` (dense) or
``None`` (sparse when floating, strided, ``ndim >= 2`` and the input dimension divides by
``m``); its ``nm_dim`` is the weights' input dimension (docs/design.md section 5,
"Construction"). The checks here raise ``ValueError`` naming the value; the warnings point at
the user's call.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from bame_optim.core.nm import GROUPED_DIM, NM_DIMS, check_nm, nm_layout, num_blocks
from bame_optim.optim.sharded import is_sharded
from bame_optim.optim.stacklevel import user_stacklevel

__all__ = [
    "blocked",
    "check_sparse_group",
    "check_sparse_params",
    "is_sparse",
    "pattern_name",
    "warn_about_sparse_choice",
]


def is_sparse(p: Tensor, group: dict[str, Any]) -> bool:
    """Whether ``p`` is N:M sparse in ``group`` (its ``sparse``, or the automatic rule)."""
    if group["sparse"] is not None:
        return bool(group["sparse"])
    nm_dim = group["nm_dim"]
    return (
        p.ndim >= 2
        and (nm_dim == GROUPED_DIM or p.ndim == 2)
        and p.is_floating_point()
        and p.layout == torch.strided
        and p.shape[nm_dim] % group["m"] == 0
    )


def blocked(tensor: Tensor, group: dict[str, Any]) -> Tensor:
    """A parameter-shaped ``tensor`` (the parameter, its gradient or a dense buffer) in the
    layout the engine works in: its group's ``nm_dim`` moved to dimension 1
    (:func:`bame_optim.core.nm.nm_layout`); the tensor itself for ``nm_dim == 1``."""
    return nm_layout(tensor, group["nm_dim"])


def pattern_name(n: int, m: int, nm_dim: int) -> str:
    """``"2:4"``, or ``"2:4 along dimension 0"``."""
    return f"{n}:{m}" + ("" if nm_dim == GROUPED_DIM else f" along dimension {nm_dim}")


def check_sparse_group(group: dict[str, Any], owner: str, *, blocks_along_dim0: bool) -> None:
    """``ValueError`` naming a bad ``n``, ``m``, ``sparse`` or ``nm_dim`` of a new group
    (``nm_dim = 0`` only for plain 2-D parameters, and only where ``blocks_along_dim0``)."""
    check_nm(group["n"], group["m"])
    if group["sparse"] not in (None, True, False):
        raise ValueError(f"Invalid sparse value: {group['sparse']!r} (True, False or None)")
    nm_dim = group["nm_dim"]
    if isinstance(nm_dim, bool) or nm_dim not in NM_DIMS:
        raise ValueError(f"Invalid nm_dim value: {nm_dim!r} (1: [out, in, ...] weights such as "
                         "nn.Linear; 0: [in, out] weights such as Hugging Face Conv1D)")
    if nm_dim != 0 or group["sparse"] is False:
        return
    for p in group["params"]:  # FSDP2 shards rows: blocks along dimension 0 would cross them
        if is_sharded(p):
            raise ValueError(
                f"Invalid nm_dim value: 0 for a sharded (FSDP2) parameter of shape "
                f"{tuple(p.shape)}: its blocks would cross the row shards"
            )
    if not blocks_along_dim0:
        raise ValueError(
            f"Invalid nm_dim value: 0 ({owner} keeps its masks along dimension 1 only; "
            "[in, out] weights such as Hugging Face Conv1D train with BAMESGD, BAMEAdamW, "
            "RigLSGD or ASPSGD)"
        )


def check_sparse_params(group: dict[str, Any]) -> None:
    """``ValueError`` naming a parameter of a ``sparse=True`` group that cannot be N:M."""
    if not group["sparse"]:
        return
    for p in group["params"]:
        if not p.is_floating_point() or p.layout != torch.strided:
            raise ValueError(
                f"Invalid sparse parameter of shape {tuple(p.shape)}, dtype {p.dtype}, layout "
                f"{p.layout}: N:M masks need a dense floating-point tensor"
            )
        num_blocks(nm_layout(p, group["nm_dim"]).shape, group["m"])


def warn_about_sparse_choice(owner: str, groups: Sequence[dict[str, Any]],
                             sparse_default: bool | None) -> None:
    """Warn at construction when no parameter is sparse (the optimizer would train dense;
    not when the constructor was given ``sparse=False``), or when ``sparse=None`` made 2-D
    parameters sparse by their shape alone (docs/design.md section 5)."""
    if sparse_default is False:
        return  # asked to train dense
    if not any(is_sparse(p, g) for g in groups for p in g["params"]):
        if all(g["sparse"] is False for g in groups):
            why = "every param group has sparse=False"
        elif all(not g["params"] for g in groups if g["sparse"] is not False):
            why = "the groups marked sparse hold no parameter"
        else:
            why = ("sparse=None found no floating parameter with ndim >= 2 whose input "
                   "dimension divides by m=" + "/".join(sorted(
                       {str(g["m"]) for g in groups if g["sparse"] is None})))
        warnings.warn(
            f"{owner}: no parameter is N:M sparse ({why}), so it trains dense; "
            "nm_param_groups(model, n, m) chooses the sparse layers of a model",
            UserWarning,
            stacklevel=user_stacklevel(),
        )
        return
    guessed = [
        (g, j) for g in groups if g["sparse"] is None
        for j, p in enumerate(g["params"]) if p.ndim == 2 and is_sparse(p, g)
    ]
    if guessed:
        group, j = guessed[0]
        names = group.get("param_names")
        example = names[j] if names else f"shape {tuple(group['params'][j].shape)}"
        warnings.warn(
            f"{owner}: sparse=None made {len(guessed)} 2-D parameter(s) "
            f"N:M along dimension {group['nm_dim']} by shape alone (e.g. {example}). A "
            "tensor does not say which layer it belongs to: an embedding or LM head would "
            "be pruned like a Linear weight, and an [in, out] weight (Hugging Face Conv1D, "
            "e.g. GPT-2) along its output dimension. nm_param_groups(model, n, m) chooses "
            "by layer and axis (and silences this warning)",
            UserWarning,
            stacklevel=user_stacklevel(),
        )
