"""Compact storage of the kept set of N:M blocks: pure functions of tensors.

:class:`bame_optim.BAMESGD` stores, per sparse parameter, which ``count`` of every ``M``
weights are kept (``state["kept"]``) and the momentum of those weights only, ``[K, count]``
in the block order of :mod:`bame_optim.core.nm`. The kept set of a block is one ``count``-subset
of ``range(M)``, stored as its rank in colexicographic order (the combinatorial number system,
Knuth TAOCP 7.2.1.3, Eq. (3)):

.. math::
    \\operatorname{rank}(c_1 < \\dots < c_n) = \\sum_{i=1}^{n} \\binom{c_i}{i}

so a 2:4 block costs one byte (6 subsets) and a 1:16 block one byte (16 subsets), against
``M`` bytes for a ``bool`` mask. Where the number of subsets exceeds :data:`MAX_RANKED`
(e.g. 16 of 32) the sorted kept positions ``[K, count]`` are stored instead. Either form is
the *kept code* (``code`` in this package's signatures); the ``[K, M]`` bool it stands for is
the *kept mask* (docs/design.md, "State of a sparse parameter").

:func:`kept_indices` turns either form into the sorted positions ``[K, count]`` (``int64``)
that :func:`gather_kept` / :func:`scatter_kept_` use on the parameter, through the
:func:`bame_optim.core.nm.block_view` view, so no step copies a whole parameter.
"""

from __future__ import annotations

import math
import sys
from functools import lru_cache
from itertools import combinations

import torch
from torch import Tensor

from bame_optim.core.nm import block_view

__all__ = [
    "MAX_RANKED",
    "combination_table",
    "decode_kept",
    "encode_kept",
    "gather_kept",
    "kept_indices",
    "mask_from_indices",
    "positions_by_rank",
    "remap_kept",
    "scatter_kept_",
]

MAX_BIT_TABLE_M = 16
"""Up to this ``M`` a block's kept set is encoded through its bit pattern and a ``2**M`` table
(65536 int64 entries at most); larger ``M`` sums binomials per position."""

MAX_RANKED = 2**15
"""Largest number of subsets ``binom(M, count)`` stored as a rank (an ``int16`` code and a
decoding table of at most ``2**15 * count`` bytes); above it positions are stored."""


MAX_PAIR_TABLE = 2**13
"""Largest ``binom(M, old) * binom(M, new)`` for which :func:`remap_kept` looks its sources up
in a table of all pairs of kept sets (at most ``2**13 * new`` int64 entries); above it (and
for stored positions) it goes through a dense ``[K, M]`` row."""

_BINOMIAL_CAP = 2**40
"""Larger than any rank sum of a ranked pattern (``< MAX_RANKED``) by far, and far below
int64's limit even summed over ``M`` positions."""


def combination_table(n: int, m: int) -> Tensor:
    """Bool ``[C, M]``, ``C = binom(m, n)``: row ``c`` marks the ``c``-th ``n``-subset of
    ``range(m)`` in :func:`itertools.combinations` (lexicographic) order."""
    subsets = list(combinations(range(m), n))
    table = torch.zeros(len(subsets), m, dtype=torch.bool)
    if n:
        table.scatter_(1, torch.tensor(subsets, dtype=torch.long).reshape(len(subsets), n), True)
    return table


def _ranked(count: int, m: int) -> bool:
    return math.comb(m, count) <= MAX_RANKED


def _code_dtype(count: int, m: int) -> torch.dtype:
    return torch.uint8 if math.comb(m, count) <= 256 else torch.int16


def _position_dtype(m: int) -> torch.dtype:
    return torch.uint8 if m <= 256 else torch.int16


@lru_cache(maxsize=16)
def _binomials(m: int, device: torch.device) -> Tensor:
    # binom(j, i) for positions j < m and ranks i <= m; cached, never written. Entries above
    # _BINOMIAL_CAP only ever meet masked-out positions or ranks of unranked patterns (ranked
    # patterns have at most MAX_RANKED subsets), so capping them keeps int64 from overflowing
    # for any m.
    table = [[min(math.comb(j, i), _BINOMIAL_CAP) for i in range(m + 1)] for j in range(m)]
    return torch.tensor(table, dtype=torch.int64, device=device)


@lru_cache(maxsize=16)
def positions_by_rank(count: int, m: int, device: torch.device) -> Tensor:
    """The decoding table of the ranked kept code: ``[binom(M, count), count]`` ``int64``
    whose row ``r`` holds the sorted positions of the ``count``-subset of colex rank ``r``
    (what :func:`kept_indices` looks a rank up in; the fused kernels read it too). Cached per
    ``(count, m, device)``: never write to it."""
    subsets = combination_table(count, m).nonzero()[:, 1].reshape(math.comb(m, count), count)
    ranks = _colex_rank(subsets, m)
    table = torch.empty_like(subsets)
    table[ranks] = subsets
    return table.to(device)


