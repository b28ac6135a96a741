"""Moving optimizer state between a dense ``torch.optim`` run and a BAME run.

* :func:`torch_state_dict` (``opt.torch_state_dict()``): the state of a BAME optimizer as the
  dense optimizer it replaces (:attr:`MaskedOptimizer.dense_class
  <bame_optim.optim.masked.MaskedOptimizer.dense_class>`: :class:`torch.optim.SGD` for
  :class:`~bame_optim.BAMESGD`, :class:`torch.optim.AdamW` for :class:`~bame_optim.BAMEAdamW`)
  over the same param groups would hold it: buffers in the parameter's layout, zeros at pruned
  entries, no masks, no schedule.
* :func:`load_dense_state_dict` (``opt.load_dense_state_dict(state_dict, params)``): start a
  BAME run from a dense optimizer's checkpoint whose param groups differ from this optimizer's
  (the usual ``torch.optim.SGD(model.parameters())`` against ``nm_param_groups(model, ...)``):
  the parameters are matched by the order the dense optimizer was given them.

A BAME ``state_dict()`` itself is not a torch one: a sparse parameter's buffers are compact
(``[K, kept_count]``) and its mask is an integer code, so ``torch.optim.SGD.load_state_dict``
accepts it and fails at its first ``step()``; use :func:`torch_state_dict`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from bame_optim.optim.sharded import is_sharded

if TYPE_CHECKING:
    from bame_optim.optim.masked import MaskedOptimizer

__all__ = ["check_not_cast", "load_dense_state_dict", "torch_state_dict"]

ENGINE_KEYS = frozenset({"kept", "kept_count", "oscillation", "last_flips", "last_frozen"})
"""Per-parameter state of the engine that a dense optimizer does not have."""


def torch_state_dict(opt: MaskedOptimizer) -> dict[str, Any]:
    """The state dict of ``opt.dense_class`` over ``opt``'s param groups, in its layout.

    Each group holds the dense optimizer's keys only (those of ``opt``'s update rule, the
    others at the dense class's defaults; BAME's ``n``, ``m``, schedule and step counter
    are left out). Each parameter's state is the dense optimizer's: for a sparse parameter
    every buffer in the parameter's layout with zeros at pruned entries (``AdamW``'s ``step``
    as it is), for a dense one its state as it is. The tensors are copies for sparse
    parameters and the optimizer's own tensors otherwise, as ``state_dict()`` gives them.

    Raises ``TypeError`` for an optimizer without a ``dense_class`` and ``ValueError`` for a
    sharded (FSDP2) sparse parameter (its dense buffers would be this rank's rows only).
    """
    dense_class = type(opt).dense_class
    if dense_class is None:
        raise TypeError(f"Invalid optimizer: {type(opt).__name__} has no dense torch counterpart")
    engine = opt.engine
    state: dict[int, dict[str, Any]] = {}
    groups = []
    index = 0
    for group in opt.param_groups:
        ids = []
        for p in group["params"]:
            ids.append(index)
            saved = opt.state.get(p)
            if saved and engine.initialised(saved):
                if is_sharded(p):
                    raise ValueError(f"Invalid parameter {index}: torch_state_dict() does not "
                                     "support sharded (FSDP2) sparse parameters")
                dense = {k: v for k, v in saved.items()
                         if k not in ENGINE_KEYS and k not in engine.buffers}
                for name in engine.buffers:
                    buffer = opt._dense_view(p, name)  # the parameter's layout (any nm_dim)
                    if buffer is not None:
                        dense[name] = buffer
                state[index] = dense
            elif saved:
                state[index] = dict(saved)
            index += 1
        groups.append(_dense_group(dense_class, opt, group) | {"params": ids})
    return {"state": state, "param_groups": groups}


def _dense_group(dense_class: type, opt: MaskedOptimizer, group: dict[str, Any]
                 ) -> dict[str, Any]:
    """``group``'s hyper-parameters as ``dense_class`` holds them, without ``params``."""
    keywords = {k: group[k] for k in opt.update_rule.defaults if k in group and k != "fused"}
    probe = dense_class([torch.zeros(1, requires_grad=True)], **keywords).param_groups[0]
    dense = {k: v for k, v in probe.items() if k != "params"}
    dense.update(keywords)  # the group's own objects (a Tensor lr stays that Tensor)
    if "param_names" in group:
        dense["param_names"] = group["param_names"]
    return dense


def load_dense_state_dict(
    opt: MaskedOptimizer, state_dict: dict[str, Any], params: Iterable[Tensor]
) -> None:
    """Start ``opt`` from the checkpoint of a dense optimizer over ``params``.

    ``state_dict`` is a ``torch.optim.SGD`` / ``AdamW`` (or any optimizer with the same
    per-parameter state) ``state_dict()``; ``params`` are the parameters that optimizer was
    built over, in its order (``model.parameters()`` for ``SGD(model.parameters())``;
    for several groups, their parameters one group after the other). Its groups may differ
    from ``opt``'s: each parameter's state goes to that parameter wherever ``opt`` holds it.
    ``opt`` keeps its own param groups (hyper-parameters, schedule, step counter); sparse
    parameters start with every weight kept and their buffers compacted, as
    ``opt.load_state_dict`` does with a dense state dict of the same groups.

    Raises ``ValueError`` when the checkpoint and ``params`` hold different numbers of
    parameters, when ``opt`` does not hold one of ``params`` or holds a parameter that
    ``params`` lacks, or when a state tensor's shape differs from its parameter's.
    """
    params = list(params)
    saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
    if len(saved_ids) != len(params):
        raise ValueError(
            f"Invalid params: the checkpoint holds {len(saved_ids)} parameters and params "
            f"gives {len(params)} (pass the parameters the dense optimizer was built over, in "
            "its order, e.g. model.parameters())"
        )
    ours = [p for group in opt.param_groups for p in group["params"]]
    position = {id(p): i for i, p in enumerate(ours)}
    state: dict[int, dict[str, Any]] = {}
    for saved_id, p in zip(saved_ids, params, strict=True):
        where = position.get(id(p))
        if where is None:
            raise ValueError(f"Invalid params: parameter {len(state)} of shape "
                             f"{tuple(p.shape)} is not in {type(opt).__name__}")
        entry = state_dict["state"].get(saved_id, {})
        for key, value in entry.items():
            if isinstance(value, Tensor) and value.ndim > 0 and value.shape != p.shape:
                raise ValueError(
                    f"Invalid state for parameter {saved_id}: its {key} has shape "
                    f"{tuple(value.shape)} but the parameter has shape {tuple(p.shape)} (the "
                    "checkpoint was made over other parameters, or is not a dense one)"
                )
        state[where] = entry
    missing = sorted(set(range(len(ours))) - {position[id(p)] for p in params})
    if missing:
        raise ValueError(f"Invalid params: {type(opt).__name__} holds parameters {missing} "
                         "that params lacks (it must give every parameter of the dense run)")
    index = 0
    groups = []
    for group in opt.param_groups:
        count = len(group["params"])
        groups.append({k: v for k, v in group.items() if k != "params"}
                      | {"params": list(range(index, index + count))})
        index += count
    opt.load_state_dict({"state": state, "param_groups": groups})


def check_not_cast(state: dict[str, Any], p: Tensor) -> None:
    """``ValueError`` if the mask codes in a loaded ``state`` are floating point: the state
    went through a ``torch.optim`` optimizer's ``load_state_dict``, which casts them (and
    whose ``step()`` cannot use a BAME state)."""
    code = state.get("kept")
    if isinstance(code, Tensor) and code.is_floating_point():
        raise ValueError(
            f"Invalid state for the parameter of shape {tuple(p.shape)}: its mask codes (kept) "
            f"are {code.dtype}, so the state went through a torch.optim optimizer's "
            "load_state_dict (which casts them) and its masks are lost. A BAME state_dict() "
            "is not a torch one: move state to torch.optim with opt.torch_state_dict(), and "
            "back with "
            "opt.load_dense_state_dict(state_dict, params)"
        )
