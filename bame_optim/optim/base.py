"""What every N:M optimizer of the package shares: argument checks, the step counter, reporting.

:class:`NMOptimizer` is the base of the optimizers over the state engine
(:class:`~bame_optim.optim.masked.MaskedOptimizer`: :class:`bame_optim.BAMESGD`,
:class:`bame_optim.BAMEAdamW`) and of the straight-through peers (:mod:`bame_optim.peers`,
dense weights in state). Its extension points are listed in docs/design.md section 6.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer

from bame_optim.core.nm import GROUPED_DIM
from bame_optim.core.validation import check_sgd_hyper
from bame_optim.optim import report
from bame_optim.optim.sharded import is_sharded
from bame_optim.optim.sparsity import (
    check_sparse_group,
    check_sparse_params,
    is_sparse,
    pattern_name,
    warn_about_sparse_choice,
)
from bame_optim.optim.stacklevel import user_stacklevel

__all__ = ["NM_KEYWORDS", "SGD_DEFAULTS", "NMOptimizer", "user_stacklevel"]

SGD_DEFAULTS: dict[str, Any] = {
    "lr": 1e-3,
    "momentum": 0.0,
    "dampening": 0.0,
    "weight_decay": 0.0,
    "nesterov": False,
    "maximize": False,
    "foreach": None,
}
""":class:`torch.optim.SGD`'s keywords and defaults."""
NM_KEYWORDS = frozenset({"n", "m", "sparse"})
"""The keywords every N:M optimizer takes besides its update's and its masks'."""


