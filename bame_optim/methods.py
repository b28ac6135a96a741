"""Every method of the paper's comparison under one constructor, for honest side-by-side runs.

``make_optimizer(method, params, **kwargs)`` takes :class:`bame_optim.BAMESGD`'s keywords for
every method; what a method fixes (``static`` has no gradual phase, ``lma`` no OBF) is set here
and may not be contradicted by the caller.

==============  ==================================================================  =========
method          what it is                                                          paper
==============  ==================================================================  =========
``dense``       :class:`torch.optim.SGD`, no sparsity                               baseline
``static``      random N:M mask at step 0, never changed                            Table 4
``rigl``        RigL inside N:M blocks (:mod:`bame_optim.optim.rigl`)               Table 4
``lma``         BAME without OBF (``alpha = 0``)                                    Table 4
``bame``        LMA + OBF (:class:`bame_optim.BAMESGD`)                             Tables 1-4
``bame_bidir``  BAME with bidirectional masks (:mod:`bame_optim.peers.bidir`)       BAME†
``srste``       SR-STE (:mod:`bame_optim.peers.srste`)                              Tables 1-2
``lbc``         LBC (:mod:`bame_optim.peers.lbc`)                                   Tables 1-2
``asp``         fixed-mask fine-tuning after magnitude pruning                      Table 1
==============  ==================================================================  =========
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from bame_optim.optim.asp import ASPSGD
from bame_optim.optim.bame_sgd import BAMESGD
from bame_optim.optim.rigl import RigLSGD
from bame_optim.peers.bidir import BidirBAMESGD
from bame_optim.peers.lbc import LBCSGD
from bame_optim.peers.srste import SRSTESGD

__all__ = ["METHODS", "SGD_KEYWORDS", "fixed_settings", "make_optimizer"]

_CLASSES: dict[str, type[Optimizer]] = {
    "dense": torch.optim.SGD,
    "static": BAMESGD,
    "rigl": RigLSGD,
    "lma": BAMESGD,
    "bame": BAMESGD,
    "bame_bidir": BidirBAMESGD,
    "srste": SRSTESGD,
    "lbc": LBCSGD,
    "asp": ASPSGD,
}
_FIXED: dict[str, dict[str, Any]] = {
    "static": {"t_i": 0, "t_f": 0},
    "lma": {"alpha": 0.0},
}
METHODS: tuple[str, ...] = tuple(_CLASSES)
SGD_KEYWORDS = frozenset(
    {"lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize", "foreach"}
)
"""The keywords ``dense`` keeps; the N:M ones are dropped for it."""


def fixed_settings(method: str) -> dict[str, Any]:
    """The keywords ``method`` fixes (``static``: no gradual phase; ``lma``: no OBF)."""
    return dict(_FIXED.get(method, {}))


def make_optimizer(
    method: str, params: Iterable[Tensor] | Iterable[dict[str, Any]], **kwargs: Any
) -> Optimizer:
    """The optimizer of ``method`` over ``params`` (see the module table).

    For ``dense``, N:M group keys (``sparse``, ``n``, ``m``, ...) in param groups and keywords
    are dropped so the same groups and keywords can drive every method.
    """
    if method not in _CLASSES:
        raise ValueError(f"Invalid method value: {method!r} (one of {', '.join(METHODS)})")
    if method == "dense":
        groups = [
            {k: v for k, v in g.items() if k in SGD_KEYWORDS or k in ("params", "param_names")}
            if isinstance(g, dict)
            else g
            for g in params
        ]
        return torch.optim.SGD(groups, **{k: v for k, v in kwargs.items() if k in SGD_KEYWORDS})
    for key, value in _FIXED.get(method, {}).items():
        if key in kwargs and kwargs[key] != value:
            raise ValueError(f"Invalid {key} value: {kwargs[key]!r} ({method} fixes {key}={value})")
        kwargs[key] = value
    return _CLASSES[method](params, **kwargs)
