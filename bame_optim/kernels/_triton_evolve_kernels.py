"""The Triton programs of :mod:`bame_optim.kernels.triton_evolve` (imported only from there, and
only when an update runs: this module imports Triton).

One program handles ``BLOCK_K`` blocks of one parameter, ``[BLOCK_K, M_P2]`` entries at a time
(``M_P2``: ``M`` rounded up to a power of two; the padding lanes are masked out). Blocks are
addressed as in :mod:`bame_optim.kernels._triton_kept_kernels` (block order of
:mod:`bame_optim.core.nm`, strides folded to three outer dimensions). Hyper-parameters arrive
as a small tensor already cast to the parameter's dtype (as ATen casts a scalar operand; the
interpreter would pass float scalars as float32), and the launches pass
``enable_fp_fusion=False``: no product and sum fused into one rounding where the eager kernels
round twice.
"""

# ruff: noqa: SIM108  (if/else on constexpr flags, the form Triton's compiler folds)
import triton
import triton.language as tl


@triton.jit
def _block_offsets(
    blocks, cols, per_row, n1, n2, s0, s1, s2, s_in, M: tl.constexpr,
):
    # Entry j of block b sits at input index (b % per_row) * M + j of its outer row.
    column = (blocks % per_row)[:, None] * M + cols[None, :]
    outer = blocks // per_row
    i2 = outer % n2
    outer = outer // n2
    i1 = outer % n1
    i0 = outer // n1
    return (i0 * s0 + i1 * s1 + i2 * s2)[:, None] + column * s_in


@triton.jit
def _decode(code_ptr, masks_ptr, blocks, bmask, COUNT: tl.constexpr, COUNT_P2: tl.constexpr,
            RANKED: tl.constexpr):
    # The bit pattern (int64) of each block's stored kept set: a rank through the masks table,
    # or the OR of its sorted positions.
    if RANKED:
        code = tl.load(code_ptr + blocks, mask=bmask, other=0).to(tl.int64)
        bits = tl.load(masks_ptr + code, mask=bmask, other=0)
    else:
        slots = tl.arange(0, COUNT_P2)
        smask = bmask[:, None] & (slots < COUNT)[None, :]
        pos = tl.load(code_ptr + blocks[:, None] * COUNT + slots[None, :], mask=smask, other=0)
        one = tl.full([1, 1], 1, tl.int64)
        bits = tl.sum(tl.where(smask, one << pos.to(tl.int64), 0), axis=1)
    return bits


@triton.jit
def _key(score, F64: tl.constexpr):
    # Order-preserving signed key (int64) of each score: -0.0 as 0.0, NaN above +inf, all NaNs
    # equal (torch.sort's order; the CPU kernels' mono() with the top bit flipped).
    if F64:
        i = score.to(tl.int64, bitcast=True)
        magnitude = i & 0x7FFFFFFFFFFFFFFF
        i = tl.where(magnitude == 0, 0, i)
        key = i ^ ((i >> 63) & 0x7FFFFFFFFFFFFFFF)
        key = tl.where(magnitude > 0x7FF0000000000000, 0x7FFFFFFFFFFFFFFF, key)
    else:
        i = score.to(tl.int32, bitcast=True)
        magnitude = i & 0x7FFFFFFF
        i = tl.where(magnitude == 0, 0, i)
        key32 = i ^ ((i >> 31) & 0x7FFFFFFF)
        key32 = tl.where(magnitude > 0x7F800000, 0x7FFFFFFF, key32)
        key = key32.to(tl.int64)
    return key


