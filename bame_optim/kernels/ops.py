"""The fused kept steps as ``torch.library`` custom ops: ``bame_optim::kept_sgd_`` and
``bame_optim::kept_adamw_``.

One op per update rule, with a schema (it mutates the parameters and the compact state), a
fake implementation (shapes only, so :func:`torch.compile` traces a step through the op with no
graph break) and one implementation per device:

* CUDA: the Triton kernels of :mod:`bame_optim.kernels.triton_kept`.
* CPU (and any other device): :func:`bame_optim.optim.functional.kept_sgd` with ``fused=None``
  (the native kernel of :mod:`bame_optim.kernels.kept_sgd_cpu` where it runs, else the eager
  composition); for AdamW, :func:`bame_optim.optim.functional.kept_adamw` likewise
  (:mod:`bame_optim.kernels.kept_adamw_cpu`).

The ops take the momentum buffers as tensors: :func:`kept_sgd_` creates the missing ones
(``None``, a parameter's first step with momentum) and tells the op which they are, so that
they get torch's first-step rule (the buffer is the gradient). Registering the ops is this
module's only effect on import; :mod:`bame_optim.optim.functional` imports it only when a step
runs on CUDA tensors.
"""

import torch
from torch import Tensor

from bame_optim.kernels import triton_kept

__all__ = ["kept_adamw_", "kept_sgd_", "usable"]


_NOT_IN_CUDA_GRAPHS = (torch.Tag.cudagraph_unsafe,)
"""The kept ops build their launch table (and AdamW its step sizes) on the host at every call,
which a replayed CUDA graph would not redo: ``torch.compile`` keeps them out of its graphs."""


def usable(params: list[Tensor], grads: list[Tensor], fused: bool | None) -> bool:
    """Whether the Triton kernels run this step: Triton is importable and every parameter is a
    CUDA tensor they support (:func:`bame_optim.kernels.triton_kept.supports`). ``fused=True``
    raises ``ValueError`` where they do not."""
    ok = triton_kept.available() and all(
        p.is_cuda and triton_kept.supports(p, g) for p, g in zip(params, grads, strict=True)
    )
    if fused and not ok:
        raise ValueError(
            "Invalid fused value: True (the Triton kept kernels are unavailable or do not "
            "support these CUDA tensors; see bame_optim.kernels.triton_kept.supports)"
        )
    return ok


