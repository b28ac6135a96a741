r"""MaxQ: soft N:M masks from multi-axis queries (Xiang et al., CVPR 2024, "MaxQ: Multi-Axis
Query for N:M Sparsity Network"; the BAME paper's Table 2 "MaxQ").

MaxQ trains dense weights :math:`W` as SR-STE does (:mod:`bame_optim.peers.srste`), but every
forward uses a *soft* N:M mask:

.. math::
    \widetilde W = W \odot B_t \odot (1 + S_\text{filter} + S_\text{kernel}),

* :math:`B_t`: the N:M mask (top-N :math:`|W|` of every block, :func:`srste_mask`), except
  that the :math:`\lfloor p(t) K \rfloor` blocks of smallest :math:`\|W_k\|_1` are kept whole:
  the incremental sparsity, with :math:`p(t)` falling from 1 to 0 at :math:`t_i`
  (:func:`dense_block_schedule`), so the share of N:M blocks grows from 0 to all;
* :math:`S_\text{axis}`: the query of one axis (:func:`axis_query`). Along an axis the weights
  fall into rows (the *filter* axis: the weights of one output channel; the *kernel* axis, for
  convolutions with more than one kernel position: the weights at one kernel position). In a
  row of :math:`L` magnitudes sorted :math:`s_1 \ge \dots \ge s_L` keep the top
  :math:`k = L - \lfloor (M - N) L / M \rfloor` (the share an N:M pattern keeps):

  .. math::
      S_j = [j \text{ in the top } k] \; \sigma\Big(\frac{|w_j| - \theta}{\tau}\Big), \qquad
      \theta = \frac{s_k + s_{k + 1}}{2}, \quad \tau = 10^{-2},

  so a kept weight that matters along both axes is enlarged up to three times.

The gradient passes straight through to :math:`W` (neither :math:`B_t` nor the scales touch
it), plus SR-STE's decay of the pruned weights, :math:`\lambda_W (1 - B_t) \odot W` with
:math:`\lambda_W = 2 \times 10^{-4}` (the public code's default ``--decay``, "decay for SR-STE").

Training-FLOPs profile (:mod:`bame_optim.flops`): forward :math:`d + (1 - d)\,p(t)` with
:math:`d = N/M`; backward dense, as SR-STE's.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from fractions import Fraction
from typing import Any, ClassVar

import torch
from torch import Tensor

from bame_optim.core.evolution import score_dtype
from bame_optim.core.nm import blocks_to_param, param_to_blocks
from bame_optim.core.validation import check_int
from bame_optim.optim.stacklevel import user_stacklevel
from bame_optim.peers.srste import DEFAULT_SRSTE_DECAY, SRSTESGD, srste_mask

__all__ = [
    "DEFAULT_SCHEDULE",
    "DEFAULT_TAU",
    "EXPONENTIAL_RATE",
    "RAMP_SHARE",
    "SCHEDULES",
    "MaxQSGD",
    "axis_query",
    "check_schedule",
    "dense_block_count",
    "dense_block_schedule",
    "dense_block_sum",
    "filter_query",
    "incremental_mask",
    "kernel_query",
    "maxq_weight",
    "resolve_ramp",
    "soft_scale",
]

SCHEDULES = ("linear", "cosine", "exponential", "cubic")
"""The ramps of the public code's ``--prune-schedule`` (``linear``, ``cos``, ``exp``, ``cubic``)."""
DEFAULT_SCHEDULE = "linear"
"""The public code's default, which its ImageNet scripts run."""
DEFAULT_TAU = 1e-2
"""τ, the sigmoid temperature of the public code's queries."""
EXPONENTIAL_RATE = 1.5
"""β of the exponential ramp: the public code's 0.05 per epoch over its 30-epoch ramp."""
RAMP_SHARE = Fraction(1, 4)
"""Default ``t_i / total_steps``: the public code's ImageNet ramp, epochs 0 to 30 of 120."""


# -- the incremental sparsity schedule --------------------------------------------------------


