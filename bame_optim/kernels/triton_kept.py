r"""Triton kernels for the ordinary step of compact N:M state on CUDA: kept-SGD and kept-AdamW.

Each parameter is stepped by one launch that reads and writes only its kept entries: per block
it decodes the kept set (colex rank -> sorted positions through a ``[C, count]`` table, or the
stored positions ``[K, count]``, see :mod:`bame_optim.core.kept`), gathers the kept weights and
gradients, updates the compact state ``[K, count]`` (block order of :mod:`bame_optim.core.nm`)
and scatters the weights back. Addresses come from the block index and the tensor's strides,
so Linear ``[out, in]``, convolution ``[out, in, *k]`` (whose blocks are not contiguous, in any
memory format) and transposed views (``w.t()`` of a contiguous ``[in, out]``) need no copy.

The arithmetic is that of :func:`torch.optim.sgd.sgd` and :func:`torch.optim.adamw.adamw`
(single-tensor paths) on the gathered entries, operation by operation, with each Python-float
hyper-parameter cast to the compute dtype as ATen casts a scalar; float16/bfloat16 compute in
float32 and round once per stored value. Results are not promised bit-identical to the eager
path: the compiler may contract a multiply and an add into one FMA where ATen rounds twice (or
the reverse), so they agree to a few ulps per step (``tests/test_triton_kept.py``).

Under ``TRITON_INTERPRET=1`` (set before Triton is first imported) the same kernels run on CPU
tensors, which is how they are tested without a GPU. There the interpreter passes every float
scalar as float32, so float64 parameters see float32-rounded hyper-parameters; on CUDA they are
float64.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from functools import lru_cache
from types import ModuleType

import torch
from torch import Tensor

from bame_optim.core.kept import positions_by_rank

__all__ = ["DTYPES", "available", "interpreting", "kept_adamw_", "kept_sgd_", "supports"]

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
"""Parameter dtypes the kernels handle."""

_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)
_ELEMENTS_PER_PROGRAM = 1024
_OUTER_DIMS = 3
"""The kernels address blocks through at most three (coalesced) dimensions besides ``in``."""


def available() -> bool:
    """Whether Triton can be imported (checked without importing it)."""
    # Not lru_cached: torch.compile traces this call, and warns about cache wrappers.
    return "triton" in sys.modules or importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET=1`` is set (Triton then runs kernels on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def supports(param: Tensor, grad: Tensor | None) -> bool:
    """Whether the kernels handle ``param`` and its ``grad``: plain strided tensors of one
    shape (``ndim >= 2``) and dtype (:data:`DTYPES`) on one CUDA device (or on the CPU under
    :func:`interpreting`), whose dimensions other than 1 fold into three strided ones (true of
    every Linear and convolution layout)."""
    if grad is None or grad.shape != param.shape or grad.dtype != param.dtype:
        return False
    if param.ndim < 2 or param.dtype not in DTYPES or param.device != grad.device:
        return False
    device = "cpu" if interpreting() else "cuda"
    for t in (param, grad):
        if type(t) not in _PLAIN_TYPES or t.layout != torch.strided or t.device.type != device:
            return False
        if t.is_neg() or t.is_conj() or _outer_layout(t) is None:
            return False
    return True


def kept_sgd_(
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
    """SGD on the kept entries, in place on ``params`` and ``momentum_buffers``.

    Args:
        params, grads: :func:`supports` tensors.
        momentum_buffers: contiguous ``[K, count]`` per parameter (empty when
            ``momentum == 0``); where ``first[i]`` it has no history and is overwritten with
            the gradient, as :func:`torch.optim.sgd.sgd` creates a new buffer.
        kept, counts, m: the stored kept sets (:func:`bame_optim.core.kept.encode_kept`).
        lr, momentum, dampening, weight_decay, nesterov, maximize: as
            :func:`torch.optim.sgd.sgd`.
    """
    kernels = _kernels()
    with_momentum = momentum != 0
    _check_state(params, [momentum_buffers] if with_momentum else [], counts, m)
    for i, (p, g, launch) in enumerate(_launches(params, grads, kept, counts, m)):
        if launch is None:
            continue
        grid, args, meta = launch
        buf = momentum_buffers[i] if with_momentum else p
        kernels.kept_sgd_kernel[grid](
            p, g, buf, *args, float(lr), float(momentum), 1.0 - float(dampening),
            float(weight_decay), **meta,
            HAS_WEIGHT_DECAY=weight_decay != 0, HAS_MOMENTUM=with_momentum,
            FIRST=with_momentum and bool(first[i]), NESTEROV=bool(nesterov),
            MAXIMIZE=bool(maximize),
        )


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
    lr: float,
    weight_decay: float,
    eps: float,
    maximize: bool,
) -> None:
    r"""AdamW on the kept entries, in place on ``params``, the moments and ``state_steps``.

    Each step tensor is advanced by one and read (a device sync if it is not on the CPU,
    as in :func:`torch.optim.adamw.adamw` without ``capturable``); the bias corrections
    :math:`1 - \beta^t` and the scalars derived from them are computed in double precision on
    the host, as torch does.

    Args:
        params, grads: :func:`supports` tensors.
        exp_avgs, exp_avg_sqs: contiguous ``[K, count]`` moments per parameter.
        max_exp_avg_sqs: contiguous ``[K, count]`` running maxima (``amsgrad`` only, else
            empty).
        state_steps: one scalar step tensor per parameter.
        kept, counts, m: as :func:`kept_sgd_`.
        amsgrad, beta1, beta2, lr, weight_decay, eps, maximize: as
            :func:`torch.optim.adamw.adamw`.
    """
    kernels = _kernels()
    moments = [exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if amsgrad else [])
    _check_state(params, moments, counts, m)
    if len(state_steps) != len(params):
        raise ValueError(f"Invalid state_steps: {len(state_steps)} for {len(params)} params")
    lr, beta1, beta2 = float(lr), float(beta1), float(beta2)
    for i, (p, g, launch) in enumerate(_launches(params, grads, kept, counts, m)):
        state_steps[i] += 1
        step = state_steps[i].item()
        if launch is None:
            continue
        grid, args, meta = launch
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        kernels.kept_adamw_kernel[grid](
            p, g, exp_avgs[i], exp_avg_sqs[i], max_exp_avg_sqs[i] if amsgrad else p, *args,
            1 - lr * weight_decay, 1 - beta1, beta2, 1 - beta2, lr / bias_correction1,
            bias_correction2**0.5, float(eps), **meta,
            F64=p.dtype == torch.float64, HAS_WEIGHT_DECAY=weight_decay != 0,
            AMSGRAD=bool(amsgrad), MAXIMIZE=bool(maximize),
        )


def _check_state(
    params: list[Tensor], states: list[list[Tensor]], counts: list[int], m: int
) -> None:
    """``ValueError`` unless every compact state tensor is a contiguous ``[K, count]`` tensor
    of its parameter's dtype and device (the kernels write it in place: no copy can do)."""
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"Invalid m value: {m!r} (a positive integer is required)")
    for state in states:
        if len(state) != len(params):
            raise ValueError(f"Invalid state: {len(state)} tensors for {len(params)} params")
        for p, s, count in zip(params, state, counts, strict=True):
            shape = (p.numel() // m, count)
            if (
                tuple(s.shape) != shape
                or not s.is_contiguous()
                or s.dtype != p.dtype
                or s.device != p.device
            ):
                raise ValueError(
                    f"Invalid state tensor {tuple(s.shape)} {s.dtype} on {s.device} for a "
                    f"parameter {tuple(p.shape)} {p.dtype}: a contiguous {shape} tensor of the "
                    "parameter's dtype and device is required"
                )


def _launches(
    params: list[Tensor], grads: list[Tensor], kept: list[Tensor], counts: list[int], m: int
) -> list[tuple[Tensor, Tensor, tuple | None]]:
    """``(param, grad, launch)`` per parameter (:func:`_launch`), all checked before any is
    run, so that bad input raises before anything is written."""
    if not len(grads) == len(kept) == len(counts) == len(params):
        raise ValueError(
            f"params, grads, kept and counts must have equal lengths, got {len(params)}, "
            f"{len(grads)}, {len(kept)}, {len(counts)}"
        )
    return [
        (p, g, _launch(p, g, code, count, m))
        for p, g, code, count in zip(params, grads, kept, counts, strict=True)
    ]


def _launch(
    p: Tensor, g: Tensor, code: Tensor, count: int, m: int
) -> tuple[tuple[int], list[object], dict[str, object]] | None:
    """The grid, the layout arguments and the compile-time constants of one parameter's launch
    (``None`` if it has nothing to step)."""
    if not supports(p, g):
        raise ValueError(
            f"Invalid parameter {tuple(p.shape)} {p.dtype} on {p.device} for the Triton kept "
            "kernels (see bame_optim.kernels.triton_kept.supports)"
        )
    if p.shape[1] % m:
        raise ValueError(f"Invalid shape {tuple(p.shape)} for m={m}: dim 1 is not divisible by m")
    num_blocks = p.numel() // m
    if num_blocks == 0 or count == 0:
        return None
    ranked = code.ndim == 1
    if code.shape[0] != num_blocks or (not ranked and code.shape != (num_blocks, count)):
        raise ValueError(
            f"Invalid kept form {tuple(code.shape)} for {num_blocks} blocks of {count} kept"
        )
    code = code.contiguous()
    # The eager path's cached [C, count] table on the device (usually warm: no host copy).
    table = positions_by_rank(count, m, p.device) if ranked else code
    count_p2 = _next_power_of_2(count)
    block_k = max(1, _ELEMENTS_PER_PROGRAM // count_p2)
    (n1, n2), p_strides = _outer_layout(p)  # type: ignore[misc]
    _, g_strides = _outer_layout(g)  # type: ignore[misc]
    args = [code, table, num_blocks, p.shape[1] // m, n1, n2, *p_strides, p.stride(1),
            *g_strides, g.stride(1)]
    tl = _kernels().tl
    meta = dict(M=m, COUNT=count, COUNT_P2=count_p2, BLOCK_K=block_k, RANKED=ranked,
                CT=tl.float64 if p.dtype == torch.float64 else tl.float32)
    return (_cdiv(num_blocks, block_k),), args, meta


def _outer_layout(t: Tensor) -> tuple[tuple[int, int], tuple[int, int, int]] | None:
    """The dimensions other than 1 (``out, *k``, in block order) folded into three:
    ``((n1, n2), (s0, s1, s2))`` with sizes ``(n0, n1, n2)`` (``n0`` implied by the number of
    blocks); ``None`` if they do not fold into three."""
    dims = [(t.shape[0], t.stride(0))] + [(t.shape[d], t.stride(d)) for d in range(2, t.ndim)]
    folded: list[tuple[int, int]] = []
    for size, stride in dims:
        if size == 1:
            continue
        if folded and folded[-1][1] == size * stride:
            folded[-1] = (folded[-1][0] * size, stride)
        else:
            folded.append((size, stride))
    if len(folded) > _OUTER_DIMS:
        return None
    folded = [(1, 0)] * (_OUTER_DIMS - len(folded)) + folded
    return (folded[1][0], folded[2][0]), (folded[0][1], folded[1][1], folded[2][1])


def _next_power_of_2(n: int) -> int:
    """The smallest power of two ``>= n`` (``n >= 1``)."""
    return 1 << (n - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` of positive integers."""
    return -(-a // b)


@lru_cache(maxsize=1)
def _kernels() -> ModuleType:
    # Imported on first use only: importing Triton is slow, and TRITON_INTERPRET is read then.
    from bame_optim.kernels import _triton_kept_kernels

    return _triton_kept_kernels

