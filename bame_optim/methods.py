"""The one registry of the methods of the paper's comparison, for honest side-by-side runs.

Each :class:`Method` record holds everything the rest of the package needs to know about a
method: its optimizer factory, the settings it fixes, its training-FLOPs profile
(:mod:`bame_optim.flops`), whether its masks change only on scheduled update steps (the
mask-oscillation telemetry), and the model attachment it needs (the bidirectional backward
masks). :func:`make_optimizer`, :mod:`bame_optim.flops`, the training scripts and the
benchmarks read it; each name is written here once.

==============  ==================================================================  ==========
method          what it is                                                          paper
==============  ==================================================================  ==========
``dense``       :class:`torch.optim.SGD`, no sparsity                               baseline
``static``      random N:M mask at step 0, never changed                            Table 4
``rigl``        RigL inside N:M blocks (:func:`bame_optim.optim.rules.rigl`)        Table 4
``lma``         BAME without OBF (``alpha = 0``)                                    Table 4
``bame``        LMA + OBF (:class:`bame_optim.BAMESGD`)                             Tables 1-4
``bame_bidir``  BAME with bidirectional masks (:mod:`bame_optim.peers.bidir`)       BAME†
``srste``       SR-STE (:mod:`bame_optim.peers.srste`)                              Tables 1-2
``lbc``         LBC (:mod:`bame_optim.peers.lbc`)                                   Tables 1-2
``maxq``        MaxQ (:mod:`bame_optim.peers.maxq`)                                 Table 2
``asp``         fixed-mask fine-tuning after one-shot magnitude pruning             Table 1
==============  ==================================================================  ==========

AdamW variants, for the transformers that train with it (``optimizer="adamw"``):
``dense_adamw`` (:class:`torch.optim.AdamW`), ``static_adamw`` and ``bame_adamw``
(:class:`bame_optim.BAMEAdamW`). :func:`method_name` maps a method and an optimizer to the
registered name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from bame_optim.optim.adamw import ADAMW_DEFAULTS, BAMEAdamW
from bame_optim.optim.base import SGD_DEFAULTS
from bame_optim.optim.sgd import ASPSGD, BAMESGD, RigLSGD
from bame_optim.peers.bidir import BidirBAMESGD, attach_backward_masks
from bame_optim.peers.lbc import LBCSGD
from bame_optim.peers.maxq import MaxQSGD
from bame_optim.peers.srste import SRSTESGD

__all__ = [
    "ADAMW_KEYWORDS",
    "CONTEXT_KEYWORDS",
    "METHODS",
    "OPTIMIZERS",
    "SGD_KEYWORDS",
    "FlopsProfile",
    "Method",
    "accepted_keywords",
    "fixed_settings",
    "get_method",
    "inert_keywords",
    "make_optimizer",
    "method_name",
]

SGD_KEYWORDS = frozenset(SGD_DEFAULTS)
"""The keywords of :class:`torch.optim.SGD` that every SGD method takes."""
ADAMW_KEYWORDS = frozenset(ADAMW_DEFAULTS)
"""The keywords of :class:`torch.optim.AdamW` that every AdamW method takes."""
OPTIMIZERS = ("sgd", "adamw")
"""The update rules a method may use (:attr:`Method.optimizer`)."""
_TORCH_KEYWORDS = {
    torch.optim.SGD: SGD_KEYWORDS | {"fused", "differentiable"},
    torch.optim.AdamW: ADAMW_KEYWORDS | {"fused", "differentiable", "capturable"},
}
CONTEXT_KEYWORDS = frozenset({"n", "m", "total_steps", "t_i", "t_f", "delta_t", "seed"})
"""Keywords that describe the run (its N:M pattern, schedule and seed) rather than the method:
:func:`make_optimizer` drops them for a method that does not take them (``dense`` has no N:M
pattern, ``srste`` no schedule)."""


class FlopsProfile(str, Enum):
    """A training-FLOPs profile: the densities of a sparse layer's forward, input-gradient and
    weight-gradient products at each step (docs/flops.md; :mod:`bame_optim.flops` sums them).
    Each method of :data:`METHODS` names one; ``BIMASK`` and ``LBC_LOWER`` have no optimizer."""

    DENSE = "dense"
    FIXED = "fixed"  # static
    SCHEDULED = "scheduled"  # bame, lma, rigl
    SCHEDULED_BIDIR = "scheduled_bidir"  # bame_bidir
    STE = "ste"  # srste
    MAXQ = "maxq"  # STE with the incremental ramp's dense blocks in the forward
    BIMASK = "bimask"  # Bi-Mask (the paper's comparison; no optimizer here)
    LBC = "lbc"  # union of the remaining combinations at its largest (upper bound)
    LBC_LOWER = "lbc_lower"  # ... at its smallest (no optimizer of its own)
    PRETRAIN_FIXED = "pretrain_fixed"  # asp


@dataclass(frozen=True)
class Method:
    """One method of the comparison."""

    name: str
    factory: Callable[..., Optimizer]
    """Builds the optimizer from param groups and keywords."""
    summary: str
    flops: FlopsProfile
    """Its training-FLOPs profile (:class:`FlopsProfile`, summed by :mod:`bame_optim.flops`)."""
    fixed: Mapping[str, Any] = field(default_factory=dict)
    """Keywords the method fixes; a caller may not contradict them."""
    scheduled_masks: bool = True
    """Masks change only on the schedule's update steps (else possibly at every step)."""
    attach: Callable[[nn.Module, Optimizer], Any] | None = None
    """What the model needs from the optimizer (``attach(model, optimizer)``), if anything."""
    optimizer: str = "sgd"
    """The update rule on the (kept) weights: ``"sgd"`` or ``"adamw"``."""


