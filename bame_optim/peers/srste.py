r"""SR-STE: sparse-refined straight-through estimator (Zhou et al., ICLR 2021, "Learning N:M
Fine-grained Structured Sparse Neural Networks From Scratch"; the paper's Tables 1-2 "SR-STE").

Dense weights :math:`W` are trained; every forward uses :math:`\widetilde W = W \odot B` with
:math:`B` the top-N :math:`|W|` of every block, recomputed at every step. The gradient of the
masked weight is passed straight through to :math:`W`, plus the sparse-refined decay that pulls
the pruned weights towards zero (the SR-STE paper's update rule):

.. math::
    W \leftarrow W - \eta \Big( \frac{\partial L}{\partial \widetilde W}
        + \lambda_W \, (1 - B) \odot W \Big), \qquad \lambda_W = 2 \times 10^{-4}.

Training-FLOPs profile: sparse forward (density N/M), dense backward by design: the input
gradient multiplies by :math:`\widetilde W^\top`, which is not N:M along its rows (so it is
counted dense), and the weight gradient :math:`\partial L/\partial \widetilde W` is needed at
every weight, pruned ones included. That is :math:`(N/M + 2)/3` of dense training (0.83x for
2:4 and 0.75x for 1:4; the BAME paper's Table 1 lists 0.83x and 0.74x).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor

from bame_optim.core.evolution import score_dtype
from bame_optim.core.nm import blocks_to_param, param_to_blocks, top_n_mask
from bame_optim.core.validation import check_nonnegative
from bame_optim.peers.ste import DenseSTESGD

__all__ = ["DEFAULT_SRSTE_DECAY", "SRSTESGD", "srste_decay_term", "srste_mask"]

DEFAULT_SRSTE_DECAY = 2e-4
"""λ_W, the SR-STE paper's value."""


def srste_mask(weight: Tensor, kept: Tensor, n: int) -> Tensor:
    """Top-``n`` ``|W|`` of every block ``[K, M]``; ties keep the currently kept weight, then
    the lower index (so an unchanged weight gives an unchanged mask)."""
    return top_n_mask(weight.to(score_dtype(weight.dtype)).abs(), n, prefer=kept)


def srste_decay_term(weight: Tensor, kept: Tensor) -> Tensor:
    """``(1 - B) ⊙ W`` in the parameter's layout; ``kept`` is the ``[K, M]`` block mask."""
    return torch.where(blocks_to_param(kept, weight.shape), 0, weight)


class SRSTESGD(DenseSTESGD):
    r"""SGD with SR-STE: dense weights, top-N-magnitude forward mask every step,
    straight-through gradient plus the sparse-refined decay :math:`\lambda_W (1 - B) \odot W`.

    For a sparse parameter ``p`` each ``step()`` does, with :math:`W` = ``state["dense_weight"]``
    (copied from ``p`` at the first step) and :math:`B` = ``state["mask"]`` (the mask of the
    forward that produced ``p.grad``; all ones at the first step, whose forward was dense):

    .. math::
        g \leftarrow \texttt{p.grad} + \lambda_W (1 - B) \odot W, \quad
        W \leftarrow \text{SGD}(W, g), \quad
        B \leftarrow \text{top-}N\, |W| \text{ per block}, \quad
        \texttt{p} \leftarrow W \odot B

    where SGD is :class:`torch.optim.SGD`'s arithmetic (momentum, dampening, weight decay,
    Nesterov; the momentum buffer is dense, in ``state["momentum_buffer"]``). Ties in ``|W|``
    keep the current mask, then the lower index. With ``maximize=True`` the decay still pulls
    pruned weights towards zero. Dense parameters follow :class:`torch.optim.SGD` exactly.

    Args:
        params, lr, momentum, dampening, weight_decay, nesterov, maximize, foreach, n, m,
            sparse: as :class:`bame_optim.BAMESGD`.
        srste_decay: :math:`\lambda_W` (default ``2e-4``, the SR-STE paper's value);
            ``0`` gives the plain STE.

    There is no mask schedule: BAME's schedule and OBF keywords (``total_steps``, ``t_i``,
    ``t_f``, ``delta_t``, ``alpha``, ``beta``, ``gamma``, ``seed``) are not taken.
    ``sparsity_report`` rows have ``phase == "evolve"`` and
    ``flips`` counts the mask entries that changed at the last step.

    .. note:: The dense weights live in the optimizer: save the optimizer's state dict with
       the model. Loading only the model's parameters gives ``W ⊙ B``, the deployable weights.
    """

    method_defaults: ClassVar[dict[str, Any]] = {"srste_decay": DEFAULT_SRSTE_DECAY}

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        srste_decay: float = DEFAULT_SRSTE_DECAY,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            params, lr, momentum, dampening, weight_decay, nesterov, srste_decay=srste_decay,
            **kwargs,
        )

    def _prepare_group(self, group: dict[str, Any]) -> None:
        check_nonnegative("srste_decay", group["srste_decay"])

    def _dense_grad(self, grad: Tensor, state: dict[str, Any], group: dict[str, Any]) -> Tensor:
        decay = group["srste_decay"]
        if decay == 0:
            return grad
        # torch's sgd negates the gradient when maximizing: the decay must survive that.
        sign = -1.0 if group["maximize"] else 1.0
        term = srste_decay_term(state["dense_weight"], state["mask"])
        return grad.add(term, alpha=sign * decay)

    def _new_mask(self, p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> Tensor:
        weight = param_to_blocks(state["dense_weight"], group["m"])
        return srste_mask(weight, state["mask"], group["n"])
