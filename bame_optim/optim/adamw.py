r"""BAMEAdamW: AdamW over the same masks, schedule and compact state as BAMESGD, and AdamW's
:class:`~bame_optim.optim.update_rule.UpdateRule`."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, MutableMapping
from typing import Any

import torch
from torch import Tensor
from torch.optim.adamw import adamw
from torch.optim.optimizer import _get_scalar_dtype

from bame_optim.core.validation import check_adamw_hyper
from bame_optim.optim.functional import kept_adamw
from bame_optim.optim.keywords import check_fused_flags
from bame_optim.optim.masked import MaskedOptimizer
from bame_optim.optim.rules import BAME_RULES
from bame_optim.optim.update_rule import UpdateRule

__all__ = ["ADAMW_DEFAULTS", "ADAMW_RULE", "BAME_ADAMW_RULES", "BAMEAdamW"]

ADAMW_DEFAULTS: dict[str, Any] = {
    "lr": 1e-3,
    "betas": (0.9, 0.999),
    "eps": 1e-8,
    "weight_decay": 1e-2,
    "amsgrad": False,
    "maximize": False,
    "foreach": None,
    "capturable": False,
    "differentiable": False,
    "fused": None,
}
""":class:`torch.optim.AdamW`'s keywords and defaults."""

_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _validate(group: dict[str, Any], owner: str) -> None:
    check_adamw_hyper(group)
    check_fused_flags(group, owner, torch_keywords=("capturable", "differentiable"))


def _hyper(group: dict[str, Any]) -> dict[str, Any]:
    beta1, beta2 = group["betas"]
    return dict(amsgrad=group["amsgrad"], beta1=beta1, beta2=beta2, lr=group["lr"],
                weight_decay=group["weight_decay"], eps=group["eps"],
                maximize=group["maximize"], foreach=group["foreach"])


