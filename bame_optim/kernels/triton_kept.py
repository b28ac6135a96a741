r"""Triton kernels for the ordinary step of compact N:M state on CUDA: kept-SGD and kept-AdamW.

One launch steps every parameter of one signature (dtype, kept count, code form; for SGD also
the first-step flag), so a ResNet-50 step is one or two launches, not one per layer: the
parameters' addresses, block counts and folded strides travel in a small ``int64`` table,
copied to the device from pinned memory without waiting. Each program reads and writes only
kept entries: per block it decodes the kept set (colex rank -> sorted positions through a
``[C, count]`` table, or the stored positions ``[K, count]``, see :mod:`bame_optim.core.kept`),
gathers the kept weights and gradients, updates the compact state ``[K, count]`` (block order
of :mod:`bame_optim.core.nm`) and scatters the weights back. Addresses come from the block
index and the tensors' strides (:func:`bame_optim.kernels.block_layout.fold` of the
parameter and its gradient together), so Linear ``[out, in]``, convolution ``[out, in, *k]``
(whose blocks are not contiguous, in any memory format, the gradient's too) and transposed
views (``w.t()`` of a contiguous ``[in, out]``) need no copy.

The arithmetic is that of :func:`torch.optim.sgd.sgd` and :func:`torch.optim.adamw.adamw`
(single-tensor paths) on the gathered entries, operation by operation, with each Python-float
hyper-parameter cast to the compute dtype as ATen casts a scalar; float16/bfloat16 compute in
float32 and round once per stored value. Results are not promised bit-identical to the eager
path: the compiler may contract a multiply and an add into one FMA where ATen rounds twice (or
the reverse), so they agree to a few ulps per step (``tests/test_triton_kept.py``).

Under ``TRITON_INTERPRET=1`` (set before Triton is first imported) the same kernels run on CPU
tensors, which is how they are tested without a GPU. There the interpreter passes every float
scalar argument as float32, so float64 parameters see float32-rounded hyper-parameters (AdamW's
step size and bias correction, read from the table, stay float64); on CUDA they are float64.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from array import array
from contextlib import AbstractContextManager, nullcontext
from functools import lru_cache
from types import ModuleType

import torch
from torch import Tensor

from bame_optim.core.kept import positions_by_rank
from bame_optim.kernels.block_layout import fold

__all__ = [
    "DTYPES", "available", "division_magic", "interpreting", "kept_adamw_", "kept_sgd_",
    "launch_device", "supports",
]

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
"""Parameter dtypes the kernels handle."""

_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)
_ELEMENTS_PER_PROGRAM = 1024
_INT32_SPAN = 2**30
"""A parameter whose tensors span this many elements (half of int32's range: the masked lanes
of a last program reach past the end) is stepped with int64 indices, in a launch of its own."""


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
    every Linear and convolution layout), the gradient's strides folded alike."""
    return _pair_layouts(param, grad, "cpu" if interpreting() else "cuda") is not None


