"""The Triton programs of :mod:`bame_optim.kernels.triton_kept` (imported only from there, and
only when a step runs: this module imports Triton).

One program handles ``BLOCK_K`` blocks of one parameter: it decodes each block's kept set
(colex rank -> sorted positions through the ``[C, COUNT]`` table, or stored positions), gathers
the kept weights and gradients from their strided addresses, updates the compact state rows
and scatters the weights back. Hyper-parameters arrive as float64 scalars (as torch's Python
floats) and are cast to the compute dtype, as ATen casts a scalar to the tensor's dtype.
"""

# ruff: noqa: SIM108  (if/else on constexpr flags, the form Triton's compiler folds)
import triton
import triton.language as tl


@triton.jit
def _kept_addresses(
    kept_ptr, table_ptr, num_blocks, blocks_per_row, n1, n2,
    s0, s1, s2, s_in, g0, g1, g2, g_in,
    M: tl.constexpr, COUNT: tl.constexpr, COUNT_P2: tl.constexpr, BLOCK_K: tl.constexpr,
    RANKED: tl.constexpr,
):
    # Blocks are numbered in the order of core.nm.block_view: [out, *k (coalesced to n1, n2),
    # in / M]; the kept entry c of block b sits at input index (b % blocks_per_row) * M + c.
    blocks = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = tl.arange(0, COUNT_P2)
    mask = (blocks < num_blocks)[:, None] & (cols < COUNT)[None, :]
    if RANKED:
        rank = tl.load(kept_ptr + blocks, mask=blocks < num_blocks, other=0).to(tl.int64)
        pos = tl.load(table_ptr + rank[:, None] * COUNT + cols[None, :], mask=mask, other=0)
    else:
        pos = tl.load(kept_ptr + blocks[:, None] * COUNT + cols[None, :], mask=mask, other=0)
    pos = pos.to(tl.int64)
    column = (blocks % blocks_per_row)[:, None] * M + pos
    outer = blocks // blocks_per_row
    i2 = outer % n2
    outer = outer // n2
    i1 = outer % n1
    i0 = outer // n1
    p_off = (i0 * s0 + i1 * s1 + i2 * s2)[:, None] + column * s_in
    g_off = (i0 * g0 + i1 * g1 + i2 * g2)[:, None] + column * g_in
    compact = blocks[:, None] * COUNT + cols[None, :]
    return p_off, g_off, compact, mask


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
    p_ptr, g_ptr, buf_ptr, kept_ptr, table_ptr,
    num_blocks, blocks_per_row, n1, n2,
    s0, s1, s2, s_in, g0, g1, g2, g_in,
    lr: tl.float64, momentum: tl.float64, one_minus_dampening: tl.float64,
    weight_decay: tl.float64,
    M: tl.constexpr, COUNT: tl.constexpr, COUNT_P2: tl.constexpr, BLOCK_K: tl.constexpr,
    RANKED: tl.constexpr, CT: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr, FIRST: tl.constexpr, NESTEROV: tl.constexpr,
    MAXIMIZE: tl.constexpr,
):
    p_off, g_off, compact, mask = _kept_addresses(
        kept_ptr, table_ptr, num_blocks, blocks_per_row, n1, n2,
        s0, s1, s2, s_in, g0, g1, g2, g_in, M, COUNT, COUNT_P2, BLOCK_K, RANKED,
    )
    w = tl.load(p_ptr + p_off, mask=mask, other=0).to(CT)
    g = tl.load(g_ptr + g_off, mask=mask, other=0).to(CT)
    if MAXIMIZE:
        g = -g
    if HAS_WEIGHT_DECAY:
        g = g + tl.cast(weight_decay, CT) * w
    if HAS_MOMENTUM:
        mu = tl.cast(momentum, CT)
        if FIRST:  # torch.optim.SGD's first step: the buffer is a copy of the gradient
            b = g
        else:
            b = tl.load(buf_ptr + compact, mask=mask, other=0).to(CT)
            b = b * mu + tl.cast(one_minus_dampening, CT) * g
        tl.store(buf_ptr + compact, b.to(buf_ptr.dtype.element_ty), mask=mask)
        if NESTEROV:
            g = g + mu * b
        else:
            g = b
    w = w + tl.cast(-lr, CT) * g
    tl.store(p_ptr + p_off, w.to(p_ptr.dtype.element_ty), mask=mask)


@triton.jit
def kept_adamw_kernel(
    p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, kept_ptr, table_ptr,
    num_blocks, blocks_per_row, n1, n2,
    s0, s1, s2, s_in, g0, g1, g2, g_in,
    decay: tl.float64, one_minus_beta1: tl.float64, beta2: tl.float64,
    one_minus_beta2: tl.float64, step_size: tl.float64, bias_correction2_sqrt: tl.float64,
    eps: tl.float64,
    M: tl.constexpr, COUNT: tl.constexpr, COUNT_P2: tl.constexpr, BLOCK_K: tl.constexpr,
    RANKED: tl.constexpr, CT: tl.constexpr, F64: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr,
    AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
):
    p_off, g_off, compact, mask = _kept_addresses(
        kept_ptr, table_ptr, num_blocks, blocks_per_row, n1, n2,
        s0, s1, s2, s_in, g0, g1, g2, g_in, M, COUNT, COUNT_P2, BLOCK_K, RANKED,
    )
    w = tl.load(p_ptr + p_off, mask=mask, other=0).to(CT)
    g = tl.load(g_ptr + g_off, mask=mask, other=0).to(CT)
    if MAXIMIZE:
        g = -g
    if HAS_WEIGHT_DECAY:
        w = w * tl.cast(decay, CT)
    # exp_avg.lerp_(grad, 1 - beta1), in ATen's two branches (exact at the end points).
    a = tl.load(m_ptr + compact, mask=mask, other=0).to(CT)
    weight = tl.cast(one_minus_beta1, CT)
    diff = g - a
    a = tl.where(weight < 0.5, a + weight * diff, g - diff * (1.0 - weight))
    tl.store(m_ptr + compact, a.to(m_ptr.dtype.element_ty), mask=mask)
    v = tl.load(v_ptr + compact, mask=mask, other=0).to(CT)
    v = v * tl.cast(beta2, CT) + tl.cast(one_minus_beta2, CT) * g * g
    tl.store(v_ptr + compact, v.to(v_ptr.dtype.element_ty), mask=mask)
    if AMSGRAD:
        v = tl.maximum(tl.load(vmax_ptr + compact, mask=mask, other=0).to(CT), v)
        tl.store(vmax_ptr + compact, v.to(vmax_ptr.dtype.element_ty), mask=mask)
    denom = _div(_sqrt(v, F64), tl.cast(bias_correction2_sqrt, CT), F64) + tl.cast(eps, CT)
    w = w + tl.cast(-step_size, CT) * _div(a, denom, F64)
    tl.store(p_ptr + p_off, w.to(p_ptr.dtype.element_ty), mask=mask)
