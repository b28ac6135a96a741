"""Which parameters of a model are N:M sparse: :func:`nm_param_groups`."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from fnmatch import fnmatchcase
from typing import Any

from torch import nn

from bame_optim.core.nm import check_nm

__all__ = ["SPARSE_LAYER_TYPES", "default_exclude", "nm_param_groups"]

SPARSE_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""Layers whose ``weight`` is made N:M sparse: their dimension 1 is the input dimension
(transposed convolutions put output channels there, so they stay dense)."""


def default_exclude(model: nn.Module) -> list[str]:
    """Names of the layers the peers keep dense: the first sparse-able layer (the stem) and
    the last Linear layer (the classifier)."""
    layers = [
        (name, mod) for name, mod in model.named_modules() if isinstance(mod, SPARSE_LAYER_TYPES)
    ]
    if not layers:
        return []
    names = [layers[0][0]]
    linears = [name for name, mod in layers if isinstance(mod, nn.Linear)]
    if linears and linears[-1] not in names:
        names.append(linears[-1])
    return names


def _candidate_weights(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The ``[out, in, ...]`` weights of ``module`` that may be N:M sparse (dimension 1 is the
    input dimension), as ``(attribute name, parameter)`` pairs.

    * Linear / ConvNd: ``weight``.
    * :class:`torch.nn.MultiheadAttention`: the packed ``in_proj_weight`` ``[3E, E]`` when
      ``_qkv_same_embed_dim`` (the Q, K and V projections stacked along the output dimension,
      so every row is one projection's row over the ``E`` inputs, exactly a Linear weight),
      else the separate ``q_proj_weight`` / ``k_proj_weight`` / ``v_proj_weight``. Its
      ``out_proj`` is an ``nn.Linear`` and is handled as one.
    """
    if isinstance(module, SPARSE_LAYER_TYPES):
        return [("weight", module.weight)]
    if isinstance(module, nn.MultiheadAttention):
        if module._qkv_same_embed_dim:
            names = ("in_proj_weight",)
        else:
            names = ("q_proj_weight", "k_proj_weight", "v_proj_weight")
        found = [(name, getattr(module, name, None)) for name in names]
        return [(name, p) for name, p in found if isinstance(p, nn.Parameter)]
    return []


def nm_param_groups(
    model: nn.Module,
    n: int,
    m: int,
    exclude: Iterable[str] | str | None = None,
    no_decay_1d: bool = True,
) -> list[dict[str, Any]]:
    """Param groups for :class:`bame_optim.BAMESGD` with the peers' choice of sparse layers.

    Linear and Conv1d/2d/3d weights, and the input projections of
    :class:`torch.nn.MultiheadAttention` (``in_proj_weight``, ``[3E, E]``; see
    :func:`_candidate_weights`), are N:M sparse, except the excluded layers. Everything else
    is dense: biases and norm parameters (without weight decay when ``no_decay_1d``),
    embeddings, excluded layers, and weights whose input dimension does not divide by ``m``.

    Weights left dense for their shape: those whose input dimension is 1 (depthwise
    convolutions such as MobileNet-V2's, where a block could hold only one weight) are left
    dense silently, as no ``m`` could ever apply to them; every other weight whose input
    dimension does not divide by ``m`` is named, all together in **one** ``UserWarning``.

    Args:
        model: the model.
        n, m: the N:M pattern of the sparse group.
        exclude: module names (``fnmatch`` patterns such as ``"head.*"``) to keep dense.
            ``None`` keeps the stem and the classifier dense (:func:`default_exclude`);
            ``()`` makes every eligible layer sparse. A pattern that matches no module raises
            ``ValueError``, so typos do not pass silently.
        no_decay_1d: put parameters with ``ndim <= 1`` in a group with ``weight_decay=0``.

    Returns:
        Up to three groups (empty ones left out), each holding ``(name, parameter)`` pairs so
        that the optimizer records ``param_names``: ``{"sparse": True, "n": n, "m": m}``,
        ``{"sparse": False}`` and ``{"sparse": False, "weight_decay": 0.0}``.
    """
    check_nm(n, m)
    if exclude is None:
        patterns = default_exclude(model)
    else:
        patterns = [exclude] if isinstance(exclude, str) else list(exclude)
    module_names = [name for name, _ in model.named_modules()]
    for pattern in patterns:
        if not any(fnmatchcase(name, pattern) for name in module_names):
            raise ValueError(f"Invalid exclude value: {pattern!r} matches no module of the model")

    sparse_weights: dict[int, str] = {}
    indivisible: list[str] = []
    for name, module in model.named_modules():
        candidates = _candidate_weights(module)
        if not candidates or any(fnmatchcase(name, pattern) for pattern in patterns):
            continue
        for attribute, weight in candidates:
            full_name = f"{name}.{attribute}" if name else attribute
            if weight.ndim < 2 or weight.shape[1] == 1:
                continue  # depthwise: one input per group, never N:M
            if weight.shape[1] % m:
                indivisible.append(
                    f"{full_name} of shape {tuple(weight.shape)} stays dense "
                    f"(input dimension {weight.shape[1]})"
                )
                continue
            sparse_weights[id(weight)] = full_name
    if indivisible:
        warnings.warn(
            f"nm_param_groups: {len(indivisible)} weight(s) whose input dimension is not "
            f"divisible by m={m}: " + "; ".join(indivisible),
            UserWarning,
            stacklevel=2,
        )

    sparse, dense, no_decay = [], [], []
    for name, param in model.named_parameters():
        if id(param) in sparse_weights:
            sparse.append((name, param))
        elif no_decay_1d and param.ndim <= 1:
            no_decay.append((name, param))
        else:
            dense.append((name, param))
    groups = [
        {"params": sparse, "sparse": True, "n": n, "m": m},
        {"params": dense, "sparse": False},
        {"params": no_decay, "sparse": False, "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]
