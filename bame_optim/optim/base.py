"""What every N:M optimizer of the package shares: argument checks, the step counter, reporting.

:class:`NMOptimizer` is the small base of :class:`bame_optim.BAMESGD` (compact state over the
engine) and of the straight-through peers (:mod:`bame_optim.peers`, dense weights in state).
A subclass writes five methods: :meth:`NMOptimizer._step_group` (one group's update),
:meth:`~NMOptimizer.kept_mask`, :meth:`~NMOptimizer.phase_name`,
:meth:`~NMOptimizer.mask_update_due` and :meth:`~NMOptimizer.last_mask_update`; everything else
is here.
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

from bame_optim.core.nm import GROUPED_DIM, NM_DIMS, check_nm, is_nm_sparse, nm_layout, num_blocks
from bame_optim.core.validation import check_sgd_hyper
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
    advances once per ``step()`` that applied an update (docs/design.md section 5, "The step
    counter").
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
        self._warn_about_sparse_choice()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (see :meth:`torch.optim.Optimizer.add_param_group`) and validate it."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._validate_update(group)
        check_nm(group["n"], group["m"])
        if group["sparse"] not in (None, True, False):
            raise ValueError(f"Invalid sparse value: {group['sparse']!r} (True, False or None)")
        _check_nm_dim(group)
        if group["nm_dim"] == 0 and not self.blocks_along_dim0 and group["sparse"] is not False:
            raise ValueError(
                f"Invalid nm_dim value: 0 ({type(self).__name__} keeps its masks along "
                "dimension 1 only; [in, out] weights such as Hugging Face Conv1D train with "
                "BAMESGD, BAMEAdamW, RigLSGD or ASPSGD)"
            )
        self._prepare_group(group)
        group.setdefault("step", 0)
        if group["sparse"]:
            for p in group["params"]:
                _check_sparse_param(p, group["m"], group["nm_dim"])

    def _validate_update(self, group: dict[str, Any]) -> None:
        """``ValueError`` naming a bad hyper-parameter of the update rule (SGD's here)."""
        check_sgd_hyper(group)

    def _prepare_group(self, group: dict[str, Any]) -> None:
        """Validate and resolve the subclass's own keywords of a new group."""

    @staticmethod
    def _is_sparse(p: Tensor, group: dict[str, Any]) -> bool:
        if group["sparse"] is not None:
            return bool(group["sparse"])
        nm_dim = group["nm_dim"]
        return (
            p.ndim >= 2
            and (nm_dim == GROUPED_DIM or p.ndim == 2)
            and p.is_floating_point()
            and p.layout == torch.strided
            and p.shape[nm_dim] % group["m"] == 0
        )

    def _warn_about_sparse_choice(self) -> None:
        """Warn at construction when no parameter is sparse (the optimizer would train dense;
        not when the constructor was given ``sparse=False``), or when ``sparse=None`` made 2-D
        parameters sparse by their shape alone."""
        groups = self.param_groups
        if self.defaults["sparse"] is False:
            return  # asked to train dense
        if not any(self._is_sparse(p, g) for g in groups for p in g["params"]):
            if all(g["sparse"] is False for g in groups):
                why = "every param group has sparse=False"
            elif all(not g["params"] for g in groups if g["sparse"] is not False):
                why = "the groups marked sparse hold no parameter"
            else:
                why = ("sparse=None found no floating parameter with ndim >= 2 whose input "
                       "dimension divides by m=" + "/".join(sorted(
                           {str(g["m"]) for g in groups if g["sparse"] is None})))
            warnings.warn(
                f"{type(self).__name__}: no parameter is N:M sparse ({why}), so it trains "
                "dense; nm_param_groups(model, n, m) chooses the sparse layers of a model",
                UserWarning,
                stacklevel=user_stacklevel(),
            )
            return
        guessed = [
            (g, j) for g in groups if g["sparse"] is None
            for j, p in enumerate(g["params"]) if p.ndim == 2 and self._is_sparse(p, g)
        ]
        if guessed:
            group, j = guessed[0]
            names = group.get("param_names")
            example = names[j] if names else f"shape {tuple(group['params'][j].shape)}"
            warnings.warn(
                f"{type(self).__name__}: sparse=None made {len(guessed)} 2-D parameter(s) "
                f"N:M along dimension {group['nm_dim']} by shape alone (e.g. {example}). A "
                "tensor does not say which layer it belongs to: an embedding or LM head would "
                "be pruned like a Linear weight, and an [in, out] weight (Hugging Face Conv1D, "
                "e.g. GPT-2) along its output dimension. nm_param_groups(model, n, m) chooses "
                "by layer and axis (and silences this warning)",
                UserWarning,
                stacklevel=user_stacklevel(),
            )

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
        rows = [row for row in self.sparsity_report() if row["sparse"]]
        checked = [row["name"] for row in rows]
        broken = [f"{row['name']} {row['shape']} (phase {row['phase']!r} at step {row['step']})"
                  for row in rows if not row["nm_valid"]]
        if not checked:
            raise RuntimeError(
                f"{type(self).__name__}.check_nm: no parameter is N:M sparse, so there is "
                "nothing to check (every group is dense; see nm_param_groups)"
            )
        if broken:
            raise RuntimeError(
                f"{type(self).__name__}.check_nm: {len(broken)} of {len(checked)} sparse "
                f"parameter(s) are not N:M: " + "; ".join(broken) + ". Before t_i the masks "
                "keep more than n per block: finalize_masks() prunes to N:M now"
            )
        return checked

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
                saved = _pattern(group["n"], group["m"], group["nm_dim"])
                warnings.warn(
                    f"{type(self).__name__}.load_state_dict: param group {index} was saved at "
                    f"{saved} and now trains at that pattern instead of {_pattern(*before)}",
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
                    "nm_valid": is_nm_sparse(
                        nm_layout(local_tensor(p).detach(), group["nm_dim"]), group["n"],
                        group["m"],
                    )
                    if sparse
                    else None,
                    "flips": state.get("last_flips", 0),
                    "frozen_blocks": state.get("last_frozen", 0),
                    "blocks": num_blocks(nm_layout(p, group["nm_dim"]).shape, group["m"])
                    if sparse else None,
                    "nm_dim": group["nm_dim"] if sparse else None,
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


def _pattern(n: int, m: int, nm_dim: int) -> str:
    return f"{n}:{m}" + ("" if nm_dim == GROUPED_DIM else f" along dimension {nm_dim}")


def _check_nm_dim(group: dict[str, Any]) -> None:
    """``ValueError`` unless the group's ``nm_dim`` is 0 or 1, and 0 only for plain 2-D
    parameters (FSDP2 shards rows, so blocks along dimension 0 would cross shards)."""
    nm_dim = group["nm_dim"]
    if isinstance(nm_dim, bool) or nm_dim not in NM_DIMS:
        raise ValueError(f"Invalid nm_dim value: {nm_dim!r} (1: [out, in, ...] weights such as "
                         "nn.Linear; 0: [in, out] weights such as Hugging Face Conv1D)")
    if nm_dim == 0:
        for p in group["params"]:
            if is_sharded(p) and group["sparse"] is not False:
                raise ValueError(
                    f"Invalid nm_dim value: 0 for a sharded (FSDP2) parameter of shape "
                    f"{tuple(p.shape)}: its blocks would cross the row shards"
                )


def _check_sparse_param(p: Tensor, m: int, nm_dim: int = GROUPED_DIM) -> None:
    if not p.is_floating_point() or p.layout != torch.strided:
        raise ValueError(
            f"Invalid sparse parameter of shape {tuple(p.shape)}, dtype {p.dtype}, layout "
            f"{p.layout}: N:M masks need a dense floating-point tensor"
        )
    num_blocks(nm_layout(p, nm_dim).shape, m)


def _any(tensor: Tensor) -> bool:
    # A sharded gradient is reduced over all shards, so every rank gets the same answer.
    found = tensor.any()
    return bool(found.full_tensor() if is_sharded(found) else found)
