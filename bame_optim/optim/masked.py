"""The optimizer side of the state engine: schedules, mask updates, checkpoints and reports.

:class:`MaskedOptimizer` is everything an optimizer over :class:`NMEngine` does except the
update of the weights: on each ``step()`` it applies the mask rule of the current phase
(:attr:`MaskedOptimizer.rules`, :mod:`bame_optim.optim.rules`) on update steps, keeps pruned
weights at 0, and hands the parameters with gradients to :meth:`MaskedOptimizer._update`,
the one method an update rule writes (:class:`bame_optim.BAMESGD` for SGD,
:class:`bame_optim.BAMEAdamW` for AdamW).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from bame_optim.core.evolution import magnitude_mask, obf_freeze, score_dtype
from bame_optim.core.nm import nm_layout, num_blocks, param_to_blocks
from bame_optim.core.schedule import (
    Phase,
    describe_schedule,
    is_update_step,
    last_update_step,
    phase,
)
from bame_optim.optim import interop
from bame_optim.optim.base import NMOptimizer, user_stacklevel
from bame_optim.optim.engine import NMEngine
from bame_optim.optim.fused_evolve import evolve_fused_many, fused_evolve_runs
from bame_optim.optim.rules import BAME_RULES, MaskContext, MaskRules, lma_obf
from bame_optim.optim.sharded import block_range, gather_blocks, is_sharded, local_tensor

__all__ = ["MaskedOptimizer", "SparseState"]

class SparseState(NamedTuple):
    """A sparse parameter with a gradient, as :meth:`MaskedOptimizer._update` receives it:
    ``param`` and ``grad`` in the block layout (input dimension at 1, :func:`blocked`; views of
    the parameter and its gradient) and the parameter's ``state``."""

    param: Tensor
    grad: Tensor
    state: dict[str, Any]


def blocked(tensor: Tensor, group: dict[str, Any]) -> Tensor:
    """A parameter-shaped ``tensor`` (the parameter, its gradient or a dense buffer) in the
    layout the engine works in: its group's ``nm_dim`` moved to dimension 1
    (:func:`bame_optim.core.nm.nm_layout`); the tensor itself for ``nm_dim == 1``."""
    return nm_layout(tensor, group["nm_dim"])


