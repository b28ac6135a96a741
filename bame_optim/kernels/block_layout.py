"""The block layout the native and Triton evolve passes read a parameter through: its
dimensions other than 1 (the blocks' input dimension), in block order, folded into three
strided ones, so that a kernel walks Linear, Conv1d/2d/3d, transposed and channels_last
weights alike without copying them."""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

__all__ = ["OUTER_DIMS", "fold", "folded_layouts"]

OUTER_DIMS = 3
"""Strided dimensions the kernels take besides dimension 1 (``n0`` implied, ``n1``, ``n2``)."""


def folded_layouts(*tensors: Tensor) -> list[list[int]] | None:
    """Per tensor ``[n1, n2, s0, s1, s2, s_in]``: the dimensions other than 1 of tensors of one
    shape, in block order, folded into three strided ones of sizes ``(n0, n1, n2)`` (``n0``
    implied; the same for every tensor) and their strides ``(s0, s1, s2)``, and the stride of
    dimension 1; ``None`` if they do not fold into three. Two dimensions fold where they do in
    every tensor (a channels_last weight with a contiguous gradient folds less)."""
    key = tuple((tuple(t.shape), t.stride()) for t in tensors)
    # torch.compile traces the uncached fold (it warns about a cache wrapper).
    layouts = fold(key) if torch.compiler.is_compiling() else _folded_layouts(key)
    return None if layouts is None else [list(layout) for layout in layouts]


def fold(
    layouts: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...],
) -> list[list[int]] | None:
    """:func:`folded_layouts` of tensors given as ``(shape, strides)``, not cached (what
    ``torch.compile`` traces: it warns about cache wrappers)."""
    shape = layouts[0][0]
    dims = [0, *range(2, len(shape))]
    folded: list[tuple[int, list[int]]] = []  # (size, strides per tensor)
    for d in dims:
        size = shape[d]
        if size == 1:
            continue
        strides = [stride[d] for _, stride in layouts]
        if folded and all(s_outer == size * s for s_outer, s in
                                      zip(folded[-1][1], strides, strict=True)):
            folded[-1] = (folded[-1][0] * size, strides)
        else:
            folded.append((size, strides))
    if len(folded) > OUTER_DIMS:
        return None
    folded = [(1, [0] * len(layouts))] * (OUTER_DIMS - len(folded)) + folded
    return [[folded[1][0], folded[2][0], *(f[1][i] for f in folded), stride[1]]
            for i, (_, stride) in enumerate(layouts)]


_folded_layouts = lru_cache(maxsize=256)(fold)
"""Cached :func:`fold`: every step asks for the same few layouts (callers get copies)."""
