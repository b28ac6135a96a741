"""Transposable 2:4 masks: 2 of 4 kept along the rows *and* the columns of every 4x4 tile.

A Linear weight ``W [out, in]`` that is 2:4 along its input dimension runs the forward product
``Y = X Wᵀ`` on 2:4 sparse kernels. The input gradient ``dX = dY W`` multiplies by ``W`` along
its *output* dimension, which is 2:4 only when every 4x4 tile of ``W`` keeps 2 of 4 entries in
each of its rows and in each of its columns (Hubara et al. 2021, "Accelerated Sparse Neural
Training: A Provable and Efficient Method to Find N:M Transposable Masks"). Then both ``W`` and
``Wᵀ`` can be packed for the 2:4 kernels.

There are exactly 90 such 4x4 tile patterns (4x4 0/1 matrices with all row and column sums 2).
:func:`transposable_mask` scores all of them on every tile with one matrix product and keeps
the best one per tile: the exact maximiser of the kept ``sum |W|`` per tile.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

__all__ = [
    "NUM_TRANSPOSABLE_PATTERNS",
    "TILE",
    "TRANSPOSABLE_PATTERNS",
    "is_transposable_24",
    "transposable_mask",
    "transposable_patterns",
]

TILE = 4
"""Side of the square tile; 2:4 keeps ``TILE // 2`` entries per row and column of a tile."""

_CHUNK_TILES = 1 << 16
"""Tiles scored per matrix product (bounds the ``[tiles, 90]`` float64 score buffer to 47 MB)."""


def _enumerate_patterns() -> tuple[tuple[int, ...], ...]:
    """All 4x4 0/1 tiles with two ones in every row and every column, flattened row-major,
    in lexicographic order of the rows' kept column pairs."""
    pairs = list(itertools.combinations(range(TILE), TILE // 2))
    patterns = []
    for rows in itertools.product(pairs, repeat=TILE):
        column_counts = [sum(col in row for row in rows) for col in range(TILE)]
        if all(count == TILE // 2 for count in column_counts):
            patterns.append(tuple(int(col in row) for row in rows for col in range(TILE)))
    return tuple(patterns)


TRANSPOSABLE_PATTERNS: tuple[tuple[int, ...], ...] = _enumerate_patterns()
"""The 90 transposable 2:4 tile patterns (immutable), each 16 flags of a row-major 4x4 tile.
Their order fixes the tie-break of :func:`transposable_mask` (the first best pattern wins)."""

NUM_TRANSPOSABLE_PATTERNS = 90
"""``(4 choose 2)`` row choices with column sums 2: 90 (OEIS A001499, n = 4)."""

if len(TRANSPOSABLE_PATTERNS) != NUM_TRANSPOSABLE_PATTERNS:  # pragma: no cover
    raise RuntimeError("transposable 2:4 pattern enumeration is wrong")


def transposable_patterns(device: torch.device | str | None = None) -> Tensor:
    """The 90 tile patterns as a ``[90, 16]`` bool tensor (row-major 4x4 tiles)."""
    return torch.tensor(TRANSPOSABLE_PATTERNS, dtype=torch.bool, device=device)


def _check_weight(weight: Tensor) -> None:
    if not isinstance(weight, Tensor) or weight.ndim != 2:
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"Invalid weight shape: {shape} (a 2-D [out, in] tensor is required)")
    if not weight.is_floating_point():
        raise ValueError(f"Invalid weight dtype: {weight.dtype} (a floating dtype is required)")
    rows, cols = weight.shape
    if rows % TILE or cols % TILE:
        raise ValueError(
            f"Invalid weight shape: {tuple(weight.shape)} (both dimensions must be divisible "
            f"by {TILE} for 4x4 tiles)"
        )


def _to_tiles(tensor: Tensor) -> Tensor:
    """``[R, C]`` -> ``[R/4 * C/4, 16]``: tiles in row-major order, each flattened row-major."""
    rows, cols = tensor.shape
    tiles = tensor.reshape(rows // TILE, TILE, cols // TILE, TILE).permute(0, 2, 1, 3)
    return tiles.reshape(-1, TILE * TILE)


def _from_tiles(tiles: Tensor, shape: torch.Size) -> Tensor:
    """Inverse of :func:`_to_tiles`."""
    rows, cols = shape
    grid = tiles.reshape(rows // TILE, cols // TILE, TILE, TILE).permute(0, 2, 1, 3)
    return grid.reshape(rows, cols)


def transposable_mask(weight: Tensor) -> Tensor:
    r"""The transposable 2:4 mask of largest kept magnitude, tile by tile.

    For every 4x4 tile :math:`T` of ``weight`` (tiles aligned at multiples of 4), with
    :math:`P_1 .. P_{90}` the transposable tile patterns,

    .. math::
        k^\star = \operatorname{argmax}_k \sum_{ij} (P_k)_{ij} |T_{ij}|,
        \qquad \text{mask}(T) = P_{k^\star}.

    All tiles are scored by one product ``|tiles| @ Pᵀ`` (``[tiles, 16] x [16, 90]``, in
    chunks), then ``argmax`` picks the pattern: exact, no loop over tiles.

    .. note::
        Scores are summed in float64 (exact for float16/bfloat16 weights, and free of TF32
        matmul rounding on CUDA). Ties go to the first pattern in
        :data:`TRANSPOSABLE_PATTERNS` (``argmax`` returns the first maximum), so the mask is
        deterministic. A 2:4 weight may lose some of its kept entries: the best transposable
        pattern need not contain the row-wise top-2.

    Args:
        weight: ``[out, in]`` floating tensor, both dimensions divisible by 4.

    Returns:
        ``[out, in]`` bool mask, 2 of 4 set along every row and every column of each tile.
    """
    _check_weight(weight)
    tiles = _to_tiles(weight.detach()).abs().to(torch.float64)
    patterns = transposable_patterns(weight.device)
    scoring = patterns.to(torch.float64).T
    best = torch.cat([chunk @ scoring for chunk in tiles.split(_CHUNK_TILES)]).argmax(dim=1)
    return _from_tiles(patterns[best], weight.shape)


def is_transposable_24(weight: Tensor) -> bool:
    """``True`` when every row and every column of each 4x4 tile of ``weight`` has at most
    2 non-zero entries (so ``weight`` and ``weight.T`` are both 2:4 along their rows)."""
    _check_weight(weight)
    nonzero = (_to_tiles(weight.detach()) != 0).reshape(-1, TILE, TILE)
    half = TILE // 2
    return bool(nonzero.sum(dim=2).le(half).all() and nonzero.sum(dim=1).le(half).all())
