"""The Triton programs of :mod:`bame_optim.kernels.triton_kept` (imported only from there, and
only when a step runs: this module imports Triton).

One launch steps every parameter of one signature (dtype, kept count, code form). Its
parameters are rows of an ``int64`` table (the columns below): addresses, block count and
folded strides, the launch's first program of the parameter and, for AdamW, its two
step-dependent scalars as float64 bits. Program ``i`` finds its row by a binary search over the
rows' first programs, then handles ``BLOCK_K`` blocks of that parameter: it decodes each
block's kept set (colex rank -> sorted positions through the ``[C, COUNT]`` table, or stored
positions), gathers the kept weights and gradients from their strided addresses, updates the
compact state rows and scatters the weights back. Hyper-parameters arrive as float64 scalars
(as torch's Python floats) and are cast to the compute dtype, as ATen casts a scalar to the
tensor's dtype.
"""

# ruff: noqa: SIM108  (if/else on constexpr flags, the form Triton's compiler folds)
import struct

import torch
import triton
import triton.language as tl

# The columns of a row of the launch table (table_row writes them in this order).
PARAM = tl.constexpr(0)
GRAD = tl.constexpr(1)
KEPT = tl.constexpr(2)
STATE = tl.constexpr(3)
"""Three columns: the compact state tensors (SGD's momentum; AdamW's two moments and maxima)."""
BLOCKS = tl.constexpr(6)
"""Then ``num_blocks, blocks_per_row, n1, n2``, the parameter's ``s0, s1, s2, s_in`` and the
gradient's ``g0, g1, g2, g_in``."""
DIVISORS = tl.constexpr(18)
"""Then ``(magic, shift)`` of ``blocks_per_row``, ``n2`` and ``n1``
(:func:`bame_optim.kernels.triton_kept.division_magic`)."""
FIRST_PROGRAM = tl.constexpr(24)
SCALARS = tl.constexpr(25)
"""Two float64 columns (bits): AdamW's step size and ``sqrt(1 - beta2^t)``."""
ROW = tl.constexpr(27)

ELEMENT_TYPES = {
    torch.float32: tl.float32, torch.float64: tl.float64, torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16, torch.uint8: tl.uint8, torch.int16: tl.int16,
    torch.int64: tl.int64,
}
"""The pointer element type of a parameter (``DT``) or kept-code (``KT``) dtype."""

_BLOCKS, _ROW = BLOCKS.value, ROW.value  # plain ints: table_row runs per parameter and step
_ZEROS = [0] * _ROW


def table_row(
    tensors: list[torch.Tensor], layout: tuple[int, ...], first_program: int,
    scalars: tuple[float, ...],
) -> list[int]:
    """One row of the launch table, in the columns above: ``tensors`` are the parameter, its
    gradient, its kept code and its (up to three) state tensors; ``layout`` is
    ``num_blocks, blocks_per_row, n1, n2``, the two tensors' folded strides and the three
    divisors' magic numbers."""
    row = [t.data_ptr() for t in tensors]
    row += _ZEROS[len(row):_BLOCKS]
    row += layout
    row.append(first_program)
    row += [struct.unpack("=q", struct.pack("=d", x))[0] for x in scalars]
    row += _ZEROS[len(row):_ROW]
    return row


@triton.jit
def _row(meta_ptr, num_rows, LOG_ROWS: tl.constexpr):
    # The table offset of this program's row (the last row whose first program <= this one)
    # and the program's index within that parameter.
    program = tl.program_id(0).to(tl.int64)
    lo = program * 0
    hi = lo + num_rows
    for _ in tl.static_range(LOG_ROWS):
        mid = (lo + hi) // 2
        inside = tl.load(meta_ptr + mid * ROW + FIRST_PROGRAM) <= program
        lo = tl.where(inside, mid, lo)
        hi = tl.where(inside, hi, mid)
    row = lo * ROW
    return row, program - tl.load(meta_ptr + row + FIRST_PROGRAM)


@triton.jit
def _column_ptr(meta_ptr, row, column, DT: tl.constexpr):
    return tl.load(meta_ptr + row + column).to(tl.pointer_type(DT))