def _dense_step(state: MutableMapping[Tensor, dict[str, Any]], group: dict[str, Any],
                params: list[Tensor]) -> None:
    """:func:`torch.optim.adamw.adamw` on dense parameters, with :class:`torch.optim.AdamW`'s
    lazily created state."""
    amsgrad = group["amsgrad"]
    states = []
    for p in params:
        if p.grad.is_sparse:
            raise RuntimeError(
                f"Invalid gradient layout for a dense parameter of shape {tuple(p.shape)}: "
                "AdamW does not support sparse gradients, use torch.optim.SparseAdam"
            )
        saved = state[p]
        if "step" not in saved:
            saved["step"] = _new_step()
            saved["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            saved["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if amsgrad and "max_exp_avg_sq" not in saved:
            saved["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        states.append(saved)
    adamw(
        params, [p.grad for p in params],
        [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
        [s["max_exp_avg_sq"] for s in states] if amsgrad else [],
        [s["step"] for s in states],
        has_complex=any(torch.is_complex(p) for p in params),
        fused=group["fused"] or None, **_hyper(group),
    )


def _kept_step(group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
               states: list[dict[str, Any]]) -> None:
    """:func:`bame_optim.optim.functional.kept_adamw` on the kept weights; the compact moments
    start as zeros ``[K, kept_count]`` (a revived weight's are 0, docs/design.md section 4)."""
    amsgrad = group["amsgrad"]
    wanted = _MOMENTS[:3 if amsgrad else 2]
    for p, state in zip(params, states, strict=True):
        if ("step" not in state or state.get("exp_avg") is None
                or state.get("exp_avg_sq") is None
                or (amsgrad and state.get("max_exp_avg_sq") is None)):  # wanted, unrolled
            state.setdefault("step", _new_step())
            shape = (p.numel() // group["m"], state["kept_count"])
            for name in wanted:
                if state.get(name) is None:
                    state[name] = torch.zeros(shape, dtype=p.dtype, device=p.device)
    kept_adamw(
        params, grads, *([state[name] for state in states] for name in wanted[:2]),
        [state["max_exp_avg_sq"] for state in states] if amsgrad else [],
        [state["step"] for state in states], [state["kept"] for state in states],
        [state["kept_count"] for state in states],
        m=group["m"], fused=group["fused"], **_hyper(group),
    )


def _upgrade_state(state: dict[str, Any]) -> None:
    if "step" in state and not torch.is_tensor(state["step"]):  # a Python number, as AdamW
        state["step"] = torch.tensor(float(state["step"]), dtype=_get_scalar_dtype())


def _new_step() -> Tensor:
    # torch.optim.AdamW's step counter: a CPU scalar in the default float dtype.
    return torch.tensor(0.0, dtype=_get_scalar_dtype())


ADAMW_RULE = UpdateRule(
    defaults=ADAMW_DEFAULTS,
    buffers=_MOMENTS,
    validate=_validate,
    dense_step=_dense_step,
    kept_step=_kept_step,
    dense_class=torch.optim.AdamW,
    upgrade_state=_upgrade_state,
)
""":class:`torch.optim.AdamW`'s update (decoupled weight decay) on the kept weights, its step
count one per parameter (docs/design.md section 4)."""

BAME_ADAMW_RULES = dataclasses.replace(
    BAME_RULES, keywords=BAME_RULES.keywords | {"revive_score": "adam"}
)
"""BAME's rules, with the revive score of LMA chosen by ``revive_score`` (default
``"adam"``: ``η |G|``, see :func:`bame_optim.core.evolution.lma_scores`)."""


class BAMEAdamW(MaskedOptimizer):
    r"""AdamW (decoupled weight decay) that keeps N:M sparse weights and evolves their masks
    with BAME: :class:`bame_optim.BAMESGD`'s schedule, mask rules and compact state, with
    Adam's update on the kept weights (:func:`bame_optim.optim.functional.kept_adamw`).
    Dense parameters follow :class:`torch.optim.AdamW` exactly. The update, the revive score
    ``η |G|`` and the bias correction of a revived weight: docs/design.md section 4;
    keywords, state, checkpoints: section 5.

    Args:
        params: parameters or param groups, as :class:`bame_optim.BAMESGD`.
        lr, betas, eps, weight_decay, amsgrad, maximize, foreach, capturable, differentiable,
            fused: as :class:`torch.optim.AdamW` (``lr`` and the betas may be Tensors;
            ``capturable`` and ``differentiable`` only ``False``; ``fused=True`` the fused
            paths or a ``ValueError``, ``None`` the fused kernel for sparse parameters where
            it runs, ``False`` never).
        n, m, total_steps, t_i, t_f, delta_t, alpha, beta, gamma, seed, sparse: as
            :class:`bame_optim.BAMESGD`.
        revive_score: ``"adam"`` (default) or ``"sgd"``: LMA's score of a pruned weight.

    The compact moments read in the parameter's layout through :meth:`exp_avg` /
    :meth:`exp_avg_sq`.
    """

    update_rule = ADAMW_RULE
    rules = BAME_ADAMW_RULES

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
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
        revive_score: str | None = None,
        sparse: bool | None = None,
    ) -> None:
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            maximize=maximize, foreach=foreach, capturable=capturable,
            differentiable=differentiable, fused=fused, n=n, m=m, total_steps=total_steps,
            t_i=t_i, t_f=t_f, delta_t=delta_t, alpha=alpha, beta=beta, gamma=gamma, seed=seed,
            revive_score=revive_score, sparse=sparse,
        )

    def exp_avg(self, p: Tensor) -> Tensor | None:
        """``exp_avg`` of ``p`` in the parameter's layout (zeros at pruned entries), or
        ``None`` before ``p``'s first step."""
        return self._dense_view(p, "exp_avg")

    def exp_avg_sq(self, p: Tensor) -> Tensor | None:
        """``exp_avg_sq`` of ``p`` in the parameter's layout (zeros at pruned entries), or
        ``None`` before ``p``'s first step."""
        return self._dense_view(p, "exp_avg_sq")