def _colex_rank(positions: Tensor, m: int) -> Tensor:
    order = torch.arange(1, positions.shape[1] + 1, device=positions.device)
    return _binomials(m, positions.device)[positions, order].sum(dim=1)


def encode_kept(mask: Tensor, count: int) -> Tensor:
    """The kept code of ``mask`` (``[K, M]`` bool with ``count`` kept in every block; the
    count is an argument so that no device value is read): the colex rank of each block's
    kept set (``[K]``, ``uint8`` or ``int16``) when ``binom(M, count) <= MAX_RANKED``, else
    the sorted kept positions ``[K, count]``."""
    if mask.ndim != 2 or mask.dtype != torch.bool:
        raise ValueError(f"Invalid mask {tuple(mask.shape)} {mask.dtype}: expected [K, M] bool")
    m = mask.shape[1]
    if not 0 <= count <= m:
        raise ValueError(f"Invalid count value: {count} (0 <= count <= M={m} is required)")
    if not _ranked(count, m):
        return _sorted_positions(mask, count).to(_position_dtype(m))
    if m <= MAX_BIT_TABLE_M:
        # One small integer per block (its bit pattern) and a table lookup.
        table = _rank_by_bits(m, mask.device, _code_dtype(count, m))
        return table.index_select(0, _bit_patterns(mask))
    return _encode_by_binomials(mask).to(_code_dtype(count, m))


def _encode_by_binomials(mask: Tensor) -> Tensor:
    # The colex rank, sum of binom(c_i, i) over the kept positions (int64), for any M.
    k, m = mask.shape
    ranks = mask.cumsum(dim=1).clamp_(max=m)
    columns = torch.arange(m, device=mask.device).expand(k, m)
    terms = _binomials(m, mask.device)[columns, ranks]
    return terms.masked_fill_(~mask, 0).sum(dim=1)


