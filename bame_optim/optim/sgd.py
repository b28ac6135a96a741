r"""BAMESGD: SGD that trains N:M sparse weights with Block-Aware Mask Evolution, and the
methods that differ from it only by their mask rules (RigL in N:M blocks, ASP)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim.sgd import sgd

from bame_optim.optim.base import SGD_DEFAULTS
from bame_optim.optim.engine import NMEngine
from bame_optim.optim.functional import kept_sgd, plain_tensors
from bame_optim.optim.keywords import check_fused_flags
from bame_optim.optim.masked import MaskedOptimizer, SparseState
from bame_optim.optim.rules import ASP_RULES, BAME_RULES, RIGL_RULES, MaskRules
from bame_optim.optim.sharded import is_sharded, local_tensor

__all__ = ["ASPSGD", "BAMESGD", "RigLSGD"]


class BAMESGD(MaskedOptimizer):
    r"""SGD with momentum that keeps N:M sparse weights and evolves their masks (BAME).

    Dense parameters (``sparse=False`` groups, and with ``sparse=None`` every parameter with
    ``ndim < 2`` or whose dimension 1 does not divide by ``m``) go through
    :func:`torch.optim.sgd.sgd`, so they follow :class:`torch.optim.SGD` exactly. For a sparse
    parameter with mask :math:`B` (:meth:`kept_mask`) and gradient
    :math:`G = \partial L/\partial(W\odot B)` each ``step()`` at counter :math:`t` does

    .. math::
        &\textbf{if } t \text{ is an update step: } B \leftarrow \text{rule}(W, G, B, O, t),
            \quad W \leftarrow W \odot B,\quad b \leftarrow b \odot B_{old} \odot B \\
        &g \leftarrow G \odot B \; (+\, \lambda W),\quad
        b \leftarrow \mu b + (1-\tau) g,\quad
        g \leftarrow g + \mu b \text{ (Nesterov) else } b,\quad
        W \leftarrow W - \eta g

    (:func:`bame_optim.optim.functional.kept_sgd`), so momentum, weight decay and the weight
    change exist only on kept entries and pruned weights stay exactly 0. Update steps are
    ``t % delta_t == 0`` and ``t == t_i`` (:mod:`bame_optim.core.schedule`); the rule of each
    phase is the class's :attr:`rules` (:mod:`bame_optim.optim.rules`): gradual magnitude
    pruning from M to N kept per block before ``t_i``, N at ``t_i`` (a seeded random N:M mask
    if ``t_i == 0``), LMA + OBF until ``t_f``, fixed after.

    Args:
        params: parameters or param groups (e.g. from :func:`bame_optim.nm_param_groups`).
            A group may override any keyword below and may set ``sparse`` to ``True``
            (every parameter must be N:M-divisible), ``False`` (plain SGD) or ``None`` (auto).
        lr, momentum, dampening, weight_decay, nesterov, maximize, foreach: as
            :class:`torch.optim.SGD`.
        n, m: keep ``n`` of every ``m`` consecutive weights (``1 <= n < m``).
        total_steps: planned number of optimizer steps ``T``; needed unless ``t_i`` and
            ``t_f`` are both given.
        t_i, t_f: end of gradual pruning and end of mask evolution (default ``T // 3`` and
            ``2 * T // 3``, the paper's even split).
        delta_t: mask update interval ΔT (default 100, the paper's setting).
        alpha, beta: OBF fractions of Eq. 10 (default 0.5 each); 0 disables freezing.
        gamma: oscillation EMA momentum of Eq. 8 (default 0.9).
        seed: seeds the random start mask used when ``t_i == 0``.
        zeta, t_end: RigL's drop fraction and the end of its annealing (:class:`RigLSGD`
            only).
        fused: as :func:`bame_optim.optim.functional.kept_sgd` (``None``: the fused native
            kernel where it is available); ``True`` also steps dense parameters with torch's
            fused SGD, and raises ``ValueError`` at construction for a parameter on a device
            without a fused step.
        differentiable: accepted as :class:`torch.optim.SGD` takes it; only ``False`` is
            supported (``ValueError`` otherwise: mask updates are not differentiable).

    ``None`` for a rule keyword means the rules' default; a rule keyword that :attr:`rules`
    does not read raises ``TypeError``.

    State of a sparse parameter (:class:`bame_optim.optim.engine.NMEngine`): ``kept``,
    ``kept_count``, ``momentum_buffer`` (kept weights only, ``[K, kept_count]``),
    ``oscillation`` (the EMA of Eq. 8 during the evolve phase), ``last_flips`` and
    ``last_frozen``. Read it through :meth:`kept_mask` and :meth:`momentum_buffer`.

    .. note:: Magnitude-based updates (gradual phase, ``t_i``) need no gradient and apply to
       every sparse parameter of the group, so the N:M guarantee also holds for parameters
       that received no gradient; LMA needs one, and skips (with a warning) a parameter whose
       gradient has NaN or Inf on an update step.
    """

    rules: ClassVar[MaskRules] = BAME_RULES
    """The mask rule of each phase, and the keywords they read."""
    engine: ClassVar[NMEngine] = NMEngine(("momentum_buffer",))
    dense_class = torch.optim.SGD
    update_keywords: ClassVar[frozenset[str]] = frozenset(SGD_DEFAULTS) | {"fused",
                                                                            "differentiable"}

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
        rule_keywords = dict(total_steps=total_steps, t_i=t_i, t_f=t_f, delta_t=delta_t,
                             alpha=alpha, beta=beta, gamma=gamma, seed=seed, zeta=zeta,
                             t_end=t_end)
        defaults = SGD_DEFAULTS | dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
            nesterov=nesterov, maximize=maximize, foreach=foreach, n=n, m=m, sparse=sparse,
            fused=fused, differentiable=differentiable,
        )
        super().__init__(params, defaults, rule_keywords)

    def _prepare_group(self, group: dict[str, Any]) -> None:
        super()._prepare_group(group)
        check_fused_flags(group, type(self).__name__, torch_keywords=("differentiable",))

    def _update(
        self, group: dict[str, Any], dense: list[Tensor], sparse: list[SparseState]
    ) -> None:
        engine, m = self.engine, group["m"]
        hyper = {k: group[k] for k in SGD_DEFAULTS}
        if dense:
            buffers = [self.state[p].get("momentum_buffer") if p in self.state else None
                       for p in dense]
            has_sparse_grad = any(p.grad.is_sparse for p in dense)
            fused = bool(group["fused"])  # torch's own fused kernel, as SGD(fused=True) runs
            sgd(dense, [p.grad for p in dense], buffers, has_sparse_grad,
                **hyper | ({"foreach": False, "fused": True} if fused else {}))
            if group["momentum"] != 0:
                for p, buffer in zip(dense, buffers, strict=True):
                    self.state[p]["momentum_buffer"] = buffer
        if sparse and plain_tensors(s.param for s in sparse):
            # No shard: the state holds this rank's tensors as they are (the engine's local
            # views and stores would only add per-parameter checks to every step).
            states = [s.state for s in sparse]
            buffers = [state.get("momentum_buffer") for state in states]
            kept_sgd(
                [s.param for s in sparse], [s.grad for s in sparse], buffers,
                [state["kept"] for state in states], [state["kept_count"] for state in states],
                m=m, fused=group["fused"], **hyper,
            )
            if group["momentum"] != 0:
                for state, buffer in zip(states, buffers, strict=True):
                    state["momentum_buffer"] = buffer
        elif sparse:
            buffers = [engine.local_buffers(s.param, s.state)[0] for s in sparse]
            kept_sgd(
                [local_tensor(s.param) for s in sparse],
                [local_tensor(s.grad) for s in sparse],
                buffers,
                [engine.local_code(s.state) for s in sparse],
                [s.state["kept_count"] for s in sparse],
                m=m, fused=group["fused"], **hyper,
            )
            if group["momentum"] != 0:
                for s, buffer in zip(sparse, buffers, strict=True):
                    engine.store_buffers(s.param, s.state, [buffer], m)

    def momentum_buffer(self, p: Tensor) -> Tensor | None:
        """The momentum buffer of ``p`` in the parameter's layout (for a sparse parameter,
        zeros at pruned entries), or ``None`` before it exists (or with ``momentum=0``)."""
        return self._dense_view(p, "momentum_buffer")


class RigLSGD(BAMESGD):
    """:class:`BAMESGD` whose evolve-phase rule is RigL inside N:M blocks
    (:func:`bame_optim.optim.rules.rigl`) instead of LMA + OBF; no oscillation EMA, no OBF.

    Gradual pruning and the prune step at ``t_i`` are BAME's. At each evolve-phase update
    (``t_i < t < t_f``, ``t % delta_t == 0``) a layer drops the
    ``floor(ζ_t · K N)`` kept weights of smallest ``|W|`` across the parameter, with
    ``ζ_t = zeta / 2 · (1 + cos(π t / t_end))`` (0 from ``t_end`` on), and every block regrows
    as many as it lost by largest ``|G|``, so it keeps exactly N.

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
