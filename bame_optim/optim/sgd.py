r"""BAMESGD: SGD that trains N:M sparse weights with Block-Aware Mask Evolution, the methods
that differ from it only by their mask rules (RigL in N:M blocks, ASP), and SGD's
:class:`~bame_optim.optim.update_rule.UpdateRule`."""

from __future__ import annotations

from collections.abc import Iterable, MutableMapping
from typing import Any

import torch
from torch import Tensor
from torch.optim.sgd import sgd

from bame_optim.core.validation import check_sgd_hyper
from bame_optim.optim.base import SGD_DEFAULTS
from bame_optim.optim.functional import kept_sgd
from bame_optim.optim.keywords import check_fused_flags
from bame_optim.optim.masked import MaskedOptimizer
from bame_optim.optim.rules import ASP_RULES, BAME_RULES, RIGL_RULES
from bame_optim.optim.sharded import is_sharded
from bame_optim.optim.update_rule import UpdateRule

__all__ = ["ASPSGD", "BAMESGD", "SGD_RULE", "RigLSGD"]


def _validate(group: dict[str, Any], owner: str) -> None:
    check_sgd_hyper(group)
    check_fused_flags(group, owner, torch_keywords=("differentiable",))


def _dense_step(state: MutableMapping[Tensor, dict[str, Any]], group: dict[str, Any],
                params: list[Tensor]) -> None:
    """:func:`torch.optim.sgd.sgd` on dense parameters, as :class:`torch.optim.SGD` steps
    (with ``fused=True`` torch's fused kernel)."""
    buffers = [None if (s := state.get(p)) is None else s.get("momentum_buffer")
               for p in params]
    grads = [p.grad for p in params]
    has_sparse_grad = any(grad.is_sparse for grad in grads)
    fused = {"foreach": False, "fused": True} if group["fused"] else {}
    created = [i for i, buffer in enumerate(buffers) if buffer is None]
    sgd(params, grads, buffers, has_sparse_grad, **{k: group[k] for k in SGD_DEFAULTS} | fused)
    if group["momentum"] != 0:
        # sgd steps a given buffer in place and puts a new one only where it got None.
        for i in created:
            state[params[i]]["momentum_buffer"] = buffers[i]


def _kept_step(group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
               states: list[dict[str, Any]]) -> None:
    """:func:`bame_optim.optim.functional.kept_sgd` on the kept weights."""
    buffers = [state.get("momentum_buffer") for state in states]
    kept_sgd(params, grads, buffers, [state["kept"] for state in states],
             [state["kept_count"] for state in states], m=group["m"], fused=group["fused"],
             **{k: group[k] for k in SGD_DEFAULTS})
    if group["momentum"] != 0:
        for state, buffer in zip(states, buffers, strict=True):
            state["momentum_buffer"] = buffer


SGD_RULE = UpdateRule(
    defaults=SGD_DEFAULTS | {"fused": None, "differentiable": False},
    buffers=("momentum_buffer",),
    validate=_validate,
    dense_step=_dense_step,
    kept_step=_kept_step,
    dense_class=torch.optim.SGD,
)
""":class:`torch.optim.SGD`'s update: momentum, dampening, weight decay, Nesterov, maximize on
the kept weights (docs/design.md section 4)."""