@lru_cache(maxsize=16)
def _rank_by_bits(m: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    # Entry b: the colex rank of the subset whose bit pattern is b (any popcount), converted
    # to the code dtype as encode_kept converts ranks; cached, never written.
    patterns = torch.arange(2**m, dtype=torch.int64)
    mask = (patterns.unsqueeze(1) >> torch.arange(m)) & 1
    return _encode_by_binomials(mask.bool()).to(dtype).to(device)


_ROW_INTEGERS = {2: torch.int16, 4: torch.int32, 8: torch.int64, 16: torch.int64}
"""The integer a row of ``M`` bools is read as (two of them for ``M = 16``) by
:func:`_bit_patterns`."""


def _bit_patterns(mask: Tensor) -> Tensor:
    """``sum_j mask[:, j] << j`` of each row of ``[K, M]`` bool (``M <= 16``), ``[K]`` int."""
    m = mask.shape[1]
    if m not in _ROW_INTEGERS or sys.byteorder != "little":
        weights = torch.arange(m, device=mask.device, dtype=torch.int32)
        return (mask.to(torch.int32) << weights).sum(dim=1)
    # Each bool is one byte holding 0 or 1: read a row as integers (byte j at bit 8 j) and
    # fold, halving the gaps each time (bit 8 j lands on bit j); no pass over [K, M].
    words = mask.contiguous().view(_ROW_INTEGERS[m])
    width = min(m, 8)  # bytes per integer
    for shift in (7, 14, 28)[: width.bit_length() - 1]:
        words = words | (words >> shift)
    words = words & (2**width - 1)
    if m == 16:
        return words[:, 0] | (words[:, 1] << 8)
    return words.squeeze(1) if m > 2 else words.squeeze(1).int()


def _sorted_positions(mask: Tensor, count: int) -> Tensor:
    # Kept entries sort first (key 0), in ascending position (stable sort).
    return (~mask).to(torch.uint8).sort(dim=1, stable=True).indices[:, :count]


def kept_indices(code: Tensor, count: int, m: int) -> Tensor:
    """Sorted kept positions ``[K, count]`` (``int64``) of the kept code ``code``."""
    if code.ndim == 2:
        return code.long()
    # index_select, not table[code.long()]: three times faster on the CPU (measured).
    return positions_by_rank(count, m, code.device).index_select(0, code.int())


@lru_cache(maxsize=32)
def _masks_by_rank(count: int, m: int, device: torch.device, pruned: bool) -> Tensor:
    # Row r: the [M] bool mask of the subset of colex rank r (its complement if pruned).
    table = mask_from_indices(positions_by_rank(count, m, torch.device("cpu")), m)
    return (~table if pruned else table).to(device)


def decode_kept(code: Tensor, count: int, m: int, *, pruned: bool = False) -> Tensor:
    """The kept mask (``[K, M]`` bool) of the kept code ``code`` (:func:`encode_kept`):
    ``mask_from_indices(kept_indices(code, count, m), m)``, or its complement (the pruned
    entries) with ``pruned=True``.

    A ranked form is decoded by one row lookup in a table of the ``binom(M, count)`` masks.
    """
    if code.ndim == 2:
        mask = mask_from_indices(code.long(), m)
        return mask.logical_not_() if pruned else mask
    return _masks_by_rank(count, m, code.device, pruned).index_select(0, code.int())


def mask_from_indices(indices: Tensor, m: int) -> Tensor:
    """``[K, M]`` bool mask with the positions ``indices`` (``[K, count]``) set."""
    mask = torch.zeros(indices.shape[0], m, dtype=torch.bool, device=indices.device)
    return mask.scatter_(1, indices, True)


def gather_kept(tensor: Tensor, indices: Tensor, m: int) -> Tensor:
    """The entries of a parameter-shaped ``tensor`` at the kept ``indices``, as a new
    contiguous ``[K, count]`` tensor in block order."""
    blocks = block_view(tensor, m)
    index = indices.view(*blocks.shape[:-1], indices.shape[1])
    return blocks.gather(-1, index).view(indices.shape)


def scatter_kept_(tensor: Tensor, indices: Tensor, values: Tensor, m: int) -> Tensor:
    """Write ``values`` (``[K, count]``) into a parameter-shaped ``tensor`` at the kept
    ``indices``, in place; other entries are untouched. Returns ``tensor``."""
    blocks = block_view(tensor, m)
    index = indices.view(*blocks.shape[:-1], indices.shape[1])
    blocks.scatter_(-1, index, values.view(index.shape))
    return tensor


def remap_kept(
    values: Tensor, old: Tensor, old_count: int, new: Tensor, new_count: int, m: int
) -> Tensor:
    """Per-kept-weight values ``[K, old_count]`` of the kept sets ``old`` moved to the kept sets
    ``new`` (kept codes, :func:`encode_kept`): ``[K, new_count]`` where a weight kept by both
    keeps its value and a newly kept one gets 0.

    .. math::
        v'_{k,i} = v_{k,j} \\text{ if } q_{k,i} = p_{k,j} \\text{ for some } j,
        \\text{ else } 0

    with ``p``, ``q`` the sorted old and new kept positions of block ``k``. Small ranked
    patterns take each block's sources from a table of all pairs of kept sets (no ``[K, M]``
    row); others scatter into a dense row and gather from it.
    """
    k = values.shape[0]
    pairs = math.comb(m, old_count) * math.comb(m, new_count)
    if old.ndim == 1 and new.ndim == 1 and pairs <= MAX_PAIR_TABLE:
        table = _sources_by_pair(old_count, new_count, m, values.device)
        # Pair index old * binom(M, new) + new: exact in int32 (at most MAX_PAIR_TABLE).
        pair = torch.add(new.int(), old.int(), alpha=math.comb(m, new_count))
        padded = torch.cat([values, values.new_zeros(k, 1)], dim=1)  # column old_count: 0
        return padded.gather(1, table.index_select(0, pair))
    old_positions = kept_indices(old, old_count, m)
    new_positions = kept_indices(new, new_count, m)
    dense = values.new_zeros(k, m).scatter_(1, old_positions, values)
    return dense.gather(1, new_positions)


@lru_cache(maxsize=32)
def _sources_by_pair(old_count: int, new_count: int, m: int, device: torch.device) -> Tensor:
    # Row (a * binom(M, new_count) + b): for each new kept position of rank b, its index among
    # the old kept positions of rank a, or old_count where it was not kept. Cached.
    cpu = torch.device("cpu")
    old_mask = mask_from_indices(positions_by_rank(old_count, m, cpu), m)  # [Co, M]
    index = (old_mask.cumsum(dim=1) - 1).masked_fill_(~old_mask, old_count)  # [Co, M]
    new_positions = positions_by_rank(new_count, m, cpu)  # [Cn, new_count]
    co, cn = old_mask.shape[0], new_positions.shape[0]
    sources = index.unsqueeze(1).expand(co, cn, m).gather(
        2, new_positions.unsqueeze(0).expand(co, cn, new_count)
    )
    return sources.reshape(co * cn, new_count).to(device)