def _register(*methods: Method) -> Mapping[str, Method]:
    return MappingProxyType({method.name: method for method in methods})


METHODS: Mapping[str, Method] = _register(
    Method("dense", torch.optim.SGD, "torch.optim.SGD, no sparsity", FlopsProfile.DENSE),
    Method("static", BAMESGD, "random N:M mask at step 0, never changed", FlopsProfile.FIXED,
           fixed={"t_i": 0, "t_f": 0}),
    Method("rigl", RigLSGD, "RigL inside N:M blocks: annealed layer-wise drop of the smallest "
           "|W|, per-block regrowth by |G| (defaults: RigLSGD.rules.keywords)",
           FlopsProfile.SCHEDULED),
    Method("lma", BAMESGD, "BAME without OBF", FlopsProfile.SCHEDULED, fixed={"alpha": 0.0}),
    Method("bame", BAMESGD, "LMA + OBF", FlopsProfile.SCHEDULED),
    Method("bame_bidir", BidirBAMESGD, "BAME with bidirectional masks (BAME†)",
           FlopsProfile.SCHEDULED_BIDIR, attach=attach_backward_masks),
    Method("srste", SRSTESGD, "SR-STE: dense weights, top-N forward mask every step",
           FlopsProfile.STE, scheduled_masks=False),
    Method("lbc", LBCSGD, "LBC: learnable N-of-M combination scores", FlopsProfile.LBC,
           scheduled_masks=False),
    Method("maxq", MaxQSGD, "MaxQ: soft N:M masks from multi-axis queries, dense-to-N:M ramp "
           "over the first quarter, SR-STE decay", FlopsProfile.MAXQ, scheduled_masks=False),
    Method("asp", ASPSGD, "one-shot magnitude N:M pruning, fixed-mask fine-tuning",
           FlopsProfile.PRETRAIN_FIXED),
    Method("dense_adamw", torch.optim.AdamW, "torch.optim.AdamW, no sparsity",
           FlopsProfile.DENSE, optimizer="adamw"),
    Method("static_adamw", BAMEAdamW, "random N:M mask at step 0, never changed; AdamW",
           FlopsProfile.FIXED, fixed={"t_i": 0, "t_f": 0}, optimizer="adamw"),
    Method("bame_adamw", BAMEAdamW, "LMA + OBF, AdamW on the kept weights (revive score "
           "lr * |G|)", FlopsProfile.SCHEDULED, optimizer="adamw"),
)
"""Every method, by name, in the order of the comparison tables."""


