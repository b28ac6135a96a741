"""What every N:M optimizer of the package shares: argument checks, the step counter, reporting.

:class:`NMOptimizer` is the small base of :class:`bame_optim.BAMESGD` (compact state over the
engine) and of the straight-through peers (:mod:`bame_optim.peers`, dense weights in state).
A subclass writes :meth:`NMOptimizer._step_group` (one group's update), :meth:`kept_mask` and
:meth:`phase_name`; everything else is here.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer

from bame_optim.core.nm import check_nm, is_nm_sparse, num_blocks
from bame_optim.optim.sharded import is_sharded, local_tensor

__all__ = ["SGD_DEFAULTS", "NMOptimizer", "user_stacklevel"]

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


class NMOptimizer(Optimizer):
    """Base of the N:M optimizers: SGD's hyper-parameters plus ``n``, ``m`` and ``sparse``.

    ``sparse`` per group: ``True`` (every parameter must be N:M-divisible), ``False`` (plain
    :class:`torch.optim.SGD`) or ``None`` (sparse when ``ndim >= 2``, floating, strided and
    dimension 1 divides by ``m``). The step counter is ``param_groups[i]["step"]``; it
    advances once per ``step()`` that applied an update (DESIGN.md section 3).
    """

    _exact_dtype_state: ClassVar[tuple[str, ...]] = ()
    """State that ``Optimizer.load_state_dict`` would cast to the parameter's dtype."""

    def __init__(
        self, params: Iterable[Tensor] | Iterable[dict[str, Any]], defaults: dict[str, Any]
    ) -> None:
        self._validate_update(dict(defaults))  # before params, as torch.optim checks lr first
        if params is None or isinstance(params, (str, bytes)):
            raise TypeError(
                f"Invalid params value: {params!r} ({type(self).__name__} needs an iterable of "
                "Tensors or of param-group dicts, e.g. model.parameters())"
            )
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (see :meth:`torch.optim.Optimizer.add_param_group`) and validate it."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._validate_update(group)
        check_nm(group["n"], group["m"])
        if group["sparse"] not in (None, True, False):
            raise ValueError(f"Invalid sparse value: {group['sparse']!r} (True, False or None)")
        self._prepare_group(group)
        group.setdefault("step", 0)
        if group["sparse"]:
            for p in group["params"]:
                _check_sparse_param(p, group["m"])

    def _validate_update(self, group: dict[str, Any]) -> None:
        """``ValueError`` naming a bad hyper-parameter of the update rule (SGD's here)."""
        _validate_sgd(group)

    def _prepare_group(self, group: dict[str, Any]) -> None:
        """Validate and resolve the subclass's own keywords of a new group."""

    @staticmethod
    def _is_sparse(p: Tensor, group: dict[str, Any]) -> bool:
        if group["sparse"] is not None:
            return bool(group["sparse"])
        return (
            p.ndim >= 2
            and p.is_floating_point()
            and p.layout == torch.strided
            and p.shape[1] % group["m"] == 0
        )

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
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        if all(p.grad is None for p in params):
            return loss
        advance = not self._is_state_init_call()
        index = 0
        for group in self.param_groups:
            self._step_group(group, first_index=index, advance=advance)
            index += len(group["params"])
            if advance:
                group["step"] += 1
        self._after_step(advance)
        return loss

    def _after_step(self, advanced: bool) -> None:
        """Called at the end of a ``step()`` that ran (``advanced``: its counter moved)."""

    def _step_group(self, group: dict[str, Any], *, first_index: int, advance: bool) -> None:
        """Update one group. ``advance=False`` is the state-initialising call: create state,
        change nothing else."""
        raise NotImplementedError

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
        (``Optimizer.load_state_dict`` casts every state tensor to the parameter's dtype;
        ``Accelerator.prepare`` round-trips through it once).

        Group keys missing from the saved groups get this optimizer's defaults, as
        :class:`torch.optim.SGD` does. A state dict of another optimizer (no ``step`` in its
        groups, e.g. a :class:`torch.optim.SGD` checkpoint) starts this optimizer's schedule
        at step 0 (see :meth:`_loaded` for its per-parameter state). The saved groups' N:M
        pattern wins over the current one, with a warning when they differ.
        """
        saved = state_dict["state"]
        ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        exact = {
            i: {k: saved[i][k] for k in self._exact_dtype_state if k in saved[i]}
            for i in ids
            if i in saved
        }
        patterns = [(g["n"], g["m"]) for g in self.param_groups]
        keys = [set(g) - {"params", "step"} for g in self.param_groups]
        super().load_state_dict(state_dict)
        for index, (group, before) in enumerate(zip(self.param_groups, patterns, strict=True)):
            foreign = "step" not in group
            for key in keys[index] - set(group):
                if key in self.defaults:
                    group[key] = self.defaults[key]
            if foreign:
                group["step"] = 0
                self._prepare_group(group)
            if (group["n"], group["m"]) != before:
                warnings.warn(
                    f"{type(self).__name__}.load_state_dict: param group {index} was saved at "
                    f"{group['n']}:{group['m']} and now trains at that pattern instead of "
                    f"{before[0]}:{before[1]}",
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
        dense), and, at the last mask update, ``flips`` (entries whose mask changed) and
        ``frozen_blocks`` (blocks OBF froze) out of ``blocks``."""
        rows = []
        for g, group in enumerate(self.param_groups):
            names = group.get("param_names")
            for j, p in enumerate(group["params"]):
                sparse = self._is_sparse(p, group)
                state = self.state.get(p, {})
                mask = self.kept_mask(p) if sparse else None
                rows.append({
                    "name": names[j] if names else f"group{g}.param{j}",
                    "group": g,
                    "shape": tuple(p.shape),
                    "sparse": sparse,
                    "n": group["n"] if sparse else None,
                    "m": group["m"] if sparse else None,
                    "step": group["step"],
                    "phase": self.phase_name(group),
                    "density": float(mask.float().mean()) if mask is not None else 1.0,
                    "nm_valid": is_nm_sparse(local_tensor(p).detach(), group["n"], group["m"])
                    if sparse
                    else None,
                    "flips": state.get("last_flips", 0),
                    "frozen_blocks": state.get("last_frozen", 0),
                    "blocks": num_blocks(p.shape, group["m"]) if sparse else None,
                })
        return rows