class BAMESGD(MaskedOptimizer):
    r"""SGD with momentum that keeps N:M sparse weights and evolves their masks (BAME).

    Dense parameters follow :class:`torch.optim.SGD` exactly; a sparse parameter with mask
    :math:`B` (:meth:`kept_mask`) and gradient :math:`G` does, at step counter :math:`t`,

    .. math::
        &\textbf{if } t \text{ is an update step: } B \leftarrow \text{rule}(W, G, B, O, t),
            \quad W \leftarrow W \odot B,\quad b \leftarrow b \odot B_{old} \odot B \\
        &g \leftarrow G \odot B \; (+\, \lambda W),\quad
        b \leftarrow \mu b + (1-\tau) g,\quad
        g \leftarrow g + \mu b \text{ (Nesterov) else } b,\quad
        W \leftarrow W - \eta g

    with the rule of each phase from :attr:`rules` (docs/design.md sections 2-4).

    Args:
        params: parameters or param groups (e.g. from :func:`bame_optim.nm_param_groups`);
            a group may override any keyword below, ``sparse`` included.
        lr, momentum, dampening, weight_decay, nesterov, maximize, foreach: as
            :class:`torch.optim.SGD`.
        n, m: keep ``n`` of every ``m`` consecutive weights (``1 <= n < m``).
        total_steps: planned number of optimizer steps ``T``; needed unless ``t_i`` and
            ``t_f`` are both given.
        t_i, t_f: end of gradual pruning and end of mask evolution (default ``T // 3`` and
            ``2 * T // 3``).
        delta_t: mask update interval ΔT (default 100).
        alpha, beta: OBF fractions of Eq. 10 (default 0.5 each); 0 disables freezing.
        gamma: oscillation EMA momentum of Eq. 8 (default 0.9).
        seed: seeds the random start mask used when ``t_i == 0``.
        zeta, t_end: RigL's drop fraction and the end of its annealing (:class:`RigLSGD`).
        sparse: ``True``, ``False`` or ``None`` (automatic).
        fused, differentiable: as :class:`torch.optim.SGD` (``fused=None``: the fused kernel
            for sparse parameters where it runs; ``differentiable`` only ``False``).

    ``None`` for a rule keyword means the rules' default; a keyword :attr:`rules` does not read
    raises ``TypeError``. State and checkpoints: docs/design.md section 5; read the state
    through :meth:`kept_mask` and :meth:`momentum_buffer`.
    """

    update_rule = SGD_RULE
    rules = BAME_RULES

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        n: int = 2,
        m: int = 4,
        total_steps: int | None = None,
        t_i: int | None = None,
        t_f: int | None = None,
        delta_t: int | None = None,
        alpha: float | None = None,
        beta: float | None = None,
        gamma: float | None = None,
        seed: int | None = None,
        zeta: float | None = None,
        t_end: int | None = None,
        sparse: bool | None = None,
        fused: bool | None = None,
        differentiable: bool = False,
    ) -> None:
        super().__init__(
            params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
            nesterov=nesterov, maximize=maximize, foreach=foreach, n=n, m=m,
            total_steps=total_steps, t_i=t_i, t_f=t_f, delta_t=delta_t, alpha=alpha, beta=beta,
            gamma=gamma, seed=seed, zeta=zeta, t_end=t_end, sparse=sparse, fused=fused,
            differentiable=differentiable,
        )

    def momentum_buffer(self, p: Tensor) -> Tensor | None:
        """The momentum buffer of ``p`` in the parameter's layout (for a sparse parameter,
        zeros at pruned entries), or ``None`` before it exists (or with ``momentum=0``)."""
        return self._dense_view(p, "momentum_buffer")


class RigLSGD(BAMESGD):
    """:class:`BAMESGD` whose evolve-phase rule is RigL inside N:M blocks
    (:func:`bame_optim.optim.rules.rigl`) instead of LMA + OBF; no oscillation EMA, no OBF.

    Takes ``zeta`` (ζ, default 0.3) and ``t_end`` (default ``3 * total_steps // 4``, RigL's
    ``0.75 T``), but not ``alpha``, ``beta``, ``gamma``. Sharded (FSDP2) parameters raise
    ``ValueError``: the layer-wide drop is not implemented across shards yet.
    """

    rules = RIGL_RULES

    def _prepare_group(self, group: dict[str, Any]) -> None:
        super()._prepare_group(group)
        for p in group["params"]:
            if is_sharded(p) and self._is_sparse(p, group):
                raise ValueError(
                    f"Invalid parameter of shape {tuple(p.shape)}: RigLSGD does not support "
                    "sharded (FSDP2) parameters yet (its drop ranks |W| across the whole layer)"
                )


class ASPSGD(BAMESGD):
    """ASP (Mishra et al. 2021): fixed-mask sparse fine-tuning after one-shot magnitude N:M
    pruning (:func:`bame_optim.optim.rules.one_shot`) at the first step. There is no
    schedule: ``total_steps``, ``t_i``, ``t_f``, ``delta_t`` and the OBF keywords are not
    taken. The dense pre-training is an ordinary run (``torch.optim.SGD``)."""

    rules = ASP_RULES
