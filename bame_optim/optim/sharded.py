"""Parameters sharded by FSDP2: ``DTensor`` rows, local N:M math, state as ``DTensor``.

``fully_shard`` splits every parameter along dimension 0 (``Shard(0)``, the rows of
``torch.chunk``), and may replicate it along other mesh dimensions (HSDP). N:M blocks run
along dimension 1, so every block lies inside one shard and the N:M math runs on
``to_local()`` with no communication. Two things need the whole parameter, and gather only
one number per block: the random start mask (drawn for all blocks from the seeded generator,
then sliced) and OBF's ranking of blocks (Eq. 10 ranks all ``K`` blocks of a parameter).

The optimizer's per-block state of a sharded parameter is a ``DTensor`` with the parameter's
mesh and placements, stored in *row layout* ``[rows, blocks_per_row, *rest]``: its dimension
0 is the parameter's, so ``Shard(0)`` cuts it exactly where it cuts the parameter (a
``[K, ...]`` tensor would be cut elsewhere when the rows do not divide evenly), and
``torch.distributed.checkpoint`` saves and reloads it like any sharded optimizer state.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = [
    "PLAIN_TYPES",
    "block_range",
    "check_row_sharded",
    "distribute_state",
    "gather_blocks",
    "is_sharded",
    "local_state",
    "local_tensor",
]


def _dtensor_type() -> type | None:
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


PLAIN_TYPES = (Tensor, torch.nn.Parameter)
"""The tensor types that are never sharded (``type(t) in PLAIN_TYPES``: a fast test)."""


def is_sharded(tensor: Any) -> bool:
    """``True`` for a ``DTensor`` (a parameter or state of a ``fully_shard``-ed module)."""
    if type(tensor) in PLAIN_TYPES:  # the usual case, without looking DTensor up
        return False
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


def local_tensor(tensor: Tensor) -> Tensor:
    """This rank's part: ``to_local()`` of a ``DTensor`` (a view), else ``tensor`` itself."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def local_state(state: Tensor) -> Tensor:
    """This rank's ``[K_local, *rest]`` view of per-block state made by
    :func:`distribute_state` (row layout), else ``state`` itself."""
    return state.to_local().flatten(0, 1) if is_sharded(state) else state


def check_row_sharded(p: Tensor) -> None:
    """Raise ``ValueError`` unless ``p`` is sharded along dimension 0 only (``Shard(0)``
    and ``Replicate`` placements), so that its N:M blocks are whole on every rank."""
    from torch.distributed.tensor import Replicate, Shard

    for placement in p.placements:
        if not (isinstance(placement, Replicate) or placement == Shard(0)):
            raise ValueError(
                f"Invalid sparse parameter placements {tuple(p.placements)} (shape "
                f"{tuple(p.shape)}): N:M blocks need Shard(0) or Replicate"
            )


def _row_range(p: Tensor) -> tuple[int, int]:
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return offset[0], shape[0]


def _blocks_per_row(p: Tensor, m: int) -> int:
    return p.numel() // (p.shape[0] * m) if p.numel() else 0


def block_range(p: Tensor, m: int) -> tuple[int, int]:
    """``(first, count)``: this rank's blocks among the ``K`` blocks of ``p`` (block order of
    :mod:`bame_optim.core.nm`); ``(0, K)`` for an ordinary tensor."""
    if not is_sharded(p):
        return 0, p.numel() // m
    first_row, rows = _row_range(p)
    per_row = _blocks_per_row(p, m)
    return first_row * per_row, rows * per_row


def distribute_state(local: Tensor, p: Tensor, m: int) -> Tensor:
    """Per-block state ``[K_local, *rest]`` of sharded ``p`` as a ``DTensor`` in row layout
    with ``p``'s mesh and placements (identity for an ordinary ``p``)."""
    if not is_sharded(p):
        return local
    from torch.distributed.tensor import DTensor

    per_row = _blocks_per_row(p, m)
    rest = tuple(local.shape[1:])
    rows = local.reshape(-1, per_row, *rest)
    shape = torch.Size((p.shape[0], per_row, *rest))
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(
        rows, p.device_mesh, p.placements, run_check=False, shape=shape, stride=stride
    )


def gather_blocks(local: Tensor, p: Tensor, m: int) -> Tensor:
    """All ``K`` values of a per-block quantity ``[K_local]`` of sharded ``p``, on every rank
    (one all-gather of ``K`` numbers)."""
    if not is_sharded(p):
        return local
    return distribute_state(local, p, m).full_tensor().flatten()
