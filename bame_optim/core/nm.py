"""N:M block layout, top-n masks and validity checks: pure functions of tensors.

A weight ``W`` is cut into ``K`` blocks of ``M`` consecutive weights along its *grouped*
dimension (docs/design.md section 1), giving the block view ``[K, M]`` used by the paper (Eq. 1):

* Linear ``[out, in]``: each row is cut into ``in / M`` blocks of consecutive input weights.
* ConvNd ``[out, in, *k]``: blocks run along the input channels for each (out, kernel
  position), i.e. ``W`` is viewed as ``[out, *k, in]`` and rows of ``in`` are cut into blocks.

Both rules are one rule: move dimension 1 last, then cut the last dimension into blocks.
A weight stored ``[in, out]`` (Hugging Face ``Conv1D``, e.g. GPT-2's projections) has its input
dimension at 0: its param group says so with ``"nm_dim": 0``, and every function here sees it
through :func:`nm_layout` (the transposed *view* ``[out, in]``), so the blocks still run along
the input dimension and every write through the view reaches the weight.
Masks are ``bool`` tensors in the block view; :func:`blocks_to_param` turns a block tensor
back into the parameter's layout (a view when it can be one).
"""

from __future__ import annotations

import math
import sys

import torch
from torch import Tensor

__all__ = [
    "block_view",
    "blocks_to_param",
    "check_nm",
    "grouped_dim",
    "is_nm_sparse",
    "nm_layout",
    "num_blocks",
    "param_to_blocks",
    "random_nm_mask",
    "select",
    "top_n_mask",
    "top_n_mask_",
]

GROUPED_DIM = 1
"""The dimension cut into blocks: ``in`` of Linear ``[out, in]`` and ConvNd ``[out, in, *k]``."""


NM_DIMS = (0, 1)
"""The dimensions a weight's input (blocked) dimension may be at: 1 for ``nn.Linear``
``[out, in]`` and ``ConvNd`` ``[out, in, *k]``, 0 for a 2-D ``[in, out]`` weight (HF
``Conv1D``)."""