def _pair_layouts(param: Tensor, grad: Tensor | None, device: str
                  ) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The folded layouts of ``param`` and ``grad``
    (:func:`bame_optim.kernels.block_layout.fold`) where :func:`supports` holds on
    ``device`` (a device type), else ``None``. Every step asks this of every sparse parameter
    (twice on CUDA: which path, then the op's own check), so the answer is cached by the
    tensors' metadata; a few tensor attributes per call instead of the checks and the fold."""
    if grad is None or type(param) not in _PLAIN_TYPES or type(grad) not in _PLAIN_TYPES:
        return None
    # torch.compile cannot trace is_neg / is_conj (a graph break, an error with
    # fullgraph=True); a real float tensor has those bits only through torch's private
    # views, and torch's own optimizers skip such checks when compiling too. It traces the
    # uncached check (it warns about cache wrappers).
    compiling = torch.compiler.is_compiling()
    if not compiling and (param.is_neg() or param.is_conj() or grad.is_neg() or grad.is_conj()):
        return None
    key = (param.layout, grad.layout, param.device, grad.device, param.dtype, grad.dtype,
           param.shape, grad.shape, param.stride(), grad.stride(), device)
    return _check_pair(key) if compiling else _checked_pair(key)


def _check_pair(key: tuple) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """:func:`_pair_layouts` from the metadata it keys its cache by (not cached)."""
    (p_layout, g_layout, p_device, g_device, p_dtype, g_dtype, p_shape, g_shape, p_stride,
     g_stride, device) = key
    if (p_layout != torch.strided or g_layout != torch.strided or p_device != g_device
            or p_device.type != device or p_dtype != g_dtype or p_dtype not in DTYPES
            or p_shape != g_shape or len(p_shape) < 2):
        return None
    layouts = fold(((tuple(p_shape), p_stride), (tuple(g_shape), g_stride)))
    return None if layouts is None else (tuple(layouts[0]), tuple(layouts[1]))


_checked_pair = lru_cache(maxsize=1024)(_check_pair)


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
    """SGD on the kept entries, in place on ``params`` and ``momentum_buffers``: one launch per
    signature (:func:`_items`; here with the first-step flag too), however many parameters.

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
    states = [momentum_buffers] if with_momentum else []
    _check_not_capturing(params)
    _check_state(params, states, counts, m)
    items = _items(params, grads, kept, counts, m)
    launches: dict[tuple, list[tuple[int, tuple[int, ...], tuple[float, ...]]]] = {}
    for i, key, layout in items:
        flag = with_momentum and bool(first[i])
        launches.setdefault((*key, flag), []).append((i, layout, ()))
    for (*signature, flag), rows in launches.items():
        grid, meta, table, constants, _codes = _launch(rows, signature, params, grads, states,
                                                       kept, m)
        with launch_device(signature[0]):
            kernels.kept_sgd_kernel[grid](
                meta, len(rows), table, float(lr), float(momentum), 1.0 - float(dampening),
                float(weight_decay), **constants,
                HAS_WEIGHT_DECAY=weight_decay != 0, HAS_MOMENTUM=with_momentum, FIRST=flag,
                NESTEROV=bool(nesterov), MAXIMIZE=bool(maximize),
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
    r"""AdamW on the kept entries, in place on ``params``, the moments and ``state_steps``: one
    launch per signature (:func:`_items`), however many parameters.

    Each step tensor is advanced by one and read (a device sync if it is not on the CPU,
    as in :func:`torch.optim.adamw.adamw` without ``capturable``); the bias corrections
    :math:`1 - \beta^t` and the scalars derived from them are computed in double precision on
    the host, as torch does, and reach the kernel as float64 bits.

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
    states = [exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if amsgrad else [])
    _check_not_capturing(params)
    _check_state(params, states, counts, m)
    if len(state_steps) != len(params):
        raise ValueError(f"Invalid state_steps: {len(state_steps)} for {len(params)} params")
    items = _items(params, grads, kept, counts, m)
    lr, beta1, beta2 = float(lr), float(beta1), float(beta2)
    step_values = _advance(state_steps)
    scalars: dict[float, tuple[float, float]] = {}
    launches: dict[tuple, list[tuple[int, tuple[int, ...], tuple[float, ...]]]] = {}
    for i, key, layout in items:
        step = step_values[i]
        if step not in scalars:
            scalars[step] = (lr / (1 - beta1**step), (1 - beta2**step) ** 0.5)
        launches.setdefault(key, []).append((i, layout, scalars[step]))
    for signature, rows in launches.items():
        grid, meta, table, constants, _codes = _launch(rows, signature, params, grads, states,
                                                       kept, m)
        with launch_device(signature[0]):
            kernels.kept_adamw_kernel[grid](
                meta, len(rows), table, 1 - lr * weight_decay, 1 - beta1, beta2, 1 - beta2,
                float(eps), **constants,
                F64=signature[1] == torch.float64, HAS_WEIGHT_DECAY=weight_decay != 0,
                AMSGRAD=bool(amsgrad), MAXIMIZE=bool(maximize),
            )


def _advance(state_steps: list[Tensor]) -> list[float]:
    """Advance every step tensor by one, as :func:`torch.optim.adamw.adamw` does (one foreach
    op: 0.7 of the for-loop's time on 52 CPU scalars), and return the new values."""
    if state_steps:
        torch._foreach_add_(state_steps, 1.0)
    return [steps.item() for steps in state_steps]


def _check_not_capturing(params: list[Tensor]) -> None:
    """``RuntimeError`` inside a CUDA graph capture: a replay would copy a launch table from
    host memory freed since (and AdamW's step sizes would stay those of the captured step)."""
    if params and params[0].is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "The Triton kept step cannot be captured in a CUDA graph: it builds its launch "
            "table on the host at every step (and a mask update reads masks on the host). Step "
            "the optimizer outside the captured region"
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


def _items(
    params: list[Tensor], grads: list[Tensor], kept: list[Tensor], counts: list[int], m: int
) -> list[tuple[int, tuple[torch.device, torch.dtype, int, bool, torch.dtype, bool],
                tuple[int, ...]]]:
    """``(index, signature, layout)`` of every parameter with something to step (blocks and a
    kept count), all checked before any is launched, so that bad input raises before anything
    is written. The signature is what one launch takes: the device, and what it compiles for
    (the dtype, the kept count, whether the code is a rank, the code's dtype, whether indices
    need int64); the layout is the table's ``num_blocks, blocks_per_row, n1, n2``, both
    tensors' folded strides and the divisors' magic numbers."""
    if not len(grads) == len(kept) == len(counts) == len(params):
        raise ValueError(
            f"params, grads, kept and counts must have equal lengths, got {len(params)}, "
            f"{len(grads)}, {len(kept)}, {len(counts)}"
        )
    device = "cpu" if interpreting() else "cuda"
    items = []
    for i, (p, g, code, count) in enumerate(zip(params, grads, kept, counts, strict=True)):
        layouts = _pair_layouts(p, g, device)
        if layouts is None:
            raise ValueError(
                f"Invalid parameter {tuple(p.shape)} {p.dtype} on {p.device} for the Triton "
                "kept kernels (see bame_optim.kernels.triton_kept.supports)"
            )
        item = _item(layouts, p.shape, p.device, p.dtype, m, count, code.shape, code.dtype)
        if item is not None:
            items.append((i, *item))
    return items


@lru_cache(maxsize=1024)
def _item(
    layouts: tuple[tuple[int, ...], tuple[int, ...]], shape: torch.Size, device: torch.device,
    dtype: torch.dtype, m: int, count: int, code_shape: torch.Size, code_dtype: torch.dtype,
) -> tuple[tuple[torch.device, torch.dtype, int, bool, torch.dtype, bool], tuple[int, ...]
           ] | None:
    """The signature and layout :func:`_items` gives a parameter of ``shape`` (its folded
    ``layouts`` and its gradient's from :func:`_pair_layouts`) with a kept code of
    ``code_shape``, or ``None`` where it has nothing to step; a pure function of metadata, so
    cached (a step asks it of every sparse parameter)."""
    if shape[1] % m:
        raise ValueError(f"Invalid shape {tuple(shape)} for m={m}: dim 1 is not divisible by m")
    num_blocks = shape.numel() // m
    if num_blocks == 0 or count == 0:
        return None
    ranked = len(code_shape) == 1
    if code_shape[0] != num_blocks or (not ranked and code_shape != (num_blocks, count)):
        raise ValueError(
            f"Invalid kept form {tuple(code_shape)} for {num_blocks} blocks of {count} kept"
        )
    (n1, n2, *p_strides), (_, _, *g_strides) = layouts
    per_row = shape[1] // m
    sizes = (num_blocks // (per_row * n1 * n2), n1, n2, shape[1])
    span = max(_span(sizes, p_strides), _span(sizes, g_strides),
               (num_blocks + _ELEMENTS_PER_PROGRAM) * count)
    wide = span >= _INT32_SPAN  # then the divisors' magic numbers go unused
    magic = (0, 0) * 3 if wide else (*division_magic(per_row), *division_magic(n2),
                                     *division_magic(n1))
    layout = (num_blocks, per_row, n1, n2, *p_strides, *g_strides, *magic)
    return (device, dtype, count, ranked, code_dtype, wide), layout


def _launch(
    rows: list[tuple[int, tuple[int, ...], tuple[float, ...]]],
    signature: tuple[torch.device, torch.dtype, int, bool, torch.dtype, bool],
    params: list[Tensor],
    grads: list[Tensor],
    states: list[list[Tensor]],
    kept: list[Tensor],
    m: int,
) -> tuple[tuple[int], Tensor, Tensor, dict[str, object], list[Tensor]]:
    """The grid, the table of rows (on the parameters' device), the decoding table and the
    compile-time constants of one launch of ``signature`` (:func:`_items`) over the
    parameters ``rows`` names (with each one's layout from :func:`_items` and float scalars),
    and the kept codes the table points at
    (copies where a code was not contiguous: the caller holds them until the launch is
    queued). Each row holds the columns of :mod:`._triton_kept_kernels`."""
    device, dtype, count, ranked, code_dtype, wide = signature
    count_p2 = _next_power_of_2(count)
    block_k = max(1, _ELEMENTS_PER_PROGRAM // count_p2)
    kernels = _kernels()
    table: list[int] = []  # the rows one after the other
    program, codes = 0, []
    for i, layout, floats in rows:
        code = kept[i].contiguous()
        codes.append(code)
        table += kernels.table_row([params[i], grads[i], code, *(s[i] for s in states)],
                                   layout, program, floats)
        program += _cdiv(layout[0], block_k)
    # Through array (the tensor keeps it alive): a fifth of torch.tensor's time on a list.
    meta = torch.frombuffer(array("q", table), dtype=torch.int64).view(len(rows), -1)
    if device.type == "cuda":  # pinned, so the copy is queued, not waited for
        meta = meta.pin_memory().to(device, non_blocking=True)
    # The eager path's cached [C, count] table on the device (usually warm: no host copy).
    decode = positions_by_rank(count, m, device) if ranked else meta
    tl, types = kernels.tl, kernels.ELEMENT_TYPES
    constants = dict(M=m, COUNT=count, COUNT_P2=count_p2, BLOCK_K=block_k, RANKED=ranked,
                     KT=types[code_dtype], DT=types[dtype],
                     CT=tl.float64 if dtype == torch.float64 else tl.float32,
                     LOG_ROWS=max(1, (len(rows) - 1).bit_length()),
                     WIDE=wide)
    return (program,), meta, decode, constants, codes


def _span(sizes: tuple[int, int, int, int], strides: list[int]) -> int:
    """How many elements a tensor of folded ``sizes`` (``n0, n1, n2, in``) and ``strides``
    reaches from its first to one past its last."""
    return (1 + (sizes[0] - 1) * strides[0] + (sizes[1] - 1) * strides[1]
            + (sizes[2] - 1) * strides[2] + (sizes[3] - 1) * strides[3])


@lru_cache(maxsize=1024, typed=True)
def division_magic(d: int) -> tuple[int, int]:
    r"""``(magic, shift)`` such that :math:`\lfloor n \cdot magic / 2^{shift} \rfloor =
    \lfloor n / d \rfloor` for every integer :math:`0 \le n < 2^{31}` (``1 <= d < 2**31``):
    the round-up method of Granlund and Montgomery (1994), with :math:`l = \lceil \log_2 d
    \rceil`, :math:`shift = 31 + l` and :math:`magic = \lfloor 2^{shift} / d \rfloor + 1 <
    2^{32}`. Writing :math:`magic = (2^{shift} + e) / d` with :math:`0 < e \le d`, the
    product exceeds :math:`n / d` by :math:`e n / (d \, 2^{shift}) < 2^{-l} \le 1 / d`, less
    than the distance from :math:`n / d` up to the next integer, so the floor is exact.
    The kernels divide block indices this way: a GPU has no integer divide instruction."""
    if isinstance(d, bool) or not isinstance(d, int) or not 1 <= d < 2**31:
        raise ValueError(f"Invalid d value: {d!r} (an integer in [1, 2**31) is required)")
    shift = 31 + (d - 1).bit_length()
    return (1 << shift) // d + 1, shift


def launch_device(device: torch.device) -> AbstractContextManager:
    """``device`` made current for a launch (Triton launches on the current CUDA device); a
    no-op off CUDA."""
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


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
