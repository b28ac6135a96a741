r"""Fused CPU kernel for the ordinary step of compact N:M state: SGD on kept entries only.

The optimizer stores, per sparse parameter ``p``, the kept set of every block (``kept``, see
:mod:`bame_optim.core.kept`) and the momentum of kept weights only, ``[K, count]`` in block
order. The eager ordinary step is, per parameter::

    pos = kept_indices(kept, count, m)
    w, g = gather_kept(p, pos, m), gather_kept(p.grad, pos, m)
    torch.optim.sgd.sgd([w], [g], [buf], lr=..., momentum=..., ...)
    scatter_kept_(p, pos, w, m)

:func:`fused_kept_sgd_` does the same in one native pass over the kept entries of a whole list
of parameters (parallel over blocks with ``at::parallel_for``; a few thousand kept entries at a
time go through per-thread scratch arrays that stay in L1, no parameter-sized copies). Dense
parameters (``kept`` None) can ride in the same call, so one call steps a whole group. For
each kept entry, with :math:`\gamma` = ``lr``, :math:`\lambda` = ``weight_decay``,
:math:`\mu` = ``momentum``, :math:`\tau` = ``dampening`` (as in :class:`torch.optim.SGD`):

.. math::
    \begin{aligned}
    g_t &\leftarrow -g_t \ \text{if maximize} \\
    g_t &\leftarrow g_t + \lambda \theta_{t-1} \ \text{if } \lambda \neq 0 \\
    \text{if } \mu \neq 0:\ b_t &\leftarrow g_t \ \text{(first step: no buffer yet)},
        \quad\text{else } b_t \leftarrow \mu b_{t-1} + (1 - \tau) g_t \\
    g_t &\leftarrow g_t + \mu b_t \ \text{if nesterov, else } g_t \leftarrow b_t \\
    \theta_t &\leftarrow \theta_{t-1} - \gamma g_t
    \end{aligned}

Results are **bit-identical** to the eager composition: each operation rounds as ATen's CPU
kernel does (``add(a, b, alpha)`` is ``fmadd(b, alpha, a)`` with ``alpha`` cast to the dtype;
``mul_`` then ``add_`` for the momentum; every eager intermediate rounded to the parameter's
dtype, float16/bfloat16 computed in float32 per operation). Whether ATen's ``fmadd`` is fused
depends on the CPU capability it dispatched to, so on first use a probe runs the kernel both
ways against ATen and keeps the one that matches; if neither does, :func:`available` is False.

Float16/bfloat16 (``supports(..., exact=False)`` only): ATen's scalar tail loop (the last
< 64 entries of each per-thread chunk of every eager op) computes ``a + alpha * b`` in the
16-bit type with two roundings, unlike its vectorised body (one rounding in float32), so the
eager result itself depends on where an entry falls. The kernel always rounds once, as the
vectorised body: it matches eager except at those tail entries, where the two differ by the
extra rounding of ``alpha * b`` (half an ulp of that product per op, more ulps of the result
where the sum cancels). float32/float64 are exact everywhere.

Built on first use (never at import) by :mod:`bame_optim.kernels.native`, which also documents
the build cache and ``BAME_OPTIM_NO_NATIVE`` / ``BAME_OPTIM_REQUIRE_NATIVE``. Only plain CPU
tensors are handled (:func:`supports`): contiguous, or for a sparse parameter also the
transposed view ``w.t()`` of a contiguous 2-D ``w`` (transformers' ``Conv1D`` weights stepped
as ``[out, in]``) or a channels-last convolution weight (``channels_last`` /
``channels_last_3d``: ``w.movedim(1, -1)`` contiguous, so its blocks are contiguous rows, read
as those of a ``[out * prod(k), in]`` Linear weight); callers use the eager path for anything
else (other strides, DTensor, CUDA).
"""

from __future__ import annotations

import math
import threading
from functools import lru_cache
from numbers import Real
from types import ModuleType

import torch
from torch import Tensor

from bame_optim.kernels import native
from bame_optim.kernels.native import DISABLE_ENV, disabled

__all__ = [
    "DISABLE_ENV",
    "DTYPES",
    "EXACT_DTYPES",
    "available",
    "compile_seconds",
    "disabled",
    "first_unsupported",
    "fused_kept_sgd_",
    "supports",
]

EXACT_DTYPES = (torch.float32, torch.float64)
"""Parameter dtypes on which the kernel is bit-identical to the eager composition."""
DTYPES = (*EXACT_DTYPES, torch.float16, torch.bfloat16)
"""Parameter dtypes the kernel handles (``supports(..., exact=False)``)."""

_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)
_NATIVE_DTYPES = {EXACT_DTYPES: False, DTYPES: True}  # the dtypes the extension's check takes
_lock = threading.Lock()
_state: dict[str, object] = {}  # "fma" (the probe's answer), "error"