def nm_layout(tensor: Tensor, nm_dim: int = GROUPED_DIM) -> Tensor:
    """``tensor`` with its input dimension at 1, the layout every function of this module
    takes: ``tensor`` itself when ``nm_dim == 1``, the transposed view ``tensor.t()`` of a 2-D
    ``[in, out]`` tensor when ``nm_dim == 0`` (its own inverse: ``nm_layout(nm_layout(t, 0),
    0)`` is ``t``'s layout again)."""
    if nm_dim == GROUPED_DIM:
        return tensor
    if nm_dim != 0 or tensor.ndim != 2:
        raise ValueError(
            f"Invalid nm_dim value: {nm_dim!r} for a tensor of shape {tuple(tensor.shape)} "
            "(1, or 0 for a 2-D [in, out] weight)"
        )
    return tensor.t()


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
    among equal scores an entry with ``prefer`` set wins (the currently kept weight, docs/design.md
    section 3, step 2), and then the lower index within the block wins. The mask is the first
    ``n`` of each block in the lexicographic order (score descending, preferred first, index),
    where scores compare as ``torch.sort`` compares them: ``-0.0 == 0.0``, NaN above ``+inf``
    and all NaNs equal.

    Args:
        scores: ``[K, M]`` floating scores; larger is more important. ``-inf`` is never kept
            while finite entries remain.
        n: entries to keep per block, ``0 <= n <= M``.
        prefer: optional ``[K, M]`` bool; wins ties.

    Returns:
        ``[K, M]`` bool mask with exactly ``n`` entries set in every block.

    .. note:: No sort: ``min(n, M - n)`` rounds each pick one winner (or, when ``n > M / 2``,
       one loser) per block with a row max (min) of the scores, then, among the entries equal
       to it, the row max of a small integer tie code (:func:`_tie_code`) that is unique
       within a block. A few passes over ``[K, M]`` per round, against two stable sorts of
       tiny rows before. Scores with a NaN cost a device sync (the check) and one more pass.
    """
    return _top_n(scores, n, prefer, scratch=False)


def top_n_mask_(scores: Tensor, n: int, prefer: Tensor | None = None) -> Tensor:
    """:func:`top_n_mask`, using ``scores`` as scratch space: its values are unspecified
    afterwards. For scores the caller computed only for this call (saves a copy)."""
    return _top_n(scores, n, prefer, scratch=True)


def _top_n(scores: Tensor, n: int, prefer: Tensor | None, scratch: bool) -> Tensor:
    if scores.ndim != 2:
        raise ValueError(f"Invalid scores shape {tuple(scores.shape)}: expected [K, M]")
    m = scores.shape[1]
    if not 0 <= n <= m:
        raise ValueError(f"Invalid n value: {n} (0 <= n <= M={m} is required)")
    top = 2 * n <= m  # pick the n winners, or the m - n losers: whichever takes fewer rounds
    rounds = n if top else m - n
    if rounds == 0:
        return torch.full(scores.shape, not top, dtype=torch.bool, device=scores.device)
    best_of = torch.amax if top else torch.amin
    code = _tie_code(prefer, m, top, scores.device)
    best = best_of(scores, dim=1, keepdim=True)
    if scores.is_floating_point() and bool(best.isnan().any()):
        # NaN sorts above +inf and NaNs tie: compare them as +inf, the tie code ranks them above.
        nan = scores.isnan()
        scores, scratch = scores.masked_fill(nan, math.inf), True
        code = code + (nan if top else ~nan).to(code.dtype) * (2 * m)
        best = best_of(scores, dim=1, keepdim=True)
    removed = _extreme(scores.dtype, low=top)
    hit = torch.empty(scores.shape, dtype=torch.bool, device=scores.device)
    tied = torch.empty(scores.shape, dtype=code.dtype, device=scores.device)
    chosen = None
    for round_ in range(rounds):
        if round_:
            best = best_of(scores, dim=1, keepdim=True)
        # The code at the best score, 0 elsewhere and at entries already chosen; codes are
        # unique within a block, so the row max of tied marks one entry per block.
        torch.mul(code, _as_integers(torch.eq(scores, best, out=hit), code), out=tied)
        pick = tied == _repeat_rows(tied.amax(dim=1), m)
        chosen = pick if chosen is None else chosen.logical_or_(pick)
        if round_ + 1 < rounds:
            if scratch:
                scores.masked_fill_(pick, removed)
            else:
                scores, scratch = scores.masked_fill(pick, removed), True
            # code * ~pick: masked_fill is several times slower on small integers
            unpicked = _as_integers(pick.logical_not(), code)
            code = code.mul_(unpicked) if code.shape == pick.shape else code * unpicked
    return chosen if top else chosen.logical_not_()


def _as_integers(mask: Tensor, like: Tensor) -> Tensor:
    # A bool mask as 0 / 1 of like's dtype without a copy where that is one byte (mixed
    # dtypes would make torch convert the mask first).
    return mask.view(like.dtype) if like.element_size() == 1 else mask


def _tie_code(prefer: Tensor | None, m: int, top: bool, device: torch.device) -> Tensor:
    """Positive integer codes ``[K or 1, M]``, unique within a block, larger first among equal
    scores: for winners (``top``) preferred then lower index; for losers the reverse (not
    preferred, then higher index). Values stay below ``2 M`` (``4 M`` with the NaN tier).
    With ``prefer`` the codes are a new ``[K, M]`` tensor, which the caller may write."""
    dtype = torch.int8 if 4 * m < 2**7 else torch.int16 if 4 * m < 2**15 else torch.int64
    index = torch.arange(m, device=device, dtype=dtype)
    code = m - index if top else index + 1
    if prefer is None:
        return code.unsqueeze(0)
    flags = prefer if top else ~prefer
    tiers = flags.view(dtype) * m if dtype == torch.int8 else flags.to(dtype).mul_(m)
    return _add_row_(tiers, code)


_WORDS = {2: torch.int16, 4: torch.int32, 8: torch.int64}
"""The integer one row of ``M`` bytes is read as by :func:`_repeat_rows` and
:func:`_add_row_`."""


def _repeat_rows(values: Tensor, m: int) -> Tensor:
    """``[K]`` values in ``[0, 127]`` (bool or int8) as a new contiguous ``[K, M]``, each value
    in every entry of its row.

    .. note:: Where a row is one integer (``M`` of 2, 4 or 8 bytes, on the CPU) it is
       ``value * 0x0101...`` on ``[K]``: broadcasting over a last dimension this small runs
       an inner loop of ``M`` per row on the CPU, many times slower. No carry can occur (each
       byte of the product is one value below 128).
    """
    word = _WORDS.get(m) if values.element_size() == 1 and values.is_cpu else None
    if word is None:
        return values.unsqueeze(1).expand(-1, m).contiguous()
    ones = int.from_bytes(b"\x01" * m, "little")  # the same in either byte order
    return (values.to(word) * ones).view(values.dtype).view(-1, m)


def _add_row_(tensor: Tensor, row: Tensor) -> Tensor:
    """``tensor += row`` in place for a contiguous ``[K, M]`` of one-byte integers and a row
    ``[M]`` whose sums stay in ``[0, 127]``; one integer add per row where a row is one integer
    (as :func:`_repeat_rows`). Returns ``tensor``."""
    m = tensor.shape[1]
    word = _WORDS.get(m) if tensor.is_cpu and sys.byteorder == "little" else None
    if word is None or tensor.element_size() != 1 or not tensor.is_contiguous():
        return tensor.add_(row)
    tensor.view(word).add_(int.from_bytes(bytes(row.tolist()), "little"))
    return tensor


def _extreme(dtype: torch.dtype, low: bool) -> float | int:
    """A value no score is below (``low``) or above: ``-inf`` / ``+inf`` or the integer bound."""
    if dtype.is_floating_point:
        return -math.inf if low else math.inf
    info = torch.iinfo(dtype)
    return info.min if low else info.max


_INTS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def select(condition: Tensor, a: Tensor, b: Tensor, *, into_a: bool = False) -> Tensor:
    """``torch.where(condition, a, b)``, equal to it bit for bit; with ``into_a`` the result
    may be written into ``a`` (a scratch tensor of the caller's) and returned.

    .. note:: On the CPU ``torch.where`` is not vectorised (for floating types too); for
       ``a``, ``b`` of one shape and dtype and ``condition`` of their shape (or one flag per
       row, ``[K, 1]`` for ``[K, M]``) this computes ``b ^ ((a ^ b) & -condition)`` on the
       bits, as integers of the element size: a few vectorised passes, about three times
       faster. Elsewhere it is ``torch.where``.
    """
    rows = a.ndim == 2 and condition.shape == (a.shape[0], 1) and a.shape[1] != 1
    if rows and condition.dtype == torch.bool:
        condition = _repeat_rows(condition.squeeze(1), a.shape[1])
    word = _INTS.get(a.element_size())
    if (
        word is None or not a.is_cpu or a.dtype != b.dtype or a.is_complex()
        or not a.shape == b.shape == condition.shape or condition.dtype != torch.bool
    ):
        return torch.where(condition, a, b)
    ones = condition.to(word).neg_()  # all bits set where condition holds
    bits, other = a.view(word), b.view(word)
    bits = bits.bitwise_xor_(other) if into_a else torch.bitwise_xor(bits, other)
    return bits.bitwise_and_(ones).bitwise_xor_(other).view(a.dtype)


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