def resolve_ramp(total_steps: int | None, t_i: int | None) -> int:
    """``t_i``, the step whose forward is the first exactly N:M one; ``None`` is
    ``total_steps // 4``. ``ValueError`` naming the argument when it is not an integer >= 0,
    when ``total_steps`` is missing for the default, or when ``t_i > total_steps``."""
    for name, value in (("total_steps", total_steps), ("t_i", t_i)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 0):
            raise ValueError(f"Invalid {name} value: {value!r} (an integer >= 0 is required)")
    if t_i is None:
        if total_steps is None:
            raise ValueError("Invalid total_steps value: None (total_steps is required when t_i "
                             "is not given, since the default t_i is total_steps // 4)")
        return int(total_steps * RAMP_SHARE)
    if total_steps is not None and t_i > total_steps:
        raise ValueError(f"Invalid t_i value: {t_i} (t_i <= total_steps={total_steps} is required)")
    return t_i


def check_schedule(schedule: object) -> str:
    """``schedule`` if it names a ramp of :data:`SCHEDULES`, else ``ValueError`` naming it."""
    if schedule not in SCHEDULES:
        raise ValueError(f"Invalid sparsity_schedule value: {schedule!r} (one of "
                         f"{', '.join(map(repr, SCHEDULES))})")
    return schedule  # type: ignore[return-value]


def dense_block_schedule(schedule: str, t_i: int) -> Callable[[int], Fraction | float]:
    r"""The share :math:`p(t)` of blocks kept whole at the forward of step ``t`` (optax style:
    a function of the step count). With :math:`u = t / t_i` for :math:`0 \le t < t_i`:

    ==============  ==========================================================
    ``linear``      :math:`1 - u`
    ``cosine``      :math:`\cos(\pi u / 2)`
    ``exponential`` :math:`1 - (1 - e^{-\beta u}) / (1 - e^{-\beta})`, β = 1.5
    ``cubic``       :math:`(1 - u)^3`
    ==============  ==========================================================

    and :math:`p(t) = 0` from :math:`t_i` on (so ``t_i = 0`` has no ramp). ``linear`` and
    ``cubic`` are exact :class:`~fractions.Fraction`, the others floats.
    """
    check_schedule(schedule)
    check_int("t_i", t_i, 0)

    def fraction(t: int) -> Fraction | float:
        if t >= t_i:
            return Fraction(0)
        if schedule == "linear":
            return Fraction(t_i - t, t_i)
        if schedule == "cubic":
            return Fraction(t_i - t, t_i) ** 3
        u = t / t_i
        if schedule == "cosine":
            return math.cos(math.pi * u / 2)
        return 1 - (1 - math.exp(-EXPONENTIAL_RATE * u)) / (1 - math.exp(-EXPONENTIAL_RATE))

    return fraction


def dense_block_count(t: int, t_i: int, num_blocks: int, schedule: str) -> int:
    """:math:`\\lfloor p(t) K \\rfloor`: blocks of ``num_blocks`` kept whole at step ``t``."""
    return math.floor(dense_block_schedule(schedule, t_i)(t) * num_blocks)