def available() -> bool:
    """Whether :func:`fused_kept_sgd_` can run: not disabled, compiled, and its rounding
    matches ATen's on this machine. Builds on the first call (the result is cached); on
    failure it warns once with the reason and returns False (raises ``RuntimeError`` with
    ``BAME_OPTIM_REQUIRE_NATIVE`` set)."""
    return _load() is not None  # None when disabled (read once, per call)


def compile_seconds() -> float | None:
    """Seconds the first :func:`available` call of this process spent loading (building) the
    extension."""
    return native.compile_seconds()


def supports(param: Tensor, grad: Tensor | None, *, exact: bool = True) -> bool:
    """Whether the kernel handles the sparse parameter ``param`` and its ``grad``: plain (not
    DTensor or other subclass) strided CPU tensors of one shape and strides, in a layout the
    kernel reads (contiguous, channels-last, or the transposed view of a contiguous 2-D
    tensor: see the module docstring), and a dtype in :data:`EXACT_DTYPES` (float32, float64:
    bit-identical to the eager path), or with ``exact=False`` also float16/bfloat16 (see the
    module docstring for where those differ). A dense parameter (``kept`` None) must also be
    contiguous."""
    return first_unsupported([param], [grad], EXACT_DTYPES if exact else DTYPES) < 0


def first_unsupported(params: list[Tensor], grads: list[Tensor | None],
                      dtypes: tuple[torch.dtype, ...] = EXACT_DTYPES) -> int:
    """The index of the first pair :func:`supports` rejects (with a dtype in ``dtypes``), or
    -1: the check of a whole step in one loop. It runs every step, so once the extension is
    loaded the same tests run there (a dozen Python attribute lookups per pair otherwise);
    before that, and for other ``dtypes``, here (checking never builds the extension)."""
    module = native.loaded()
    half = _NATIVE_DTYPES.get(dtypes) if type(dtypes) is tuple else None
    if module is not None and half is not None and type(params) is type(grads) is list:
        return module.first_unsupported(params, grads, half)
    return _first_unsupported(params, grads, dtypes)


def _first_unsupported(params: list[Tensor], grads: list[Tensor | None],
                       dtypes: tuple[torch.dtype, ...]) -> int:
    # The tests of the extension's first_unsupported (csrc/module.cpp), cheapest first.
    for i, (param, grad) in enumerate(zip(params, grads, strict=True)):
        if (
            grad is None
            or type(param) not in _PLAIN_TYPES
            or type(grad) not in _PLAIN_TYPES
            or not (param.is_cpu and grad.is_cpu)
            or param.dtype not in dtypes
            or grad.dtype != param.dtype
            or param.layout != torch.strided
            or grad.layout != torch.strided
        ):
            return i
        stride = param.stride()
        if stride != grad.stride() or param.shape != grad.shape:
            return i
        if not (
            param.is_contiguous()
            or (param.ndim == 2 and stride == (1, param.shape[0]))
            or (param.ndim > 2 and param.movedim(1, -1).is_contiguous())  # channels-last
        ):
            return i
        if param.is_neg() or param.is_conj() or grad.is_neg() or grad.is_conj():
            return i
    return -1


def fused_kept_sgd_(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    kept: list[Tensor | None],
    counts: list[int | None],
    *,
    m: int,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    avx512: bool | None = None,
) -> None:
    """SGD on the kept entries of N:M sparse ``params``, in place (see the module docstring).

    Args:
        params: parameters (``[out, in]`` or ``[out, in, *k]``), CPU tensors as
            :func:`supports` describes; float32/float64 are bit-identical to the eager path.
        grads: their gradients, same shape, dtype and layout.
        momentum_buffers: ``[K, count]`` contiguous momentum of the kept entries in block
            order, or ``None`` (first step: a new buffer is created, as torch's SGD does, and
            put back into this list). Untouched when ``momentum == 0``.
        kept: per parameter, colex ranks ``[K]`` (``uint8``/``int16``) or sorted positions
            ``[K, count]`` (``uint8``/``int16``/``int64``), as stored by
            :mod:`bame_optim.core.kept`; or ``None`` for a dense parameter (any shape: every
            entry is updated, as :func:`torch.optim.sgd.sgd` does, with a parameter-shaped
            momentum buffer), so one call can step a whole parameter group.
        counts: kept entries per block, per parameter (ignored where ``kept`` is ``None``).
        m: block size ``M``.
        avx512: whether the AVX-512 paths may run where the CPU has them (same results,
            faster on 3x3 convolutions); ``None``: unless ``BAME_OPTIM_NO_AVX512`` is set
            (:func:`bame_optim.kernels.native.avx512_allowed`).

    Raises:
        ValueError: on unsupported or inconsistent input (checked before anything is written).
        RuntimeError: if the kernel is disabled or unavailable (check :func:`available`).
    """
    module = _load()  # None when disabled
    if module is None:
        if disabled():
            raise RuntimeError(f"native kernels are disabled ({DISABLE_ENV} is set)")
        raise RuntimeError(f"the fused kept-SGD kernel is unavailable: {error()}")
    size = len(params)
    if not len(grads) == len(momentum_buffers) == len(kept) == len(counts) == size:
        raise ValueError(
            "params, grads, momentum_buffers, kept and counts must have equal lengths, got "
            f"{size}, {len(grads)}, {len(momentum_buffers)}, {len(kept)}, {len(counts)}"
        )
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"Invalid m value: {m!r} (a positive integer is required)")
    for name, value in (
        ("lr", lr),
        ("momentum", momentum),
        ("dampening", dampening),
        ("weight_decay", weight_decay),
    ):
        if isinstance(value, Tensor) or not isinstance(value, Real):
            raise ValueError(f"Invalid {name} value: {value!r} (a real number is required)")
    # Tensors are checked in C++ (cheaper per parameter than here).
    tables, codes = tables_for(kept, counts, m)
    created = module.fused_kept_sgd(
        params,
        grads,
        momentum_buffers,
        kept,
        tables,
        codes,
        m,
        float(lr),
        float(momentum),
        float(dampening),
        float(weight_decay),
        bool(nesterov),
        bool(maximize),
        _state["fma"],
        native.avx512_allowed(avx512),
    )
    if momentum != 0:
        for i, buffer in enumerate(created):
            if buffer is not None:
                momentum_buffers[i] = buffer