def get_method(name: str) -> Method:
    """The record of ``name``; ``ValueError`` naming it if there is none."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"Invalid method value: {name!r} (one of {', '.join(METHODS)})") from None


def fixed_settings(name: str) -> dict[str, Any]:
    """The keywords method ``name`` fixes (``static``: no gradual phase; ``lma``: no OBF)."""
    return dict(get_method(name).fixed)


def accepted_keywords(name: str) -> frozenset[str]:
    """The keywords the optimizer of method ``name`` takes."""
    factory = get_method(name).factory
    if factory in _TORCH_KEYWORDS:
        return _TORCH_KEYWORDS[factory]
    return factory.accepted_keywords()


_EVOLVE_KEYWORDS = frozenset({"alpha", "beta", "gamma", "revive_score", "zeta", "t_end"})


def inert_keywords(name: str) -> frozenset[str]:
    """The keywords the optimizer of method ``name`` takes but that change nothing under the
    settings the method fixes: those of the evolve phase when it fixes ``t_i = t_f``
    (``static``: ``alpha``, ``beta``, ``gamma``, ...)."""
    fixed = get_method(name).fixed
    if "t_i" in fixed and fixed["t_i"] == fixed.get("t_f"):
        return accepted_keywords(name) & _EVOLVE_KEYWORDS
    return frozenset()


def method_name(method: str, optimizer: str) -> str:
    """The registered name of ``method`` trained with ``optimizer`` (``"sgd"``: ``method``
    itself; ``"adamw"``: its AdamW variant, e.g. ``bame`` -> ``bame_adamw``). ``ValueError``
    naming the pair when the registry has no such variant."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"Invalid optimizer value: {optimizer!r} (one of {', '.join(OPTIMIZERS)})")
    base = get_method(method)
    if base.optimizer == optimizer:
        return method
    name = f"{method}_{optimizer}"
    if name not in METHODS:
        variants = [m.name for m in METHODS.values() if m.optimizer == optimizer]
        raise ValueError(f"Invalid method value: {method!r} has no {optimizer} variant (those with "
                         f"one: {', '.join(v.removesuffix('_' + optimizer) for v in variants)})")
    return name


def make_optimizer(
    method: str, params: Iterable[Tensor] | Iterable[dict[str, Any]], **kwargs: Any
) -> Optimizer:
    """The optimizer of ``method`` over ``params``, with the method's fixed settings.

    The same param groups and keywords can drive every method: for a method that does not
    take them, keywords in :data:`CONTEXT_KEYWORDS` (and N:M group keys for ``dense``) are
    dropped, and so are other keywords whose value is ``None`` or :class:`BAMESGD`'s default.
    Any other keyword the method does not take raises ``ValueError`` naming it (a setting
    the method cannot honour), and so does a value that contradicts a fixed setting or that
    the fixed settings make inert (:func:`inert_keywords`: ``static`` with ``alpha=0.3``).
    """
    record = get_method(method)
    accepted = accepted_keywords(method)
    for key, value in record.fixed.items():
        if key in kwargs and kwargs[key] is not None and kwargs[key] != value:
            raise ValueError(f"Invalid {key} value: {kwargs[key]!r} ({method} fixes {key}={value})")
        kwargs[key] = value
    for key in sorted(inert_keywords(method)):
        if kwargs.get(key) is not None and kwargs[key] != record.factory.rules.keywords.get(key):
            raise ValueError(f"Invalid {key} value: {kwargs[key]!r} ({method} fixes t_i = t_f, "
                             f"so it has no evolve phase and {key} would change nothing)")
    unusable = sorted(
        k for k, v in kwargs.items()
        if k not in accepted and k not in CONTEXT_KEYWORDS and v is not None
        and v != BAMESGD.rules.keywords.get(k)
    )
    if unusable:
        raise ValueError(f"Invalid keywords for method {method!r}: {unusable} (it does not use "
                         f"them; it takes {sorted(accepted)})")
    kwargs = {k: v for k, v in kwargs.items() if k in accepted}
    if record.factory in _TORCH_KEYWORDS:  # a dense torch optimizer: no N:M group keys
        params = [
            {k: v for k, v in g.items() if k in accepted or k in ("params", "param_names")}
            if isinstance(g, dict)
            else g
            for g in params
        ]
    return record.factory(params, **kwargs)