def dense_block_sum(total_steps: int, t_i: int, schedule: str) -> Fraction:
    """:math:`\\sum_{t = 1}^{T - 1} p(t)`: the ramp's share of the forwards after the first
    (the forward of step 0 runs the parameter as given). Closed form for ``linear`` and
    ``cubic`` (sums of powers), a float sum over the ramp for the others."""
    check_schedule(schedule)
    last = min(t_i, total_steps) - 1  # t = 1 .. last have p(t) > 0
    if last < 1:
        return Fraction(0)
    power = {"linear": 1, "cubic": 3}.get(schedule)
    if power is not None:  # sum of s^power for s = t_i - last .. t_i - 1, over t_i^power
        def upto(a: int) -> int:
            return (a * (a + 1) // 2) ** (1 if power == 1 else 2)

        return Fraction(upto(t_i - 1) - upto(t_i - last - 1), t_i**power)
    p = dense_block_schedule(schedule, t_i)
    return Fraction(math.fsum(p(t) for t in range(1, last + 1)))


# -- the multi-axis queries -------------------------------------------------------------------


def axis_query(magnitudes: Tensor, n: int, m: int, tau: float) -> Tensor:
    """Soft scores ``[R, L]`` of rows of magnitudes ``[R, L]`` (module docstring): in each row
    the top ``L - ⌊(M - N) L / M⌋`` get ``σ((|w| - θ) / τ)``, the others 0. Ties in the
    ranking go to the lower index."""
    length = magnitudes.shape[1]
    keep = length - (m - n) * length // m
    if keep == length:
        raise ValueError(f"Invalid magnitudes shape {tuple(magnitudes.shape)}: a row of "
                         f"{length} has nothing for an N:M pattern {n}:{m} to prune")
    values, order = torch.sort(magnitudes, dim=1, descending=True, stable=True)
    threshold = (values[:, keep - 1 : keep] + values[:, keep : keep + 1]) / 2
    top = torch.zeros_like(magnitudes, dtype=torch.bool).scatter_(1, order[:, :keep], True)
    return torch.where(top, torch.sigmoid((magnitudes - threshold) / tau), 0)


def filter_query(weight: Tensor, n: int, m: int, tau: float) -> Tensor:
    """:func:`axis_query` over the filters (one row per output channel), in ``weight``'s
    layout."""
    rows = weight.abs().reshape(weight.shape[0], -1)
    return axis_query(rows, n, m, tau).reshape(weight.shape)


def kernel_query(weight: Tensor, n: int, m: int, tau: float) -> Tensor | None:
    """:func:`axis_query` over the kernel positions (one row per position, across all
    ``[out, in]``), in ``weight``'s layout; ``None`` for a Linear or a one-position kernel."""
    if weight.ndim < 3 or math.prod(weight.shape[2:]) == 1:
        return None
    rows = weight.abs().reshape(weight.shape[0] * weight.shape[1], -1).T
    return axis_query(rows, n, m, tau).T.reshape(weight.shape)


def soft_scale(weight: Tensor, n: int, m: int, tau: float) -> Tensor:
    """``1 + S_filter + S_kernel`` in ``weight``'s layout, in
    :func:`~bame_optim.core.evolution.score_dtype`."""
    weight = weight.to(score_dtype(weight.dtype))
    scale = 1 + filter_query(weight, n, m, tau)
    kernel = kernel_query(weight, n, m, tau)
    return scale if kernel is None else scale + kernel


def incremental_mask(weight: Tensor, kept: Tensor, n: int, dense_blocks: int) -> Tensor:
    """``[K, M]``: the top-``n`` ``|W|`` of every block of ``weight`` ``[K, M]``
    (:func:`~bame_optim.peers.srste.srste_mask`, ties to ``kept``), with the ``dense_blocks``
    blocks of smallest L1 norm kept whole (ties: the lower block index stays whole)."""
    mask = srste_mask(weight, kept, n)
    if dense_blocks > 0:
        norms = weight.to(score_dtype(weight.dtype)).abs().sum(dim=1)
        mask[torch.sort(norms, stable=True).indices[:dense_blocks]] = True
    return mask


def maxq_weight(weight: Tensor, mask: Tensor, n: int, m: int, tau: float) -> Tensor:
    """The forward weight ``W ⊙ B ⊙ (1 + S_filter + S_kernel)`` in ``weight``'s layout and
    dtype; ``mask`` is the ``[K, M]`` block mask ``B``."""
    scaled = weight.to(score_dtype(weight.dtype)) * soft_scale(weight, n, m, tau)
    return torch.where(blocks_to_param(mask, weight.shape), scaled, 0).to(weight.dtype)


# -- the optimizer ----------------------------------------------------------------------------


class MaxQSGD(SRSTESGD):
    r"""SGD with MaxQ: dense weights, soft N:M forward masks from multi-axis queries, an
    incremental dense-to-N:M ramp, straight-through gradients and SR-STE's decay.

    For a sparse parameter ``p`` each ``step()`` with counter :math:`t` does, with :math:`W` =
    ``state["dense_weight"]`` and :math:`B` = ``state["mask"]`` (the mask of the forward that
    produced ``p.grad``; all ones at the first step, whose forward ran ``p`` as given):

    .. math::
        W \leftarrow \text{SGD}\big(W, \texttt{p.grad} + \lambda_W (1 - B) \odot W\big), \quad
        B \leftarrow B_{t + 1}(W), \quad
        \texttt{p} \leftarrow W \odot B \odot (1 + S_\text{filter}(W) + S_\text{kernel}(W))

    (module docstring), so the parameter always holds the folded forward weight: from the
    forward of step :math:`t_i` on it is exactly N:M and ``check_nm()`` passes.
    Dense parameters follow :class:`torch.optim.SGD` exactly.

    Args:
        params, lr, momentum, dampening, weight_decay, nesterov, maximize, foreach, n, m,
            sparse: as :class:`bame_optim.BAMESGD`.
        total_steps: the run's optimizer steps (needed when ``t_i`` is not given).
        t_i: the first step whose forward is exactly N:M (default ``total_steps // 4``).
        sparsity_schedule: the ramp of :math:`p(t)`: ``"linear"`` (default), ``"cosine"``,
            ``"exponential"`` or ``"cubic"`` (:func:`dense_block_schedule`).
        tau: the queries' sigmoid temperature :math:`\tau` (default ``1e-2``), on raw
            magnitudes.
        srste_decay: :math:`\lambda_W` (default ``2e-4``); ``0`` turns the decay off.

    ``sparsity_report`` rows have ``phase`` ``"gradual"`` before ``t_i`` and ``"evolve"``
    after (the masks may change at every step); ``flips`` counts the mask entries that
    changed at the last step.

    .. note:: Choices where the paper and the public code (``SoftMaxQConv2DBNV2Pro``, the
       variant its scripts train; JingyangXiang/MaxQ) leave room, or where we differ:

       * **Ramp.** The code steps :math:`p` once per epoch; ours is a function of the step
         count. Its ImageNet scripts ramp over epochs 0-30 of 120 with the default ``linear``
         schedule: our defaults ``t_i = total_steps // 4`` and ``"linear"``. The paper's text
         could not be consulted here; the default follows the code. Its delayed start
         (``--decay-start``) is not offered: the ramp starts at step 0.
       * **Exponential ramp.** The code's :math:`1 - e^{-0.05 e}` over a 30-epoch ramp is
         :math:`\beta = 1.5` over ours; the code normalises by its last ramp epoch, reaching
         0 one epoch early, ours reaches 0 at ``t_i`` as the other ramps do.
       * **Which blocks stay whole.** As the code: the :math:`\lfloor p K \rfloor` of smallest
         L1 norm, per parameter; ties keep the lower block index whole. The top-N inside a
         block breaks ties as SR-STE (the kept weight, then the lower index).
       * **Kernel axis.** The code queries kernel positions of 3x3 convolutions only; we query
         every ConvNd weight with more than one kernel position (Conv1d ``k``, Conv2d
         ``kh x kw``, ...), never a Linear or 1x1 weight (one position: the whole layer).
       * **Query ranks.** :math:`\lfloor (M - N) L / M \rfloor` in integer arithmetic (the code
         multiplies floats); ties in a row's ranking go to the lower index (the code's sort is
         unstable). Magnitudes are those of the dense :math:`W`, pruned weights included, as
         in the code; :math:`\tau` acts on raw magnitudes, so the scores depend on the
         weights' scale, as in the code.
       * **Dense blocks** are scaled too (the code multiplies its all-ones block mask by the
         same scale) and are not decayed (:math:`1 - B = 0` there).
       * **First forward.** The optimizer first sees the weights at step 0, so that forward
         runs ``p`` as given (dense, unscaled, as SR-STE's and LBC's); the code's first
         forward is already scaled.
    .. note:: **Export and resume.** The parameter is the deployable weight: the scales are
       folded in, no extra multiply is needed, and from ``t_i`` on it is exactly N:M. The
       dense :math:`W` lives in the optimizer: resume from the optimizer's state dict (with
       the model's), which continues bit for bit, also past ``total_steps`` (the masks stay
       N:M, the scales are recomputed from :math:`W` at every step). A *new* optimizer over
       the exported weights takes them as :math:`W` and scales them again (the scales are not
       idempotent), and with ``t_i > 0`` ramps from dense blocks again.
    """

    method_defaults: ClassVar[dict[str, Any]] = {
        "srste_decay": DEFAULT_SRSTE_DECAY, "total_steps": None, "t_i": None,
        "sparsity_schedule": DEFAULT_SCHEDULE, "tau": DEFAULT_TAU,
    }

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        total_steps: int | None = None,
        t_i: int | None = None,
        sparsity_schedule: str = DEFAULT_SCHEDULE,
        tau: float = DEFAULT_TAU,
        srste_decay: float = DEFAULT_SRSTE_DECAY,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            params, lr, momentum, dampening, weight_decay, nesterov, srste_decay=srste_decay,
            total_steps=total_steps, t_i=t_i, sparsity_schedule=sparsity_schedule, tau=tau,
            **kwargs,
        )

    def _prepare_group(self, group: dict[str, Any]) -> None:
        super()._prepare_group(group)
        check_schedule(group["sparsity_schedule"])
        tau = group["tau"]
        if isinstance(tau, (bool, Tensor)) or not isinstance(tau, (int, float)) or not (
            0 < tau < math.inf
        ):
            raise ValueError(f"Invalid tau value: {tau!r} (a float > 0 is required)")
        group["t_i"] = resolve_ramp(group["total_steps"], group["t_i"])

    def _new_mask(self, p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> Tensor:
        weight = param_to_blocks(state["dense_weight"], group["m"])
        # the mask of the next forward, the forward of step t + 1
        whole = dense_block_count(group["step"] + 1, group["t_i"], weight.shape[0],
                                  group["sparsity_schedule"])
        return incremental_mask(weight, state["mask"], group["n"], whole)

    def _forward_weight(self, p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> Tensor:
        return maxq_weight(state["dense_weight"], state["mask"], group["n"], group["m"],
                           group["tau"])

    def phase_name(self, group: dict[str, Any]) -> str:
        return "gradual" if group["step"] < group["t_i"] else "evolve"

    @torch.no_grad()
    def finalize_masks(self) -> None:
        """Prune every sparse parameter to its top-``n`` ``|W|`` per block now (no block kept
        whole) and end the ramp (``t_i`` becomes the current step): for a run that stops
        before ``t_i``. The parameters hold their N:M forward weights afterwards."""
        for group in self.param_groups:
            sparse = [p for p in group["params"] if self._is_sparse(p, group)]
            for p in sparse:
                state = self._sparse_state(p, group)
                weight = param_to_blocks(state["dense_weight"], group["m"])
                new = incremental_mask(weight, state["mask"], group["n"], 0)
                state["last_flips"] = int((new != state["mask"]).sum())
                state["mask"] = new
                p.copy_(self._forward_weight(p, state, group))
            if sparse:
                group["t_i"] = min(group["t_i"], group["step"])

    def check_finished(self) -> bool:
        """Call when training ends: ``True`` when every sparse parameter keeps exactly ``n``
        per block, else a ``UserWarning`` per unfinished group and ``False`` (the run stopped
        before ``t_i``: :meth:`finalize_masks` prunes now)."""
        finished = True
        for index, group in enumerate(self.param_groups):
            kept = [int(self.state[p]["mask"].sum(dim=1).max()) if "mask" in self.state.get(p, {})
                    else group["m"] for p in group["params"] if self._is_sparse(p, group)]
            if not kept or max(kept) <= group["n"]:
                continue
            finished = False
            warnings.warn(
                f"{type(self).__name__}: training ended at step {group['step']}, before t_i="
                f"{group['t_i']} (total_steps={group['total_steps']}): param group {index} "
                f"still keeps blocks whole, so the model is not {group['n']}:{group['m']}; "
                "call finalize_masks() to prune to N:M now",
                UserWarning,
                stacklevel=user_stacklevel(),
            )
        return finished
