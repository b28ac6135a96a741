"""N:M block layout, top-n masks and validity checks: pure functions of tensors.

A weight ``W`` is cut into ``K`` blocks of ``M`` consecutive weights along its *grouped*
dimension (DESIGN.md section 2), giving the block view ``[K, M]`` used by the paper (Eq. 1):

* Linear ``[out, in]``: each row is cut into ``in / M`` blocks of consecutive input weights.
* ConvNd ``[out, in, *k]``: blocks run along the input channels for each (out, kernel
  position), i.e. ``W`` is viewed as ``[out, *k, in]`` and rows of ``in`` are cut into blocks.

Both rules are one rule: move dimension 1 last, then cut the last dimension into blocks.
Masks are ``bool`` tensors in the block view; :func:`blocks_to_param` turns a block tensor
back into the parameter's layout (a view when it can be one).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "block_view",
    "blocks_to_param",
    "check_nm",
    "grouped_dim",
    "is_nm_sparse",
    "num_blocks",
    "param_to_blocks",
    "random_nm_mask",
    "top_n_mask",
]

GROUPED_DIM = 1
"""The dimension cut into blocks: ``in`` of Linear ``[out, in]`` and ConvNd ``[out, in, *k]``."""


def check_nm(n: int, m: int) -> None:
    """Raise ``ValueError`` unless ``1 <= n < m`` are integers."""
    if isinstance(m, bool) or not isinstance(m, int) or m < 2:
        raise ValueError(f"Invalid m value: {m!r} (an integer >= 2 is required)")
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n < m:
        raise ValueError(f"Invalid n value: {n!r} (an integer with 1 <= n < m={m} is required)")


def grouped_dim(shape: torch.Size | tuple[int, ...]) -> int:
    """Size of the dimension cut into blocks (dimension 1); ``shape`` needs ``ndim >= 2``."""
    if len(shape) < 2:
        raise ValueError(f"Invalid shape {tuple(shape)}: N:M blocks need a tensor with ndim >= 2")
    return shape[GROUPED_DIM]


def num_blocks(shape: torch.Size | tuple[int, ...], m: int) -> int:
    """Number of blocks ``K`` of a tensor of ``shape`` cut into blocks of ``m``."""
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"Invalid m value: {m!r} (a positive integer is required)")
    size = grouped_dim(shape)
    if size % m:
        raise ValueError(
            f"Invalid shape {tuple(shape)} for m={m}: the grouped dimension (dim 1, size {size}) "
            f"is not divisible by m"
        )
    return torch.Size(shape).numel() // m


def param_to_blocks(tensor: Tensor, m: int) -> Tensor:
    """Block view ``[K, M]`` of a parameter-shaped tensor (a view for Linear weights, a copy
    for convolution weights, whose blocks are not contiguous in memory)."""
    num_blocks(tensor.shape, m)
    return tensor.movedim(GROUPED_DIM, -1).reshape(-1, m)


def block_view(tensor: Tensor, m: int) -> Tensor:
    """The blocks of a parameter-shaped tensor as a *view* ``[out, *k, in / M, M]``, whatever
    its strides: the same blocks in the same order as :func:`param_to_blocks` (flattening the
    leading dimensions gives ``[K, M]``), but writes through it reach ``tensor``."""
    num_blocks(tensor.shape, m)
    return tensor.movedim(GROUPED_DIM, -1).unflatten(-1, (-1, m))


def blocks_to_param(blocks: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """Inverse of :func:`param_to_blocks`: a view of ``blocks`` in the layout ``shape``."""
    shape = torch.Size(shape)
    moved = (shape[0], *shape[2:], shape[GROUPED_DIM])
    return blocks.reshape(moved).movedim(-1, GROUPED_DIM)


def top_n_mask(scores: Tensor, n: int, prefer: Tensor | None = None) -> Tensor:
    """Keep the ``n`` largest ``scores`` of each block (each row of ``[K, M]``).

    Ties are broken deterministically, so every rank and every run get the same mask:
    among equal scores an entry with ``prefer`` set wins (the currently kept weight, DESIGN.md
    section 4 step 2), and then the lower index within the block wins.

    Args:
        scores: ``[K, M]`` floating scores; larger is more important. ``-inf`` is never kept
            while finite entries remain.
        n: entries to keep per block, ``0 <= n <= M``.
        prefer: optional ``[K, M]`` bool; wins ties.

    Returns:
        ``[K, M]`` bool mask with exactly ``n`` entries set in every block.
    """
    if scores.ndim != 2:
        raise ValueError(f"Invalid scores shape {tuple(scores.shape)}: expected [K, M]")
    m = scores.shape[1]
    if not 0 <= n <= m:
        raise ValueError(f"Invalid n value: {n} (0 <= n <= M={m} is required)")
    if prefer is None:
        order = scores.sort(dim=1, descending=True, stable=True).indices
    else:
        # Two stable sorts give the lexicographic order (score desc, preferred first, index).
        first = (~prefer).to(torch.uint8).sort(dim=1, stable=True).indices
        by_score = scores.gather(1, first).sort(dim=1, descending=True, stable=True).indices
        order = first.gather(1, by_score)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    return mask.scatter_(1, order[:, :n], True)


def random_nm_mask(
    k: int, n: int, m: int, generator: torch.Generator, device: torch.device | str = "cpu"
) -> Tensor:
    """A uniformly random N:M mask ``[K, M]`` drawn on the CPU from ``generator`` (so the same
    seed gives the same mask on every device and rank), then moved to ``device``."""
    check_nm(n, m)
    scores = torch.rand(k, m, generator=generator)
    return top_n_mask(scores, n).to(device)


def is_nm_sparse(tensor: Tensor, n: int, m: int) -> bool:
    """``True`` when every block of ``tensor`` has at most ``n`` non-zero entries."""
    return bool((param_to_blocks(tensor, m) != 0).sum(dim=1).le(n).all())