_INTERNAL_MODULES = ("bame_optim.optim.", "bame_optim.core.", "bame_optim.peers.",
                     "bame_optim.methods", "torch.", "accelerate.", "transformers.")


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning raised by the caller point at the first frame
    outside the optimizers, the method registry, torch and the wrappers that step them
    (Accelerate, transformers): the user's ``step()``, constructor or ``make_optimizer`` call,
    however deep the class hierarchy between them."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith(_INTERNAL_MODULES):
        frame, level = frame.f_back, level + 1
    return level


def check_fraction(group: dict[str, Any], name: str) -> None:
    """``ValueError`` naming ``name`` unless ``group[name]`` is a number in [0, 1]."""
    value = group[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"Invalid {name} value: {value!r} (must be in [0, 1])")


def check_nonnegative(group: dict[str, Any], name: str, *, optional: bool = False) -> None:
    """``ValueError`` naming ``name`` unless ``group[name]`` is a finite float >= 0."""
    value = group[name]
    if optional and value is None:
        return
    if (
        isinstance(value, (bool, Tensor))
        or not isinstance(value, (int, float))
        or not 0 <= value < float("inf")
    ):
        raise ValueError(f"Invalid {name} value: {value!r} (a float >= 0 is required)")


def check_integer(group: dict[str, Any], name: str, minimum: int) -> None:
    """``ValueError`` naming ``name`` unless ``group[name]`` is an integer >= ``minimum``."""
    value = group[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"Invalid {name} value: {value!r} (an integer >= {minimum} is required)")


def _validate_sgd(group: dict[str, Any]) -> None:
    lr = group["lr"]
    if isinstance(lr, Tensor) and (lr.numel() != 1 or not lr.is_floating_point()):
        raise ValueError(f"Invalid lr value: a Tensor lr must be one floating element, got "
                         f"shape {tuple(lr.shape)} dtype {lr.dtype}")
    for name in ("lr", "momentum", "dampening", "weight_decay"):
        value = group[name]
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (number or (name == "lr" and isinstance(value, Tensor))) or not value >= 0:
            raise ValueError(f"Invalid {name} value: {value!r} (a float >= 0 is required)")
    if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
        raise ValueError(
            f"Invalid nesterov value: True (Nesterov momentum requires a momentum and zero "
            f"dampening; got momentum={group['momentum']}, dampening={group['dampening']})"
        )


def _check_sparse_param(p: Tensor, m: int) -> None:
    if not p.is_floating_point() or p.layout != torch.strided:
        raise ValueError(
            f"Invalid sparse parameter of shape {tuple(p.shape)}, dtype {p.dtype}, layout "
            f"{p.layout}: N:M masks need a dense floating-point tensor"
        )
    num_blocks(p.shape, m)


def _any(tensor: Tensor) -> bool:
    # A sharded gradient is reduced over all shards, so every rank gets the same answer.
    found = tensor.any()
    return bool(found.full_tensor() if is_sharded(found) else found)
