"""The optimizer wiring over the state engine: one class for every update rule.

:class:`MaskedOptimizer` gathers a group's lists once per step (:meth:`_group_lists`, as
torch's optimizers do in ``_init_group``), runs the mask updates of the schedule
(:mod:`bame_optim.optim.mask_update`) and hands the lists to its :attr:`update_rule` (an
:class:`~bame_optim.optim.update_rule.UpdateRule`: SGD's, AdamW's). An optimizer is a
signature plus two records: :attr:`update_rule` and :attr:`rules` (the mask rule of each
phase), as :class:`bame_optim.BAMESGD`. docs/design.md section 6.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor

from bame_optim.core.evolution import score_dtype
from bame_optim.core.nm import GROUPED_DIM, nm_layout
from bame_optim.core.schedule import is_update_step, last_update_step, phase
from bame_optim.optim import interop, report
from bame_optim.optim.base import NM_KEYWORDS, NMOptimizer
from bame_optim.optim.engine import NMEngine
from bame_optim.optim.mask_update import finalize_group, update_masks
from bame_optim.optim.rules import BAME_RULES, RULE_KEYWORDS, MaskRules
from bame_optim.optim.sharded import PLAIN_TYPES, is_sharded, local_tensor
from bame_optim.optim.sparsity import blocked, is_sparse
from bame_optim.optim.stacklevel import user_stacklevel
from bame_optim.optim.update_rule import UpdateRule

__all__ = ["MaskedOptimizer", "blocked"]


class MaskedOptimizer(NMOptimizer):
    """Base of the optimizers over :class:`NMEngine`: the schedule, the masks and the state.

    A subclass sets :attr:`update_rule` and :attr:`rules` and writes the constructor's
    signature, passing every keyword on to :meth:`__init__`; its :attr:`engine` and
    :attr:`dense_class` follow from :attr:`update_rule`. One hook, :meth:`_after_step`
    (the bidirectional masks use it).
    """

    update_rule: ClassVar[UpdateRule | None] = None
    """The update of the weights (and the keywords it takes)."""
    rules: ClassVar[MaskRules] = BAME_RULES
    """The mask rule of each phase, and the keywords they read."""
    engine: ClassVar[NMEngine | None] = None
    """The compact state of the sparse parameters (the update rule's buffers)."""
    dense_class: ClassVar[type[torch.optim.Optimizer] | None] = None
    """The dense ``torch.optim`` optimizer this one replaces (:meth:`torch_state_dict`)."""
    _exact_dtype_state = ("kept", "oscillation", "kept_mask")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.update_rule is not None and "update_rule" in vars(cls):
            cls.engine = NMEngine(cls.update_rule.buffers)
            cls.dense_class = cls.update_rule.dense_class

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], **keywords: Any
                 ) -> None:
        """``keywords``: the update rule's, ``n``, ``m``, ``sparse`` and the rule keywords
        (``None``: the rules' default; ``TypeError`` unless :attr:`rules` reads it)."""
        given = {k: keywords.pop(k) for k in RULE_KEYWORDS if k in keywords}
        taken = self.rules.keywords
        unused = sorted(k for k, v in given.items() if v is not None and k not in taken)
        if unused:
            raise TypeError(f"{type(self).__name__}() does not use the keywords {unused}")
        resolved = {k: given[k] if given.get(k) is not None else default
                    for k, default in taken.items()}
        self._reapply_masks = True
        self._given = {k for k, v in given.items() if v is not None}
        self._given_schedule: list[dict[str, Any]] = []
        super().__init__(params, dict(self.update_rule.defaults) | keywords | resolved)

    @classmethod
    def accepted_keywords(cls) -> frozenset[str]:
        return frozenset(cls.update_rule.defaults) | NM_KEYWORDS | set(cls.rules.keywords)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        given = getattr(self, "_given", set()) | set(param_group)
        super().add_param_group(param_group)
        if hasattr(self, "_given_schedule"):
            self._given_schedule.append(_given_schedule(self.param_groups[-1], given))

    def _validate_update(self, group: dict[str, Any]) -> None:
        self.update_rule.validate(group, type(self).__name__)

    def _prepare_group(self, group: dict[str, Any]) -> None:
        has_sparse = any(is_sparse(p, group) for p in group["params"])
        self.rules.prepare(group, type(self).__name__, has_sparse=has_sparse)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As :meth:`NMOptimizer.load_state_dict
        <bame_optim.optim.base.NMOptimizer.load_state_dict>`, except that the schedule
        keywords given to this optimizer win over the checkpoint's, with a ``UserWarning``
        naming each that differs, and ``fused`` is this optimizer's (docs/design.md
        section 5, "Checkpoints")."""
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

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._reapply_masks = True
        upgrade = self.update_rule.upgrade_state
        if upgrade is not None:
            for saved in self.state.values():
                upgrade(saved)

    def _group_lists(self, group: dict[str, Any], first_index: int, frozen: bool):
        """One pass over ``group``: its dense parameters with a gradient; every sparse
        parameter as ``(p, state, index)``, its state created and checked; and the kept
        step's lists of those with a gradient (block layout) with whether none is sharded.

        .. note:: Not named ``_init_group``: ``torch.compile`` runs a method of that name
           outside the trace and expects torch's return value (a flag), so tracing a step
           failed on these lists."""
        engine, m, nm_dim, state_of = self.engine, group["m"], group["nm_dim"], self.state
        chosen = group["sparse"]  # None: each parameter by its shape
        grouped = nm_dim == GROUPED_DIM
        dense, sparse, params, grads, states = [], [], [], [], []
        plain = True
        plain_types, strided = PLAIN_TYPES, torch.strided  # locals: this loop runs every step
        for index, p in enumerate(group["params"], first_index):
            if not (chosen if chosen is not None else is_sparse(p, group)):
                if p.grad is not None:
                    dense.append(p)
                continue
            state = state_of[p]
            weight = p if grouped else nm_layout(p, nm_dim)
            if "kept" not in state:
                engine.initialise(weight, state, m)
            code = state["kept"]
            if (type(code) not in plain_types or code.shape[0] != weight.numel() // m
                    or state["kept_count"] > m):  # the full check only where it may fail
                engine.check(weight, state, m, f"parameter {index}")
            if frozen:
                state.pop("oscillation", None)  # the mask is fixed from here on
            sparse.append((p, state, index))
            grad = p.grad
            if grad is not None:
                if grad.layout != strided:
                    raise ValueError(
                        f"Invalid gradient layout {grad.layout} for sparse parameter {index} "
                        f"(shape {tuple(p.shape)}): N:M masks need dense gradients; put the "
                        "parameter in a group with sparse=False (e.g. an "
                        "nn.Embedding(sparse=True))"
                    )
                params.append(weight)
                grads.append(grad if grouped else nm_layout(grad, nm_dim))
                states.append(state)
                plain = plain and type(p) in plain_types
        return dense, sparse, (params, grads, states, plain)

    def _step_group(self, group: dict[str, Any], *, first_index: int, advance: bool) -> None:
        t, t_f = group["step"], group["t_f"]
        update = advance and is_update_step(t, group["delta_t"], group["t_i"], t_f)
        # Weights written from outside (a model load_state_dict) lose their pruned entries on
        # every ΔT-aligned or update step, and on the first step of this optimizer or after a
        # load; before the mask update, so a weight it revives restarts from 0.
        reapply = advance and (self._reapply_masks or update or t % group["delta_t"] == 0)
        dense, sparse, (params, grads, states, plain) = self._group_lists(
            group, first_index, frozen=advance and t >= t_f)
        if update or reapply:
            update_masks(self.engine, self.rules, group, sparse, update=update,
                         reapply=reapply, owner=type(self).__name__)
        if advance:
            report.warn_past_total_steps(self, group)
        rule = self.update_rule
        if dense:
            rule.dense_step(self.state, group, dense)
        if params and plain:
            rule.kept_step(group, params, grads, states)
        elif params:  # FSDP2 shards: the step runs on this rank's part
            engine, m = self.engine, group["m"]
            views = [engine.local_view(p, s) for p, s in zip(params, states, strict=True)]
            rule.kept_step(group, [local_tensor(p) for p in params],
                           [local_tensor(g) for g in grads], views)
            for p, state, view in zip(params, states, views, strict=True):
                engine.store_local(p, state, view, m)

    def _after_step(self, advanced: bool) -> None:
        if advanced:
            self._reapply_masks = False

    def phase_name(self, group: dict[str, Any]) -> str:
        return phase(group["step"], group["t_i"], group["t_f"]).value

    def mask_update_due(self, group: dict[str, Any], t: int) -> bool:
        return is_update_step(t, group["delta_t"], group["t_i"], group["t_f"])

    def last_mask_update(self, group: dict[str, Any]) -> int | None:
        return last_update_step(group["t_i"], group["t_f"], group["delta_t"])

    def state_dict(self) -> dict[str, Any]:
        """As :meth:`torch.optim.Optimizer.state_dict`, a sharded (FSDP2) sparse parameter's
        state in the engine's checkpoint form (:meth:`NMEngine.checkpoint_form`). Not a state
        dict of :attr:`dense_class`: :meth:`torch_state_dict` is."""
        saved = super().state_dict()
        params = [(p, group) for group in self.param_groups for p in group["params"]]
        for i, (p, group) in enumerate(params):
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
        elif state and not self.engine.initialised(state) and is_sparse(p, group):
            # A dense optimizer's state (e.g. torch.optim.SGD): every weight kept at step 0,
            # its buffers compacted.
            for name in self.engine.buffers:
                if isinstance(state.get(name), Tensor) and state[name].shape == p.shape:
                    state[name] = blocked(state[name], group)
            self.engine.adopt_dense(blocked(p, group), state, group["m"])

    @torch.no_grad()
    def finalize_masks(self) -> None:
        """Prune every sparse parameter to exactly ``n`` per block now (the ``n`` largest
        ``|W|`` among its kept weights) and fix the masks from this step on, for a run that
        stops before ``t_i``: afterwards ``t_i = t_f`` is the current step."""
        for group in self.param_groups:
            finalize_group(self.engine, group, [(p, self.state[p]) for p in group["params"]
                                                if is_sparse(p, group)])

    def check_finished(self) -> bool:
        """Call when training ends: ``True`` when every sparse parameter keeps exactly ``n``
        per block; otherwise a ``UserWarning`` per unfinished group and ``False``
        (docs/design.md section 5, "The end of training")."""
        return report.check_finished(self)

    def schedule_summary(self) -> str:
        """One line: per group with sparse parameters, its N:M pattern, the steps of each
        phase and the number of mask updates in the gradual and evolve phases."""
        return report.schedule_summary(self)

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