class NMOptimizer(Optimizer):
    """Base of the N:M optimizers: an update's hyper-parameters plus ``n``, ``m``, ``sparse``.

    ``sparse`` per group: ``True``, ``False`` (dense, as the torch optimizer) or ``None``
    (:func:`bame_optim.optim.sparsity.is_sparse`). The step counter is
    ``param_groups[i]["step"]``; it advances once per ``step()`` that applied an update
    (docs/design.md section 5, "The step counter").
    """

    _exact_dtype_state: ClassVar[tuple[str, ...]] = ()
    """State that ``Optimizer.load_state_dict`` would cast to the parameter's dtype."""
    blocks_along_dim0: ClassVar[bool] = True
    """Whether sparse groups may have ``"nm_dim": 0`` (``[in, out]`` weights)."""

    def __init__(
        self, params: Iterable[Tensor] | Iterable[dict[str, Any]], defaults: dict[str, Any]
    ) -> None:
        self._validate_update(dict(defaults))  # before params, as torch.optim checks lr first
        if params is None or isinstance(params, (str, bytes)):
            raise TypeError(
                f"Invalid params value: {params!r} ({type(self).__name__} needs an iterable of "
                "Tensors or of param-group dicts, e.g. model.parameters())"
            )
        super().__init__(params, {"nm_dim": GROUPED_DIM} | defaults)
        warn_about_sparse_choice(type(self).__name__, self.param_groups, self.defaults["sparse"])

    @classmethod
    def accepted_keywords(cls) -> frozenset[str]:
        """The keywords the constructor takes (what :func:`bame_optim.methods.make_optimizer`
        may pass)."""
        raise NotImplementedError

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (see :meth:`torch.optim.Optimizer.add_param_group`) and validate it."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._validate_update(group)
        check_sparse_group(group, type(self).__name__, blocks_along_dim0=self.blocks_along_dim0)
        self._prepare_group(group)
        group.setdefault("step", 0)
        check_sparse_params(group)

    def _validate_update(self, group: dict[str, Any]) -> None:
        """``ValueError`` naming a bad hyper-parameter of the update rule (SGD's here)."""
        check_sgd_hyper(group)

    def _prepare_group(self, group: dict[str, Any]) -> None:
        """Validate and resolve the subclass's own keywords of a new group."""

    _is_sparse = staticmethod(is_sparse)

    def check_nm(self) -> list[str]:
        """Check that the model is N:M sparse now: at least one parameter is sparse, and every
        block of every sparse parameter (along its input dimension) holds at most ``n``
        non-zeros. Returns the names of the sparse parameters checked (``param_names`` of the
        group, else ``groupG.paramJ``); this rank's blocks of a sharded parameter.

        Raises:
            RuntimeError: no parameter is sparse (a check over nothing would pass), or a sparse
                parameter is not N:M, named with its pattern and phase (e.g. still in the
                gradual phase: call :meth:`finalize_masks` or train to ``t_i``).
        """
        return report.check_nm(self)

    def _is_state_init_call(self) -> bool:
        # torch.distributed.checkpoint initialises optimizer state with lr 0 and zero grads.
        if any(group["lr"] != 0 for group in self.param_groups):
            return False
        grads = [p.grad for group in self.param_groups for p in group["params"]]
        return all(g is None or not _any(g) for g in grads)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One optimization step (with a mask update where the method's schedule says so).

        Args:
            closure: re-evaluates the model and returns the loss (optional).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        advance = False
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        if any(p.grad is not None for p in params):
            advance = not self._is_state_init_call()
            index = 0
            for group in self.param_groups:
                self._step_group(group, first_index=index, advance=advance)
                index += len(group["params"])
                if advance:
                    group["step"] += 1
        self._after_step(advance)
        return loss

    def _step_group(self, group: dict[str, Any], *, first_index: int, advance: bool) -> None:
        """Update one group. ``advance=False`` is the state-initialising call: create state,
        change nothing else."""
        raise NotImplementedError

    def _after_step(self, advanced: bool) -> None:
        """Called at the end of every ``step()`` (``advanced``: its counter moved)."""

    def kept_mask(self, p: Tensor) -> Tensor | None:
        """The mask of sparse parameter ``p``: ``[K, M]`` bool in the block view of
        :mod:`bame_optim.core.nm` (``True`` = kept). ``None`` for a dense parameter or before
        the parameter's first ``step()``."""
        raise NotImplementedError

    def phase_name(self, group: dict[str, Any]) -> str:
        """The phase of ``group`` at its current step, for reports."""
        raise NotImplementedError

    def mask_update_due(self, group: dict[str, Any], t: int) -> bool:
        """Whether the ``step()`` with counter ``t`` may change a mask of ``group``."""
        raise NotImplementedError

    def last_mask_update(self, group: dict[str, Any]) -> int | None:
        """The last counter whose ``step()`` may change a mask of ``group`` (``None``: masks
        may change at every step)."""
        raise NotImplementedError

    def _group_of(self, p: Tensor) -> dict[str, Any]:
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                return group
        raise ValueError(f"Invalid p: a tensor of shape {tuple(p.shape)} not in this optimizer")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict()``, keeping masks and other exact state in their saved dtypes
        (``Optimizer.load_state_dict`` casts every state tensor to the parameter's dtype).

        Missing group keys get this optimizer's defaults; another optimizer's state dict (no
        ``step`` in its groups, e.g. :class:`torch.optim.SGD`'s) starts the schedule at step 0;
        the saved N:M pattern wins, with a warning when it differs (docs/design.md section 5,
        "Checkpoints").
        """
        saved = state_dict["state"]
        ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        exact = {
            i: {k: saved[i][k] for k in self._exact_dtype_state if k in saved[i]}
            for i in ids
            if i in saved
        }
        patterns = [(g["n"], g["m"], g["nm_dim"]) for g in self.param_groups]
        keys = [set(g) - {"params", "step"} for g in self.param_groups]
        super().load_state_dict(state_dict)
        for index, (group, before) in enumerate(zip(self.param_groups, patterns, strict=True)):
            foreign = "step" not in group
            # The block axis is a fact of the layer, not a setting: a state dict saved before
            # groups had one keeps the axis this optimizer was built with.
            group.setdefault("nm_dim", before[2])
            for key in keys[index] - set(group):
                if key in self.defaults:
                    group[key] = self.defaults[key]
            if foreign:
                group["step"] = 0
                self._prepare_group(group)
            if (group["n"], group["m"], group["nm_dim"]) != before:
                warnings.warn(
                    f"{type(self).__name__}.load_state_dict: param group {index} was saved at "
                    f"{pattern_name(group['n'], group['m'], group['nm_dim'])} and now trains at "
                    f"that pattern instead of {pattern_name(*before)}",
                    UserWarning,
                    stacklevel=user_stacklevel(),
                )
        params = chain.from_iterable(group["params"] for group in self.param_groups)
        for i, p in zip(ids, params, strict=True):
            for key, value in exact.get(i, {}).items():
                self.state[p][key] = value.to(device=p.device)
            self._loaded(p)

    def _loaded(self, p: Tensor) -> None:
        """Called for each parameter after :meth:`load_state_dict`."""

    def sparsity_report(self) -> list[dict[str, Any]]:
        """One plain ``dict`` per parameter, for logging: ``name`` (from ``param_names`` when
        the group has them), ``group``, ``shape``, ``sparse``, ``n``, ``m``, ``step``,
        ``phase``, ``density`` (kept fraction of the mask; 1.0 for dense parameters),
        ``nm_valid`` (every block of the weight has at most ``n`` non-zeros; ``None`` for
        dense), ``nm_dim``, and, at the last mask update, ``flips`` (entries whose mask
        changed) and ``frozen_blocks`` (blocks OBF froze) out of ``blocks``."""
        return report.sparsity_report(self)


def _any(tensor: Tensor) -> bool:
    # A sharded gradient is reduced over all shards, so every rank gets the same answer.
    found = tensor.any()
    return bool(found.full_tensor() if is_sharded(found) else found)