@triton.jit
def _kept_addresses(
    meta_ptr, row, program, table_ptr,
    M: tl.constexpr, COUNT: tl.constexpr, COUNT_P2: tl.constexpr, BLOCK_K: tl.constexpr,
    RANKED: tl.constexpr, KT: tl.constexpr, WIDE: tl.constexpr,
):
    # Blocks are numbered in the order of core.nm.block_view: [out, *k (coalesced to n1, n2),
    # in / M]; the kept entry c of block b sits at input index (b % blocks_per_row) * M + c.
    # Indices and offsets are int32 unless a tensor of the launch spans 2**30 elements or more
    # (WIDE: int64; triton_kept._INT32_SPAN), and the block index is split by multiplications
    # with the divisors' magic numbers: a GPU emulates integer division, and 64-bit arithmetic
    # takes several instructions per operation.
    num_blocks = tl.load(meta_ptr + row + BLOCKS)
    blocks_per_row = tl.load(meta_ptr + row + BLOCKS + 1)
    n1 = tl.load(meta_ptr + row + BLOCKS + 2)
    n2 = tl.load(meta_ptr + row + BLOCKS + 3)
    kept_ptr = _column_ptr(meta_ptr, row, KEPT, KT)
    blocks = program * BLOCK_K + tl.arange(0, BLOCK_K)  # int64
    cols = tl.arange(0, COUNT_P2)
    mask = (blocks < num_blocks)[:, None] & (cols < COUNT)[None, :]
    if WIDE:
        outer, block_column = blocks // blocks_per_row, blocks % blocks_per_row
        outer, i2 = outer // n2, outer % n2
        i0, i1 = outer // n1, outer % n1
    else:
        blocks = blocks.to(tl.int32)
        outer, block_column = _divmod(blocks, meta_ptr, row + DIVISORS,
                                      blocks_per_row.to(tl.int32))
        outer, i2 = _divmod(outer, meta_ptr, row + DIVISORS + 2, n2.to(tl.int32))
        i0, i1 = _divmod(outer, meta_ptr, row + DIVISORS + 4, n1.to(tl.int32))
    compact = blocks[:, None] * COUNT + cols[None, :]
    if RANKED:
        rank = tl.load(kept_ptr + blocks, mask=blocks < num_blocks, other=0).to(blocks.dtype)
        pos = tl.load(table_ptr + rank[:, None] * COUNT + cols[None, :], mask=mask, other=0)
    else:
        pos = tl.load(kept_ptr + compact, mask=mask, other=0)
    column = block_column[:, None] * M + pos.to(blocks.dtype)
    p_off = _offsets(meta_ptr, row + BLOCKS + 4, i0, i1, i2, column)
    g_off = _offsets(meta_ptr, row + BLOCKS + 8, i0, i1, i2, column)
    return p_off, g_off, compact, mask


@triton.jit
def _divmod(n, meta_ptr, magic_column, d):
    # (n // d, n % d) of int32 n in [0, 2**31) by one widening multiply and a shift.
    magic = tl.load(meta_ptr + magic_column).to(tl.uint64)
    shift = tl.load(meta_ptr + magic_column + 1).to(tl.uint64)
    q = ((n.to(tl.uint64) * magic) >> shift).to(tl.int32)
    return q, n - q * d


@triton.jit
def _offsets(meta_ptr, strides, i0, i1, i2, column):
    # In the indices' dtype (strides below 2**31 where the launch is not WIDE).
    s0 = tl.load(meta_ptr + strides).to(i0.dtype)
    s1 = tl.load(meta_ptr + strides + 1).to(i0.dtype)
    s2 = tl.load(meta_ptr + strides + 2).to(i0.dtype)
    s_in = tl.load(meta_ptr + strides + 3).to(i0.dtype)
    return (i0 * s0 + i1 * s1 + i2 * s2)[:, None] + column * s_in


@triton.jit
def _sqrt(x, F64: tl.constexpr):
    # Correctly rounded, as ATen's sqrt (Triton's float32 sqrt and division are approximate).
    if F64:
        y = tl.sqrt(x)
    else:
        y = tl.sqrt_rn(x)
    return y


@triton.jit
def _div(x, y, F64: tl.constexpr):
    if F64:
        z = x / y
    else:
        z = tl.div_rn(x, y)
    return z


