r"""BAMEAdamW: AdamW over the same masks, schedule and compact state as BAMESGD."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim.adamw import adamw
from torch.optim.optimizer import _get_scalar_dtype

from bame_optim.core.validation import check_adamw_hyper
from bame_optim.optim.engine import NMEngine
from bame_optim.optim.functional import kept_adamw, plain_tensors
from bame_optim.optim.keywords import check_fused_flags
from bame_optim.optim.masked import MaskedOptimizer, SparseState
from bame_optim.optim.rules import BAME_RULES, MaskRules
from bame_optim.optim.sharded import local_tensor

__all__ = ["ADAMW_DEFAULTS", "BAME_ADAMW_RULES", "BAMEAdamW"]

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

BAME_ADAMW_RULES = dataclasses.replace(
    BAME_RULES, keywords=BAME_RULES.keywords | {"revive_score": "adam"}
)
"""BAME's rules, with the revive score of LMA chosen by ``revive_score`` (default
``"adam"``: ``η |G|``, see :func:`bame_optim.core.evolution.lma_scores`)."""


class BAMEAdamW(MaskedOptimizer):
    r"""AdamW (decoupled weight decay) that keeps N:M sparse weights and evolves their masks
    with BAME: :class:`bame_optim.BAMESGD`'s schedule, mask rules and compact state, with
    Adam's update on the kept weights (:func:`bame_optim.optim.functional.kept_adamw`). Dense
    parameters go through :func:`torch.optim.adamw.adamw` and follow
    :class:`torch.optim.AdamW` exactly. The update, the revive score ``η |G|`` and the bias
    correction of a revived weight: docs/design.md section 4; keywords, state, checkpoints:
    section 5.

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

    The compact moments (``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``: ``[K, kept_count]``)
    read in the parameter's layout through :meth:`exp_avg` / :meth:`exp_avg_sq`.
    """

    rules: ClassVar[MaskRules] = BAME_ADAMW_RULES
    engine: ClassVar[NMEngine] = NMEngine(("exp_avg", "exp_avg_sq", "max_exp_avg_sq"))
    dense_class = torch.optim.AdamW
    update_keywords: ClassVar[frozenset[str]] = frozenset(ADAMW_DEFAULTS)

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
        rule_keywords = dict(total_steps=total_steps, t_i=t_i, t_f=t_f, delta_t=delta_t,
                             alpha=alpha, beta=beta, gamma=gamma, seed=seed,
                             revive_score=revive_score)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=foreach, capturable=capturable,
                        differentiable=differentiable, fused=fused, n=n, m=m, sparse=sparse)
        super().__init__(params, defaults, rule_keywords)

    def _validate_update(self, group: dict[str, Any]) -> None:
        check_adamw_hyper(group)
        check_fused_flags(group, type(self).__name__, torch_keywords=("capturable",
                                                                       "differentiable"))

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for saved in self.state.values():  # older checkpoints hold a Python number, as AdamW
            if "step" in saved and not torch.is_tensor(saved["step"]):
                saved["step"] = torch.tensor(float(saved["step"]), dtype=_get_scalar_dtype())

    def _update(
        self, group: dict[str, Any], dense: list[Tensor], sparse: list[SparseState]
    ) -> None:
        beta1, beta2 = group["betas"]
        hyper = dict(amsgrad=group["amsgrad"], beta1=beta1, beta2=beta2, lr=group["lr"],
                     weight_decay=group["weight_decay"], eps=group["eps"],
                     maximize=group["maximize"], foreach=group["foreach"])
        if dense:
            states = [self._dense_state(p, group["amsgrad"]) for p in dense]
            adamw(
                dense, [p.grad for p in dense],
                [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                [s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else [],
                [s["step"] for s in states],
                has_complex=any(torch.is_complex(p) for p in dense),
                fused=group["fused"] or None, **hyper,
            )
        if sparse and plain_tensors(s.param for s in sparse):
            # No shard: the state holds this rank's tensors as they are (the engine's local
            # views and stores would only add per-parameter checks to every step).
            states = [s.state for s in sparse]
            wanted = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")[:3 if group["amsgrad"] else 2]
            for s, state in zip(sparse, states, strict=True):
                if "step" not in state or any(state.get(name) is None for name in wanted):
                    moments = self._kept_moments(s.param, state, group)
                    for name, buffer in zip(self.engine.buffers, moments, strict=True):
                        if buffer is not None:
                            state[name] = buffer
            kept_adamw(
                [s.param for s in sparse], [s.grad for s in sparse],
                *([state[name] for state in states] for name in wanted[:2]),
                [state["max_exp_avg_sq"] for state in states] if group["amsgrad"] else [],
                [state["step"] for state in states], [state["kept"] for state in states],
                [state["kept_count"] for state in states],
                m=group["m"], fused=group["fused"], **hyper,
            )
        elif sparse:
            engine, m = self.engine, group["m"]
            moments = [self._kept_moments(s.param, s.state, group) for s in sparse]
            kept_adamw(
                [local_tensor(s.param) for s in sparse],
                [local_tensor(s.grad) for s in sparse],
                [b[0] for b in moments], [b[1] for b in moments],
                [b[2] for b in moments] if group["amsgrad"] else [],
                [s.state["step"] for s in sparse],
                [engine.local_code(s.state) for s in sparse],
                [s.state["kept_count"] for s in sparse],
                m=m, fused=group["fused"], **hyper,
            )
            for s, buffers in zip(sparse, moments, strict=True):
                engine.store_buffers(s.param, s.state, buffers, m)

    def _dense_state(self, p: Tensor, amsgrad: bool) -> dict[str, Any]:
        """:class:`torch.optim.AdamW`'s lazily created state of a dense parameter."""
        if p.grad.is_sparse:
            raise RuntimeError(
                f"Invalid gradient layout for a dense parameter of shape {tuple(p.shape)}: "
                "AdamW does not support sparse gradients, use torch.optim.SparseAdam"
            )
        state = self.state[p]
        if "step" not in state:
            state["step"] = _new_step()
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if amsgrad and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _kept_moments(self, p: Tensor, state: dict[str, Any], group: dict[str, Any]
                      ) -> list[Tensor | None]:
        """This rank's compact moments of a sparse parameter in the order of the engine's
        buffers, created as zeros ``[K, kept_count]`` on its first step; ``max_exp_avg_sq`` is
        ``None`` without ``amsgrad``."""
        state.setdefault("step", _new_step())
        local = local_tensor(p)
        shape = (local.numel() // group["m"], state["kept_count"])
        wanted = {"exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if group["amsgrad"] else set())
        return [
            None if name not in wanted
            else torch.zeros(shape, dtype=local.dtype, device=local.device) if buffer is None
            else buffer
            for name, buffer in zip(self.engine.buffers, self.engine.local_buffers(p, state),
                                    strict=True)
        ]

    def exp_avg(self, p: Tensor) -> Tensor | None:
        """``exp_avg`` of ``p`` in the parameter's layout (zeros at pruned entries), or
        ``None`` before ``p``'s first step."""
        return self._dense_view(p, "exp_avg")

    def exp_avg_sq(self, p: Tensor) -> Tensor | None:
        """``exp_avg_sq`` of ``p`` in the parameter's layout (zeros at pruned entries), or
        ``None`` before ``p``'s first step."""
        return self._dense_view(p, "exp_avg_sq")


def _new_step() -> Tensor:
    # torch.optim.AdamW's step counter: a CPU scalar in the default float dtype.
    return torch.tensor(0.0, dtype=_get_scalar_dtype())