class MaskedOptimizer(NMOptimizer):
    """Base of the optimizers over :class:`NMEngine`: the schedule and the masks.

    A subclass sets :attr:`engine` (the names of its per-weight buffers), :attr:`rules` (the
    mask rule of each phase) and writes :meth:`_update`; its constructor passes its update
    hyper-parameters and the rule keywords to :meth:`__init__`. See :class:`BAMESGD
    <bame_optim.BAMESGD>` for the schedule and the state layout.
    """

    rules: ClassVar[MaskRules] = BAME_RULES
    """The mask rule of each phase, and the keywords they read."""
    engine: ClassVar[NMEngine] = NMEngine(())
    """The compact state of the sparse parameters (which buffers the update rule keeps)."""
    update_keywords: ClassVar[frozenset[str]] = frozenset()
    """The keywords of the update rule (beyond ``n``, ``m``, ``sparse`` and the rules')."""
    dense_class: ClassVar[type[torch.optim.Optimizer] | None] = None
    """The dense ``torch.optim`` optimizer this one replaces (:meth:`torch_state_dict`)."""
    _exact_dtype_state = ("kept", "oscillation", "kept_mask")

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        defaults: dict[str, Any],
        rule_keywords: dict[str, Any],
    ) -> None:
        """``defaults``: the update's hyper-parameters with ``n``, ``m``, ``sparse``;
        ``rule_keywords``: the rule keywords as given (``None``: the rules' default), each
        ``TypeError`` unless :attr:`rules` reads it."""
        taken = self.rules.keywords
        unused = sorted(k for k, v in rule_keywords.items() if v is not None and k not in taken)
        if unused:
            raise TypeError(f"{type(self).__name__}() does not use the keywords {unused}")
        resolved = {k: rule_keywords.get(k) if rule_keywords.get(k) is not None else default
                    for k, default in taken.items()}
        self._reapply_masks = True
        self._given = {k for k, v in rule_keywords.items() if v is not None}
        self._given_schedule: list[dict[str, Any]] = []
        super().__init__(params, defaults | resolved)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        given = getattr(self, "_given", set()) | set(param_group)
        super().add_param_group(param_group)
        if hasattr(self, "_given_schedule"):
            self._given_schedule.append(_given_schedule(self.param_groups[-1], given))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As :meth:`NMOptimizer.load_state_dict
        <bame_optim.optim.base.NMOptimizer.load_state_dict>`, except that the schedule
        keywords given to this optimizer (``total_steps``, ``t_i``, ``t_f``, ``delta_t``,
        ``t_end``, as keywords or group keys; ``t_i``, ``t_f`` and ``t_end`` derived from a given
        ``total_steps`` too) win over the checkpoint's, with a ``UserWarning`` naming each
        that differs and both values; ``fused`` is always this optimizer's (a property of the
        machine, not of the run). Keywords left at their default take the checkpoint's."""
        given = getattr(self, "_given_schedule", [])
        super().load_state_dict(state_dict)
        for index, (group, ours) in enumerate(zip(self.param_groups, given, strict=False)):
            differ = [f"{k}={v!r} (the checkpoint's: {group.get(k)!r})"
                      for k, v in ours.items() if k != "fused" and group.get(k) != v]
            group.update(ours)
            if differ:
                warnings.warn(
                    f"{type(self).__name__}.load_state_dict: param group {index} keeps the "
                    f"schedule this optimizer was built with: {', '.join(differ)}",
                    UserWarning,
                    stacklevel=user_stacklevel(),
                )

    def _update(
        self, group: dict[str, Any], dense: list[Tensor], sparse: list[SparseState]
    ) -> None:
        """Update the weights of one group: ``dense`` parameters (with gradients) exactly as
        the dense optimizer would, ``sparse`` ones on their kept weights only, their compact
        buffers through :attr:`engine`."""
        raise NotImplementedError

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._reapply_masks = True

    def _prepare_group(self, group: dict[str, Any]) -> None:
        has_sparse = any(self._is_sparse(p, group) for p in group["params"])
        self.rules.prepare(group, type(self).__name__, has_sparse=has_sparse)

    def _step_group(self, group: dict[str, Any], *, first_index: int, advance: bool) -> None:
        t, t_f = group["step"], group["t_f"]
        update = advance and is_update_step(t, group["delta_t"], group["t_i"], t_f)
        # Weights written from outside (a model load_state_dict) lose their pruned entries on
        # every ΔT-aligned or update step, and on the first step of this optimizer or after a
        # load; before the mask update, so a weight it revives restarts from 0.
        reapply = advance and (self._reapply_masks or update or t % group["delta_t"] == 0)
        engine, m = self.engine, group["m"]
        dense, sparse = [], []
        batch: list[tuple[Tensor, dict[str, Any], int]] = []  # evolve updates, fused
        for offset, p in enumerate(group["params"]):
            if not self._is_sparse(p, group):
                if p.grad is not None:
                    dense.append(p)
                continue
            state, weight = self.state[p], blocked(p, group)
            if not engine.initialised(state):
                engine.initialise(weight, state, m)
            engine.check(weight, state, m, f"parameter {first_index + offset}")
            fused = update and self._evolves_fused(p, state, group)
            if reapply and not fused:  # (the fused passes set the pruned weights to 0 too)
                engine.zero_pruned_(weight, state, m)
            if fused:
                batch.append((p, state, first_index + offset))
            elif update:
                self._update_mask(p, state, group, first_index + offset)
            if advance and t >= t_f:
                state.pop("oscillation", None)  # the mask is fixed from here on
            if p.grad is not None:
                _check_strided_grad(p, first_index + offset)
                sparse.append(SparseState(weight, blocked(p.grad, group), state))
        if batch:
            self._evolve_fused(batch, group)
        if advance:
            self._warn_past_total_steps(group)
        self._update(group, dense, sparse)

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
                stacklevel=user_stacklevel(),
            )

    def _evolves_fused(self, p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> bool:
        """Whether this update step's mask update of ``p`` is BAME's evolve rule run by the fused
        passes (:mod:`bame_optim.optim.fused_evolve`; ``ValueError`` with ``fused=True`` where
        they cannot run)."""
        t, t_i, m = group["step"], group["t_i"], group["m"]
        current = phase(t, t_i, group["t_f"])
        if current is not Phase.EVOLVE or p.grad is None:
            return False
        rule = self.rules.rule_for(current, t_i, untouched=state["kept_count"] == m)
        return rule is lma_obf and fused_evolve_runs(
            self.engine, blocked(p, group), blocked(p.grad, group), state, group
        )

    def _evolve_fused(self, batch: list[tuple[Tensor, dict[str, Any], int]],
                      group: dict[str, Any]) -> None:
        """The evolve updates of a group's parameters ``batch`` (``(p, state, index)``) in
        one run of the fused passes: equal to :meth:`_update_mask` of each, bit for bit."""
        items = [(blocked(p, group), blocked(p.grad, group), state) for p, state, _ in batch]
        finite = evolve_fused_many(self.engine, items, group)
        for (p, _, index), ok in zip(batch, finite, strict=True):
            if not ok:
                self._warn_non_finite(p, index, group["step"])

    def _warn_non_finite(self, p: Tensor, index: int, t: int) -> None:
        warnings.warn(
            f"{type(self).__name__}: the gradient of parameter {index} (shape "
            f"{tuple(p.shape)}) has NaN or Inf at step {t}; its mask update is skipped "
            "for this step",
            RuntimeWarning,
            stacklevel=user_stacklevel(),
        )

    def _update_mask(self, p: Tensor, state: dict[str, Any], group: dict[str, Any], index: int):
        t, t_i, t_f, m = group["step"], group["t_i"], group["t_f"], group["m"]
        weight = blocked(p, group)
        current = phase(t, t_i, t_f)
        rule = self.rules.rule_for(current, t_i, untouched=state["kept_count"] == m)
        grad = None
        if current is Phase.EVOLVE:
            if p.grad is None:
                return
            if not _all_finite(p.grad):
                self._warn_non_finite(p, index, t)
                return
            grad = param_to_blocks(local_tensor(blocked(p.grad, group)), m)
        kept = self.engine.kept_mask(state, m)
        oscillation = None
        if current is Phase.EVOLVE and self.rules.tracks_oscillation():
            oscillation = self.engine.oscillation(weight, state, m, score_dtype(p.dtype))
        first, _ = block_range(weight, m)
        context = MaskContext(
            step=t, index=index, total_blocks=num_blocks(weight.shape, m), first_block=first,
            freeze=_sharded_freeze(p, group) if is_sharded(p) else None,
        )
        result = rule(param_to_blocks(local_tensor(weight), m), grad, kept, oscillation, group,
                      context)
        if result.oscillation is not None:
            self.engine.store_oscillation(weight, state, result.oscillation, m)
        changed = self.engine.apply_mask(weight, state, result.kept, result.count, m)
        state["last_flips"] = int(torch.count_nonzero(changed))
        frozen = result.frozen
        state["last_frozen"] = 0 if frozen is None else int(torch.count_nonzero(frozen))

    def phase_name(self, group: dict[str, Any]) -> str:
        return phase(group["step"], group["t_i"], group["t_f"]).value

    def mask_update_due(self, group: dict[str, Any], t: int) -> bool:
        return is_update_step(t, group["delta_t"], group["t_i"], group["t_f"])

    def last_mask_update(self, group: dict[str, Any]) -> int | None:
        return last_update_step(group["t_i"], group["t_f"], group["delta_t"])

    def state_dict(self) -> dict[str, Any]:
        """As :meth:`torch.optim.Optimizer.state_dict`; a sharded (FSDP2) sparse parameter's
        state is given in the engine's phase-independent checkpoint form
        (:meth:`bame_optim.optim.engine.NMEngine.checkpoint_form`). It is not a state dict of
        :attr:`dense_class` (compact buffers, mask codes): :meth:`torch_state_dict` is."""
        saved = super().state_dict()
        for i, (p, group) in enumerate(self._params_and_groups()):
            state = saved["state"].get(i)
            if state is not None and self.engine.initialised(state) and is_sharded(p):
                saved["state"][i] = self.engine.checkpoint_form(
                    p, state, group["m"], score_dtype(p.dtype)
                )
        return saved

    def torch_state_dict(self) -> dict[str, Any]:
        """This optimizer's state as :attr:`dense_class` (``torch.optim.SGD`` / ``AdamW``)
        over the same param groups holds it: load it into that optimizer and step on
        (:func:`bame_optim.optim.interop.torch_state_dict`). ``state_dict()`` is not one."""
        return interop.torch_state_dict(self)

    def load_dense_state_dict(self, state_dict: dict[str, Any], params: Iterable[Tensor]
                              ) -> None:
        """Start from a dense optimizer's ``state_dict`` over ``params`` (in its order, e.g.
        ``model.parameters()``), whatever its param groups
        (:func:`bame_optim.optim.interop.load_dense_state_dict`)."""
        interop.load_dense_state_dict(self, state_dict, params)

    def _loaded(self, p: Tensor) -> None:
        self._reapply_masks = True
        state, group = self.state.get(p, {}), self._group_of(p)
        interop.check_not_cast(state, p)
        if "kept_mask" in state:
            self.engine.compact_form(p, state, group["m"])
        elif state and not self.engine.initialised(state) and self._is_sparse(p, group):
            # A dense optimizer's state (e.g. torch.optim.SGD): every weight kept at step 0,
            # its buffers compacted.
            for name in self.engine.buffers:
                if isinstance(state.get(name), Tensor) and state[name].shape == p.shape:
                    state[name] = blocked(state[name], group)
            self.engine.adopt_dense(blocked(p, group), state, group["m"])

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
                state, weight = self.state[p], blocked(p, group)
                if not self.engine.initialised(state):
                    self.engine.initialise(weight, state, m)
                kept = self.engine.kept_mask(state, m)
                new = magnitude_mask(param_to_blocks(local_tensor(weight), m), kept, group["n"])
                changed = self.engine.apply_mask(weight, state, new, group["n"], m)
                self.engine.zero_pruned_(weight, state, m)
                state.pop("oscillation", None)
                state["last_flips"], state["last_frozen"] = int(torch.count_nonzero(changed)), 0
            if sparse:
                group["t_i"] = group["t_f"] = group["step"]

    def check_finished(self) -> bool:
        """Call when training ends: ``True`` when every sparse parameter keeps exactly ``n``
        per block (the schedule reached ``t_i``, or :meth:`finalize_masks` ran); otherwise a
        ``UserWarning`` per unfinished group (its step, ``t_i``, ``total_steps`` and what its
        blocks keep) and ``False``. The training scripts call it after the last epoch, and
        :class:`bame_optim.integrations.hf_trainer.NMCheck` at the end of ``Trainer.train()``.
        """
        finished = True
        for index, group in enumerate(self.param_groups):
            counts = [self.state.get(p, {}).get("kept_count", group["m"])
                      for p in group["params"] if self._is_sparse(p, group)]
            if not counts or max(counts) <= group["n"]:
                continue
            finished = False
            warnings.warn(
                f"{type(self).__name__}: training ended at step {group['step']}, before t_i="
                f"{group['t_i']} (total_steps={group.get('total_steps')}): param group {index} "
                f"still keeps up to {max(counts)} of {group['m']} weights per block, so the model "
                f"is not {group['n']}:{group['m']}. total_steps counts optimizer steps (with "
                "gradient accumulation, len(loader) // accumulation per epoch); call "
                "finalize_masks() to prune to N:M now",
                UserWarning,
                stacklevel=user_stacklevel(),
            )
        return finished

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

    def _dense_view(self, p: Tensor, name: str) -> Tensor | None:
        """State buffer ``name`` of ``p`` in the parameter's layout (for a sparse parameter,
        zeros at pruned entries), or ``None`` before it exists."""
        state = self.state.get(p, {})
        buffer = state.get(name)
        if buffer is None or not self.engine.initialised(state):
            return None if buffer is None else buffer.clone()
        group = self._group_of(p)
        dense = self.engine.dense_buffer(blocked(p, group), state, name, group["m"])
        return blocked(dense, group)


_SCHEDULE_KEYS = ("total_steps", "t_i", "t_f", "t_end", "delta_t")


def _given_schedule(group: dict[str, Any], given: set[str]) -> dict[str, Any]:
    """The values of ``group`` a loaded checkpoint may not replace: the schedule keys in
    ``given`` (with those derived from a given ``total_steps``) and ``fused``."""
    keys = given & set(_SCHEDULE_KEYS)
    if "total_steps" in keys:
        keys |= {"t_i", "t_f", "t_end"}
    return {k: group[k] for k in (*_SCHEDULE_KEYS, "fused") if k in group and
            (k in keys or k == "fused")}


def _check_strided_grad(p: Tensor, index: int) -> None:
    if p.grad.layout != torch.strided:
        raise ValueError(
            f"Invalid gradient layout {p.grad.layout} for sparse parameter {index} (shape "
            f"{tuple(p.shape)}): N:M masks need dense gradients; put the parameter in a group "
            "with sparse=False (e.g. an nn.Embedding(sparse=True))"
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