@triton.jit
def kept_sgd_kernel(
    meta_ptr, num_rows, table_ptr,
    lr: tl.float64, momentum: tl.float64, one_minus_dampening: tl.float64,
    weight_decay: tl.float64,
    M: tl.constexpr, COUNT: tl.constexpr, COUNT_P2: tl.constexpr, BLOCK_K: tl.constexpr,
    RANKED: tl.constexpr, KT: tl.constexpr, DT: tl.constexpr, CT: tl.constexpr,
    LOG_ROWS: tl.constexpr, WIDE: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    FIRST: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
):
    row, program = _row(meta_ptr, num_rows, LOG_ROWS)
    p_off, g_off, compact, mask = _kept_addresses(
        meta_ptr, row, program, table_ptr, M, COUNT, COUNT_P2, BLOCK_K, RANKED, KT, WIDE,
    )
    p_ptr = _column_ptr(meta_ptr, row, PARAM, DT)
    w = tl.load(p_ptr + p_off, mask=mask, other=0).to(CT)
    g = tl.load(_column_ptr(meta_ptr, row, GRAD, DT) + g_off, mask=mask, other=0).to(CT)
    if MAXIMIZE:
        g = -g
    if HAS_WEIGHT_DECAY:
        g = g + tl.cast(weight_decay, CT) * w
    if HAS_MOMENTUM:
        buf_ptr = _column_ptr(meta_ptr, row, STATE, DT)
        mu = tl.cast(momentum, CT)
        if FIRST:  # torch.optim.SGD's first step: the buffer is a copy of the gradient
            b = g
        else:
            b = tl.load(buf_ptr + compact, mask=mask, other=0).to(CT)
            b = b * mu + tl.cast(one_minus_dampening, CT) * g
        tl.store(buf_ptr + compact, b.to(DT), mask=mask)
        if NESTEROV:
            g = g + mu * b
        else:
            g = b
    w = w + tl.cast(-lr, CT) * g
    tl.store(p_ptr + p_off, w.to(DT), mask=mask)


@triton.jit
def kept_adamw_kernel(
    meta_ptr, num_rows, table_ptr,
    decay: tl.float64, one_minus_beta1: tl.float64, beta2: tl.float64,
    one_minus_beta2: tl.float64, eps: tl.float64,
    M: tl.constexpr, COUNT: tl.constexpr, COUNT_P2: tl.constexpr, BLOCK_K: tl.constexpr,
    RANKED: tl.constexpr, KT: tl.constexpr, DT: tl.constexpr, CT: tl.constexpr,
    LOG_ROWS: tl.constexpr, WIDE: tl.constexpr, F64: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr,
    AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
):
    row, program = _row(meta_ptr, num_rows, LOG_ROWS)
    p_off, g_off, compact, mask = _kept_addresses(
        meta_ptr, row, program, table_ptr, M, COUNT, COUNT_P2, BLOCK_K, RANKED, KT, WIDE,
    )
    step_size = tl.load(meta_ptr + row + SCALARS).to(tl.float64, bitcast=True)
    bias_correction2_sqrt = tl.load(meta_ptr + row + SCALARS + 1).to(tl.float64, bitcast=True)
    p_ptr = _column_ptr(meta_ptr, row, PARAM, DT)
    m_ptr = _column_ptr(meta_ptr, row, STATE, DT)
    v_ptr = _column_ptr(meta_ptr, row, STATE + 1, DT)
    w = tl.load(p_ptr + p_off, mask=mask, other=0).to(CT)
    g = tl.load(_column_ptr(meta_ptr, row, GRAD, DT) + g_off, mask=mask, other=0).to(CT)
    if MAXIMIZE:
        g = -g
    if HAS_WEIGHT_DECAY:
        w = w * tl.cast(decay, CT)
    # exp_avg.lerp_(grad, 1 - beta1), in ATen's two branches (exact at the end points).
    a = tl.load(m_ptr + compact, mask=mask, other=0).to(CT)
    weight = tl.cast(one_minus_beta1, CT)
    diff = g - a
    a = tl.where(weight < 0.5, a + weight * diff, g - diff * (1.0 - weight))
    tl.store(m_ptr + compact, a.to(DT), mask=mask)
    v = tl.load(v_ptr + compact, mask=mask, other=0).to(CT)
    v = v * tl.cast(beta2, CT) + tl.cast(one_minus_beta2, CT) * g * g
    tl.store(v_ptr + compact, v.to(DT), mask=mask)
    if AMSGRAD:
        vmax_ptr = _column_ptr(meta_ptr, row, STATE + 2, DT)
        v = tl.maximum(tl.load(vmax_ptr + compact, mask=mask, other=0).to(CT), v)
        tl.store(vmax_ptr + compact, v.to(DT), mask=mask)
    denom = _div(_sqrt(v, F64), tl.cast(bias_correction2_sqrt, CT), F64) + tl.cast(eps, CT)
    w = w + tl.cast(-step_size, CT) * _div(a, denom, F64)
    tl.store(p_ptr + p_off, w.to(DT), mask=mask)
