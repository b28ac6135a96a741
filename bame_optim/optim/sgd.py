r"""BAMESGD: SGD that trains N:M sparse weights with Block-Aware Mask Evolution, and the
methods that differ from it only by their mask rules (RigL in N:M blocks, ASP)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim.sgd import sgd

from bame_optim.core.evolution import magnitude_mask, obf_freeze, score_dtype
from bame_optim.core.nm import num_blocks, param_to_blocks
from bame_optim.core.schedule import (
    Phase,
    describe_schedule,
    is_update_step,
    last_update_step,
    phase,
)
from bame_optim.optim.base import SGD_DEFAULTS, NMOptimizer
from bame_optim.optim.engine import NMEngine
from bame_optim.optim.functional import kept_sgd
from bame_optim.optim.rules import ASP_RULES, BAME_RULES, RIGL_RULES, MaskContext, MaskRules
from bame_optim.optim.sharded import block_range, gather_blocks, is_sharded, local_tensor

__all__ = ["ASPSGD", "BAMESGD", "RigLSGD"]


class BAMESGD(NMOptimizer):
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
            kernel where it is available).

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
    _exact_dtype_state = ("kept", "oscillation", "kept_mask")
    engine = NMEngine(("momentum_buffer",))

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
    ) -> None:
        given = dict(total_steps=total_steps, t_i=t_i, t_f=t_f, delta_t=delta_t, alpha=alpha,
                     beta=beta, gamma=gamma, seed=seed, zeta=zeta, t_end=t_end)
        taken = self.rules.keywords
        unused = sorted(k for k, v in given.items() if v is not None and k not in taken)
        if unused:
            raise TypeError(f"{type(self).__name__}() does not use the keywords {unused}")
        rule_defaults = {k: given[k] if given[k] is not None else default
                         for k, default in self.rules.keywords.items()}
        defaults = SGD_DEFAULTS | dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
            nesterov=nesterov, maximize=maximize, foreach=foreach, n=n, m=m, sparse=sparse,
            fused=fused,
        ) | rule_defaults
        self._reapply_masks = True
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._reapply_masks = True

    def _prepare_group(self, group: dict[str, Any]) -> None:
        has_sparse = any(self._is_sparse(p, group) for p in group["params"])
        self.rules.prepare(group, type(self).__name__, has_sparse=has_sparse)
        if group["fused"] not in (None, True, False):
            raise ValueError(f"Invalid fused value: {group['fused']!r} (True, False or None)")

    def _step_group(self, group: dict[str, Any], *, first_index: int, advance: bool) -> None:
        t, t_f = group["step"], group["t_f"]
        update = advance and is_update_step(t, group["delta_t"], group["t_i"], t_f)
        # Weights written from outside (a model load_state_dict) lose their pruned entries on
        # every ΔT-aligned step, and on the first step of this optimizer or after a load.
        reapply = advance and (self._reapply_masks or t % group["delta_t"] == 0)
        engine, m = self.engine, group["m"]
        dense, sparse = [], []
        for offset, p in enumerate(group["params"]):
            if not self._is_sparse(p, group):
                if p.grad is not None:
                    dense.append(p)
                continue
            state = self.state[p]
            if not engine.initialised(state):
                engine.initialise(p, state, m)
            engine.check(p, state, m, f"parameter {first_index + offset}")
            if update:
                self._update_mask(p, state, group, first_index + offset)
            if reapply:
                engine.zero_pruned_(p, state, m)
            if advance and t >= t_f:
                state.pop("oscillation", None)  # the mask is fixed from here on
            if p.grad is not None:
                _check_strided_grad(p, first_index + offset)
                sparse.append((p, state))
        if advance:
            self._warn_past_total_steps(group)
        hyper = {k: group[k] for k in ("lr", "momentum", "dampening", "weight_decay", "nesterov",
                                      "maximize", "foreach")}
        if dense:
            buffers = [self.state[p].get("momentum_buffer") if p in self.state else None
                       for p in dense]
            has_sparse_grad = any(p.grad.is_sparse for p in dense)
            sgd(dense, [p.grad for p in dense], buffers, has_sparse_grad, **hyper)
            if group["momentum"] != 0:
                for p, buffer in zip(dense, buffers, strict=True):
                    self.state[p]["momentum_buffer"] = buffer
        if sparse:
            buffers = [engine.local_buffers(p, state)[0] for p, state in sparse]
            kept_sgd(
                [local_tensor(p) for p, _ in sparse],
                [local_tensor(p.grad) for p, _ in sparse],
                buffers,
                [engine.local_kept(state) for _, state in sparse],
                [state["kept_count"] for _, state in sparse],
                m=m, fused=group["fused"], **hyper,
            )
            if group["momentum"] != 0:
                for (p, state), buffer in zip(sparse, buffers, strict=True):
                    engine.store_buffers(p, state, [buffer], m)

    def _after_step(self, advanced: bool) -> None:
        if advanced:
            self._reapply_masks = False

    def _warn_past_total_steps(self, group: dict[str, Any]) -> None:
        total = group.get("total_steps")
        if total is None or group["step"] < total:
            return
        if any(self.state.get(p, {}).get("kept_count", 0) > group["n"] for p in group["params"]):
            warnings.warn(
                f"{type(self).__name__}: step() ran past total_steps={total} while the masks "
                f"still keep more than {group['n']} of {group['m']} weights per block (the "
                "schedule has not reached t_i): the model is not N:M. total_steps counts "
                "optimizer steps (with gradient accumulation, len(loader) // accumulation per "
                "epoch); call finalize_masks() to prune to N:M now",
                UserWarning,
                stacklevel=4,
            )

    def _update_mask(self, p: Tensor, state: dict[str, Any], group: dict[str, Any], index: int):
        t, t_i, t_f, m = group["step"], group["t_i"], group["t_f"], group["m"]
        current = phase(t, t_i, t_f)
        rule = self.rules.rule_for(current, t_i, untouched=state["kept_count"] == m)
        grad = None
        if current is Phase.EVOLVE:
            if p.grad is None:
                return
            if not _all_finite(p.grad):
                warnings.warn(
                    f"{type(self).__name__}: the gradient of parameter {index} (shape "
                    f"{tuple(p.shape)}) has NaN or Inf at step {t}; its mask update is skipped "
                    "for this step",
                    RuntimeWarning,
                    stacklevel=4,
                )
                return
            grad = param_to_blocks(local_tensor(p.grad), m)
        kept = self.engine.kept_mask(state, m)
        oscillation = None
        if current is Phase.EVOLVE and self.rules.tracks_oscillation():
            oscillation = self.engine.oscillation(p, state, m, score_dtype(p.dtype))
        first, _ = block_range(p, m)
        context = MaskContext(
            step=t, index=index, total_blocks=num_blocks(p.shape, m), first_block=first,
            freeze=_sharded_freeze(p, group) if is_sharded(p) else None,
        )
        result = rule(param_to_blocks(local_tensor(p), m), grad, kept, oscillation, group, context)
        if result.oscillation is not None:
            self.engine.store_oscillation(p, state, result.oscillation, m)
        changed = self.engine.apply_mask(p, state, result.kept, result.count, m)
        state["last_flips"] = int(changed.sum())
        state["last_frozen"] = 0 if result.frozen is None else int(result.frozen.sum())

    def phase_name(self, group: dict[str, Any]) -> str:
        return phase(group["step"], group["t_i"], group["t_f"]).value

    def mask_update_due(self, group: dict[str, Any], t: int) -> bool:
        return is_update_step(t, group["delta_t"], group["t_i"], group["t_f"])

    def last_mask_update(self, group: dict[str, Any]) -> int | None:
        return last_update_step(group["t_i"], group["t_f"], group["delta_t"])

    def state_dict(self) -> dict[str, Any]:
        """As :meth:`torch.optim.Optimizer.state_dict`; a sharded (FSDP2) sparse parameter's
        state is given in the engine's phase-independent checkpoint form
        (:meth:`bame_optim.optim.engine.NMEngine.checkpoint_form`)."""
        saved = super().state_dict()
        for i, (p, group) in enumerate(self._params_and_groups()):
            state = saved["state"].get(i)
            if state is not None and self.engine.initialised(state) and is_sharded(p):
                saved["state"][i] = self.engine.checkpoint_form(
                    p, state, group["m"], score_dtype(p.dtype)
                )
        return saved

    def _loaded(self, p: Tensor) -> None:
        self._reapply_masks = True
        state, group = self.state.get(p, {}), self._group_of(p)
        if "kept_mask" in state:
            self.engine.compact_form(p, state, group["m"])
        elif state and not self.engine.initialised(state) and self._is_sparse(p, group):
            # A dense optimizer's state (e.g. torch.optim.SGD): every weight kept at step 0,
            # its buffers compacted.
            self.engine.adopt_dense(p, state, group["m"])

    @torch.no_grad()
    def finalize_masks(self) -> None:
        """Prune every sparse parameter to exactly ``n`` per block now (the ``n`` largest
        ``|W|`` among its kept weights) and fix the masks from this step on.

        For a run that stops before the schedule reaches ``t_i`` (fewer steps than
        ``total_steps``): afterwards every block holds exactly N and ``t_i = t_f`` is the
        current step, so the masks no longer change.
        """
        for group in self.param_groups:
            m = group["m"]
            sparse = [p for p in group["params"] if self._is_sparse(p, group)]
            for p in sparse:
                state = self.state[p]
                if not self.engine.initialised(state):
                    self.engine.initialise(p, state, m)
                kept = self.engine.kept_mask(state, m)
                new = magnitude_mask(param_to_blocks(local_tensor(p), m), kept, group["n"])
                changed = self.engine.apply_mask(p, state, new, group["n"], m)
                self.engine.zero_pruned_(p, state, m)
                state.pop("oscillation", None)
                state["last_flips"], state["last_frozen"] = int(changed.sum()), 0
            if sparse:
                group["t_i"] = group["t_f"] = group["step"]

    def schedule_summary(self) -> str:
        """One line: per group with sparse parameters, its N:M pattern, the steps of each
        phase and the number of mask updates in the gradual and evolve phases."""
        parts = []
        for index, group in enumerate(self.param_groups):
            if not any(self._is_sparse(p, group) for p in group["params"]):
                continue
            parts.append(f"group {index} " + describe_schedule(
                group["n"], group["m"], group["t_i"], group["t_f"], group["delta_t"],
                group.get("total_steps"),
            ))
        return f"{type(self).__name__}: " + ("; ".join(parts) or "no sparse parameters")

    def _params_and_groups(self):
        return [(p, group) for group in self.param_groups for p in group["params"]]

    def kept_mask(self, p: Tensor) -> Tensor | None:
        state = self.state.get(p, {})
        if not self.engine.initialised(state):
            return None
        return self.engine.kept_mask(state, self._group_of(p)["m"])  # this rank's blocks

    def momentum_buffer(self, p: Tensor) -> Tensor | None:
        """The momentum buffer of ``p`` in the parameter's layout (for a sparse parameter,
        zeros at pruned entries), or ``None`` before it exists (or with ``momentum=0``)."""
        state = self.state.get(p, {})
        buffer = state.get("momentum_buffer")
        if buffer is None or not self.engine.initialised(state):
            return None if buffer is None else buffer.clone()
        return self.engine.dense_buffer(p, state, "momentum_buffer", self._group_of(p)["m"])


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


def _check_strided_grad(p: Tensor, index: int) -> None:
    if p.grad.layout != torch.strided:
        raise ValueError(
            f"Invalid gradient layout {p.grad.layout} for sparse parameter {index} (shape "
            f"{tuple(p.shape)}): N:M masks need dense gradients; put the parameter in a group "
            "with sparse=False (e.g. an nn.Embedding(sparse=True))"
        )


def _all_finite(tensor: Tensor) -> bool:
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