def kept_sgd_(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    kept: list[Tensor],
    counts: list[int],
    *,
    m: int,
    lr: float | Tensor,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
) -> None:
    """``bame_optim::kept_sgd_`` with the arguments of
    :func:`bame_optim.optim.functional.kept_sgd`: a ``None`` buffer is replaced, in
    ``momentum_buffers``, by a new ``[K, count]`` one (when ``momentum != 0``)."""
    first = [b is None for b in momentum_buffers]
    buffers: list[Tensor] = []
    if momentum != 0:
        buffers = [
            p.new_empty((p.numel() // m, c)) if b is None else b
            for p, b, c in zip(params, momentum_buffers, counts, strict=True)
        ]
    staged, originals = _stage(buffers, params)
    torch.ops.bame_optim.kept_sgd_(
        params, grads, staged, kept, counts, first, m=m, lr=float(lr), momentum=momentum,
        dampening=dampening, weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
    )
    _unstage(staged, originals)
    if momentum != 0:
        momentum_buffers[:] = buffers


def kept_adamw_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    kept: list[Tensor],
    counts: list[int],
    *,
    m: int,
    amsgrad: bool,
    beta1: float,
    beta2: float,
    lr: float | Tensor,
    weight_decay: float,
    eps: float,
    maximize: bool,
) -> None:
    """``bame_optim::kept_adamw_`` with the arguments of
    :func:`bame_optim.optim.functional.kept_adamw` (``max_exp_avg_sqs`` empty without
    ``amsgrad``)."""
    moments = [_stage(s, params) for s in (exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad
                                              else [])]
    torch.ops.bame_optim.kept_adamw_(
        params, grads, *(staged for staged, _ in moments), state_steps, kept, counts, m=m,
        amsgrad=amsgrad, beta1=beta1, beta2=beta2, lr=float(lr), weight_decay=weight_decay,
        eps=eps, maximize=maximize,
    )
    for staged, originals in moments:
        _unstage(staged, originals)


def _stage(states: list[Tensor], params: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """``states`` as the kernels write them in place (contiguous, in the parameter's dtype):
    each tensor itself where it already is (the usual case), else a copy; and the originals."""
    staged = [
        s if s.is_contiguous() and s.dtype == p.dtype else s.to(p.dtype).contiguous()
        for s, p in zip(states, params, strict=False)
    ]
    return staged, states


def _unstage(staged: list[Tensor], originals: list[Tensor]) -> None:
    for new, original in zip(staged, originals, strict=True):
        if new is not original:
            original.copy_(new)


@torch.library.custom_op("bame_optim::kept_sgd_", mutates_args=("params", "momentum_buffers"),
                         tags=_NOT_IN_CUDA_GRAPHS)
def _kept_sgd_op(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    kept: list[Tensor],
    counts: list[int],
    first: list[bool],
    *,
    m: int,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
) -> None:
    # Every device but CUDA: the native CPU kernel where it runs, else the eager composition.
    from bame_optim.optim.functional import kept_sgd

    buffers: list[Tensor | None] = [None] * len(params)
    if momentum != 0:
        buffers = [None if f else b for b, f in zip(momentum_buffers, first, strict=True)]
    kept_sgd(
        params, grads, buffers, kept, counts, m=m, lr=lr, momentum=momentum,
        dampening=dampening, weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
        fused=None,
    )
    if momentum != 0:
        for target, new, f in zip(momentum_buffers, buffers, first, strict=True):
            if f:
                target.copy_(new)


@_kept_sgd_op.register_kernel("cuda")
def _kept_sgd_cuda(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    kept: list[Tensor],
    counts: list[int],
    first: list[bool],
    *,
    m: int,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
) -> None:
    triton_kept.kept_sgd_(
        params, grads, momentum_buffers, kept, counts, first, m=m, lr=lr, momentum=momentum,
        dampening=dampening, weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
    )


@_kept_sgd_op.register_fake
def _kept_sgd_fake(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    kept: list[Tensor],
    counts: list[int],
    first: list[bool],
    *,
    m: int,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
) -> None:
    _check_lengths(len(params), grads=grads, kept=kept, counts=counts, first=first)
    if momentum != 0:
        _check_lengths(len(params), momentum_buffers=momentum_buffers)


@torch.library.custom_op(
    "bame_optim::kept_adamw_",
    mutates_args=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps"),
    tags=_NOT_IN_CUDA_GRAPHS,
)
def _kept_adamw_op(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    kept: list[Tensor],
    counts: list[int],
    *,
    m: int,
    amsgrad: bool,
    beta1: float,
    beta2: float,
    lr: float,
    weight_decay: float,
    eps: float,
    maximize: bool,
) -> None:
    # The CPU (non-CUDA) implementation: the native kernel of kept_adamw_cpu where it runs
    # (fused=None), else the eager composition.
    from bame_optim.optim.functional import kept_adamw

    kept_adamw(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, kept, counts, m=m,
        amsgrad=amsgrad, beta1=beta1, beta2=beta2, lr=lr, weight_decay=weight_decay, eps=eps,
        maximize=maximize,
    )


@_kept_adamw_op.register_kernel("cuda")
def _kept_adamw_cuda(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    kept: list[Tensor],
    counts: list[int],
    *,
    m: int,
    amsgrad: bool,
    beta1: float,
    beta2: float,
    lr: float,
    weight_decay: float,
    eps: float,
    maximize: bool,
) -> None:
    triton_kept.kept_adamw_(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, kept, counts, m=m,
        amsgrad=amsgrad, beta1=beta1, beta2=beta2, lr=lr, weight_decay=weight_decay, eps=eps,
        maximize=maximize,
    )


@_kept_adamw_op.register_fake
def _kept_adamw_fake(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    kept: list[Tensor],
    counts: list[int],
    *,
    m: int,
    amsgrad: bool,
    beta1: float,
    beta2: float,
    lr: float,
    weight_decay: float,
    eps: float,
    maximize: bool,
) -> None:
    moments = dict(exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs, state_steps=state_steps)
    if amsgrad:
        moments["max_exp_avg_sqs"] = max_exp_avg_sqs
    _check_lengths(len(params), grads=grads, kept=kept, counts=counts, **moments)


def _check_lengths(size: int, **lists: list[object]) -> None:
    for name, values in lists.items():
        if len(values) != size:
            raise ValueError(f"Invalid {name}: {len(values)} entries for {size} params")


# -- the evolve update (issue 19: one fused pass per parameter) ------------------------------
# bame_optim::evolve_blocks (LMA scores, top-n proposal, SAD, oscillation EMA, block norms),
# bame_optim::obf_freeze (Eq. 10) and bame_optim::apply_evolved_ (new codes, newly pruned
# weights zeroed, buffers remapped): CPU through the native passes of evolve_cpu (else the
# eager core functions), CUDA through the Triton kernels of triton_evolve.


@torch.library.custom_op("bame_optim::evolve_blocks", mutates_args=("weight",))
def evolve_blocks(
    weight: Tensor,
    grad: Tensor,
    kept: Tensor,
    oscillation: Tensor | None,
    count: int,
    n: int,
    m: int,
    lr: float,
    gamma: float,
    revive: str,
    zero_pruned: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(proposed kept sets in the stored form for n, oscillation [K], norms [K])`` of one
    parameter in the block layout (``weight`` written only with ``zero_pruned``):
    :func:`bame_optim.kernels.evolve_cpu.evolve_blocks`, bit for bit."""
    from bame_optim.kernels import evolve_cpu, evolve_reference

    args = (weight, grad, kept, count, oscillation)
    hyper = dict(n=n, m=m, lr=lr, gamma=gamma, revive=revive, zero_pruned=zero_pruned)
    if evolve_cpu.available() and evolve_cpu.supports(weight, grad, kept, count, m, oscillation,
                                                      n=n):
        return evolve_cpu.evolve_blocks(*args, **hyper)
    return evolve_reference.evolve_blocks_eager(*args, **hyper)


@evolve_blocks.register_kernel("cuda")
def _evolve_blocks_cuda(
    weight: Tensor, grad: Tensor, kept: Tensor, oscillation: Tensor | None, count: int, n: int,
    m: int, lr: float, gamma: float, revive: str, zero_pruned: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    from bame_optim.kernels import triton_evolve

    return triton_evolve.evolve_blocks(weight, grad, kept, count, oscillation, n=n, m=m, lr=lr,
                                       gamma=gamma, revive=revive, zero_pruned=zero_pruned)


@evolve_blocks.register_fake
def _evolve_blocks_fake(
    weight: Tensor, grad: Tensor, kept: Tensor, oscillation: Tensor | None, count: int, n: int,
    m: int, lr: float, gamma: float, revive: str, zero_pruned: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    from bame_optim.kernels.evolve_cpu import code_dtype, code_shape

    blocks = weight.numel() // m
    score = weight.new_empty(blocks)
    proposed = weight.new_empty(code_shape(blocks, n, m), dtype=code_dtype(n, m))
    return proposed, score, torch.empty_like(score)


@torch.library.custom_op("bame_optim::obf_freeze", mutates_args=())
def obf_freeze(oscillation: Tensor, norms: Tensor, alpha: float, beta: float) -> Tensor:
    """:func:`bame_optim.core.evolution.obf_freeze` (Eq. 10), bit for bit."""
    from bame_optim.core.evolution import obf_freeze as reference
    from bame_optim.kernels import evolve_cpu

    plain = oscillation.is_contiguous() and norms.is_contiguous()
    if plain and oscillation.dtype in evolve_cpu.DTYPES and evolve_cpu.available():
        return evolve_cpu.obf_freeze(oscillation, norms, alpha, beta)
    return reference(oscillation, norms, alpha, beta)


@obf_freeze.register_kernel("cuda")
def _obf_freeze_cuda(oscillation: Tensor, norms: Tensor, alpha: float, beta: float) -> Tensor:
    from bame_optim.core.evolution import obf_freeze as reference

    return reference(oscillation, norms, alpha, beta)


@obf_freeze.register_fake
def _obf_freeze_fake(oscillation: Tensor, norms: Tensor, alpha: float, beta: float) -> Tensor:
    return torch.empty_like(oscillation, dtype=torch.bool)


@torch.library.custom_op("bame_optim::apply_evolved_", mutates_args=("weight", "buffers"))
def apply_evolved_(
    weight: Tensor,
    buffers: list[Tensor],
    kept: Tensor,
    count: int,
    proposed: Tensor,
    frozen: Tensor,
    m: int,
) -> tuple[Tensor, Tensor]:
    """``(new stored kept sets, flips as an int64 scalar tensor)``; newly pruned weights set to 0
    and the buffers remapped in place: :func:`bame_optim.kernels.evolve_cpu.apply_evolved_`."""
    from bame_optim.kernels import evolve_cpu, evolve_reference

    if evolve_cpu.available() and evolve_cpu.supports(weight, weight, kept, count, m,
                                                      buffers=buffers):
        new_kept, flips = evolve_cpu.apply_evolved_(weight, buffers, kept, count, proposed,
                                                    frozen, m)
        return new_kept, torch.tensor(flips)
    return evolve_reference.apply_evolved_eager(weight, buffers, kept, count, proposed, frozen, m)


@apply_evolved_.register_kernel("cuda")
def _apply_evolved_cuda(
    weight: Tensor, buffers: list[Tensor], kept: Tensor, count: int, proposed: Tensor,
    frozen: Tensor, m: int,
) -> tuple[Tensor, Tensor]:
    from bame_optim.kernels import triton_evolve

    return triton_evolve.apply_evolved_(weight, buffers, kept, count, proposed, frozen, m)


@apply_evolved_.register_fake
def _apply_evolved_fake(
    weight: Tensor, buffers: list[Tensor], kept: Tensor, count: int, proposed: Tensor,
    frozen: Tensor, m: int,
) -> tuple[Tensor, Tensor]:
    return torch.empty_like(kept), kept.new_empty((), dtype=torch.int64)