def fma() -> bool:
    """Whether ATen's ``add(a, b, alpha)`` is a fused multiply-add here (the probe's answer;
    :func:`available` must be True)."""
    return bool(_state["fma"])


def cpu_has_avx512() -> bool:
    """Whether this CPU runs the kept kernels' AVX-512 paths (:func:`available` must be
    True)."""
    module = _load()
    return module is not None and bool(module.cpu_has_avx512())


def table_for(code: Tensor, count: int, m: int, i: int) -> Tensor | None:
    """The decoding table of ``kept[i]`` (colex ranks ``[K]``), or ``None`` for sorted
    positions ``[K, count]`` (``ValueError`` for a count that is not an int)."""
    if isinstance(count, bool) or not isinstance(count, int):
        raise ValueError(f"Invalid counts[{i}] value: {count!r} (an integer is required)")
    return _rank_table(count, m) if code.ndim == 1 and 0 <= count <= m else None


def tables_for(kept: list[Tensor | None], counts: list[int | None], m: int
               ) -> tuple[list[Tensor | None], list[int]]:
    """:func:`table_for` of every stored kept set (``None`` for a dense parameter, whose count
    is passed as 0), looked up once per count and form."""
    tables: list[Tensor | None] = []
    codes: list[int] = []
    seen: dict[tuple[int, int], Tensor | None] = {}
    for i, (code, count) in enumerate(zip(kept, counts, strict=True)):
        if code is None:
            tables.append(None)
            codes.append(0)
            continue
        key = (code.ndim, count)
        if type(count) is not int or key not in seen:
            seen[key] = table_for(code, count, m, i)
        tables.append(seen[key])
        codes.append(count)
    return tables, codes


@lru_cache(maxsize=32)
def _rank_table(count: int, m: int) -> Tensor:
    # [C, count] int32: the sorted positions of colex rank r in row r (cached, never written).
    from bame_optim.core.kept import MAX_RANKED, positions_by_rank

    if math.comb(m, count) > MAX_RANKED:
        raise ValueError(
            f"Invalid kept form for count={count}, m={m}: binom(m, count) > {MAX_RANKED}, so the "
            "sorted positions [K, count] are stored, not ranks"
        )
    return positions_by_rank(count, m, torch.device("cpu")).to(torch.int32).contiguous()


def error() -> str | None:
    """Why the kernel is unavailable (``None`` if it is, or was not tried)."""
    return native.error() or _state.get("error")  # type: ignore[return-value]


def _load() -> ModuleType | None:
    return native.probe_once(native.load, _state, _lock, "fma", _probe_fma,
                             "the fused kept kernels are")


def _probe_fma(module: ModuleType) -> bool:
    """Whether ATen's CPU ``add(a, b, alpha)`` is a fused multiply-add here, in both its
    vectorised body and its scalar tail; raises if neither rounding reproduces it."""
    generator = torch.Generator().manual_seed(0)
    modes = []
    for dtype in (torch.float32, torch.float64):
        # 1000 + 7 entries: several vector chunks and a scalar tail at any vector width.
        a = torch.randn(1007, generator=generator, dtype=torch.float64).to(dtype)
        b = torch.randn(1007, generator=generator, dtype=torch.float64).to(dtype)
        alphas = (-0.1, 0.9, 5e-4, -0.0123)
        expected = [a.add(b, alpha=alpha) for alpha in alphas]
        modes.append(
            [
                all(
                    torch.equal(module.probe_add(a, b, alpha, fma), e)
                    for alpha, e in zip(alphas, expected, strict=True)
                )
                for fma in (True, False)
            ]
        )
    if all(fused for fused, _ in modes):
        return True
    if all(unfused for _, unfused in modes):
        return False
    raise RuntimeError(
        "ATen's CPU add(alpha) rounds neither as a fused nor as an unfused multiply-add "
        f"(float32, float64: {modes}), so the kernel could not be bit-identical"
    )