@triton.jit
def evolve_kernel(
    w_ptr, g_ptr, kept_ptr, masks_ptr, prop_ptr, by_bits_ptr, binom_ptr, osc_in_ptr, osc_out_ptr,
    hyper_ptr, num_blocks, per_row, n1, n2, s0, s1, s2, s_in, g0, g1, g2, g_in,
    N: tl.constexpr, M: tl.constexpr, M_P2: tl.constexpr, COUNT: tl.constexpr,
    COUNT_P2: tl.constexpr, BLOCK_K: tl.constexpr, RANKED: tl.constexpr,
    PRANKED: tl.constexpr, BY_BITS: tl.constexpr, HAS_OSC: tl.constexpr, ADAM: tl.constexpr,
    ZERO: tl.constexpr, F64: tl.constexpr,
):
    # lr, gamma and 1 - gamma, already in the parameter's dtype (cast on the host).
    lr = tl.load(hyper_ptr)
    gamma = tl.load(hyper_ptr + 1)
    one_minus_gamma = tl.load(hyper_ptr + 2)
    blocks = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    bmask = blocks < num_blocks
    cols = tl.arange(0, M_P2).to(tl.int64)
    emask = bmask[:, None] & (cols < M)[None, :]
    kept = _decode(kept_ptr, masks_ptr, blocks, bmask, COUNT, COUNT_P2, RANKED)
    on = (((kept[:, None] >> cols[None, :]) & 1) == 1) & emask
    p_off = _block_offsets(blocks, cols, per_row, n1, n2, s0, s1, s2, s_in, M)
    g_off = _block_offsets(blocks, cols, per_row, n1, n2, g0, g1, g2, g_in, M)
    w = tl.load(w_ptr + p_off, mask=emask, other=0)
    g = tl.load(g_ptr + g_off, mask=emask, other=0)
    if ZERO:  # NMEngine.zero_pruned_: pruned entries hold +0.0 (all bits 0) afterwards
        if F64:
            nonzero = w.to(tl.int64, bitcast=True) != 0
        else:
            nonzero = w.to(tl.int32, bitcast=True) != 0
        dirty = nonzero & (~on) & emask
        w = tl.where(dirty, 0.0, w)
        tl.store(w_ptr + p_off, w, mask=dirty)
    prune = tl.abs(g * w)  # Eq. 4: |G W|
    if ADAM:
        revive = tl.abs(g) * lr  # eta |G|
    else:
        revive = (g * g) * lr  # Eq. 5: eta G^2, G^2 rounded first
    lowest = tl.full([1, 1], -0x7FFFFFFFFFFFFFFF - 1, tl.int64)  # padding: below all keys
    key = tl.where(emask, _key(tl.where(on, prune, revive), F64), lowest)
    tie = tl.where(on, 128, 0) + (127 - cols)[None, :]
    # Entry j is proposed when fewer than n entries come before it (a larger key, or an equal
    # key and a larger tie code: the kept weight, then the lower index).
    before = (key[:, :, None] > key[:, None, :]) | (
        (key[:, :, None] == key[:, None, :]) & (tie[:, :, None] > tie[:, None, :])
    )
    rank = tl.sum(before.to(tl.int32), axis=1)
    chosen = (rank < N) & emask
    one = tl.full([1, 1], 1, tl.int64)
    bits = tl.sum(tl.where(chosen, one << cols[None, :], 0), axis=1)
    if PRANKED:
        if BY_BITS:
            code = tl.load(by_bits_ptr + bits, mask=bmask, other=0)
        else:  # colex rank: sum of binom(position, its 1-based place) over the proposal
            place = tl.cumsum(chosen.to(tl.int64), axis=1)
            terms = tl.load(binom_ptr + cols[None, :] * (M + 1) + place, mask=chosen, other=0)
            code = tl.sum(terms, axis=1)
        tl.store(prop_ptr + blocks, code.to(prop_ptr.dtype.element_ty), mask=bmask)
    else:  # sorted positions
        slot = tl.cumsum(chosen.to(tl.int64), axis=1) - 1
        tl.store(prop_ptr + blocks[:, None] * N + slot, cols[None, :].to(prop_ptr.dtype.element_ty),
                 mask=chosen)
    divergence = tl.sum(((on != chosen) & emask).to(tl.int32), axis=1).to(lr.dtype)  # Eq. 7
    if HAS_OSC:
        before_osc = tl.load(osc_in_ptr + blocks, mask=bmask, other=0)
    else:
        before_osc = tl.zeros([BLOCK_K], dtype=lr.dtype)
    decayed = before_osc * gamma  # Eq. 8, rounded as update_oscillation
    added = divergence * one_minus_gamma
    tl.store(osc_out_ptr + blocks, decayed + added, mask=bmask)


@triton.jit
def apply_kernel(
    w_ptr, kept_ptr, prop_ptr, frozen_ptr, out_ptr, masks_ptr, b0_ptr, b1_ptr, b2_ptr, flips_ptr,
    num_blocks, per_row, n1, n2, s0, s1, s2, s_in,
    M: tl.constexpr, M_P2: tl.constexpr, COUNT: tl.constexpr, COUNT_P2: tl.constexpr,
    BLOCK_K: tl.constexpr, RANKED: tl.constexpr, BUFFERS: tl.constexpr,
):
    blocks = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    bmask = blocks < num_blocks
    frozen = tl.load(frozen_ptr + blocks, mask=bmask, other=1) != 0
    old = _decode(kept_ptr, masks_ptr, blocks, bmask, COUNT, COUNT_P2, RANKED)
    proposal = _decode(prop_ptr, masks_ptr, blocks, bmask, COUNT, COUNT_P2, RANKED)
    now = tl.where(frozen, old, proposal)
    if RANKED:  # the stored code of the new kept set: the old one or the proposal's
        old_code = tl.load(kept_ptr + blocks, mask=bmask, other=0)
        new_code = tl.load(prop_ptr + blocks, mask=bmask, other=0)
        tl.store(out_ptr + blocks, tl.where(frozen, old_code, new_code), mask=bmask)
    else:
        slots = tl.arange(0, COUNT_P2)
        smask = bmask[:, None] & (slots < COUNT)[None, :]
        at = blocks[:, None] * COUNT + slots[None, :]
        old_code = tl.load(kept_ptr + at, mask=smask, other=0)
        new_code = tl.load(prop_ptr + at, mask=smask, other=0)
        tl.store(out_ptr + at, tl.where(frozen[:, None], old_code, new_code), mask=smask)
    changed = (now != old) & bmask
    cols = tl.arange(0, M_P2).to(tl.int64)
    emask = changed[:, None] & (cols < M)[None, :]
    was = (((old[:, None] >> cols[None, :]) & 1) == 1) & emask
    is_now = (((now[:, None] >> cols[None, :]) & 1) == 1) & emask
    flips = tl.sum(tl.sum((was != is_now).to(tl.int64), axis=1), axis=0)
    tl.store(flips_ptr + tl.program_id(0), flips)
    p_off = _block_offsets(blocks, cols, per_row, n1, n2, s0, s1, s2, s_in, M)
    zero = tl.zeros([BLOCK_K, M_P2], dtype=w_ptr.dtype.element_ty)
    tl.store(w_ptr + p_off, zero, mask=was & (~is_now))  # newly pruned weights: 0
    if BUFFERS > 0:
        # A weight kept by both moves its values to its new slot; a revived one gets 0
        # (core.kept.remap_kept). All of a row is read before any of it is written.
        old_slot = tl.cumsum(was.to(tl.int64), axis=1) - 1
        new_slot = tl.cumsum(is_now.to(tl.int64), axis=1) - 1
        row = blocks[:, None] * COUNT
        keep = is_now & was
        v0 = tl.load(b0_ptr + row + old_slot, mask=keep, other=0)
        if BUFFERS > 1:
            v1 = tl.load(b1_ptr + row + old_slot, mask=keep, other=0)
        if BUFFERS > 2:
            v2 = tl.load(b2_ptr + row + old_slot, mask=keep, other=0)
        tl.debug_barrier()
        tl.store(b0_ptr + row + new_slot, v0, mask=is_now)
        if BUFFERS > 1:
            tl.store(b1_ptr + row + new_slot, v1, mask=is_now)
        if BUFFERS > 2:
            tl.store(b2_ptr + row + new_slot, v2, mask=is_now)
