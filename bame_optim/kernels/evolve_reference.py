"""The evolve passes of :mod:`bame_optim.kernels.evolve_cpu` and
:mod:`bame_optim.kernels.triton_evolve` composed of the eager core functions: the reference they
equal bit for bit (any device, dtype and layout), and the fallback of the ``bame_optim::``
evolve ops where no kernel runs.

:func:`evolve_blocks_eager` is what :func:`bame_optim.core.evolution.evolve_mask` computes
before OBF (with :meth:`bame_optim.optim.engine.NMEngine.zero_pruned_` first);
:func:`apply_evolved_eager` what :meth:`bame_optim.optim.engine.NMEngine.apply_mask` does with
an unchanged count.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bame_optim.core.evolution import block_norms, lma_scores, sad, update_oscillation
from bame_optim.core.kept import decode_kept, encode_kept, remap_kept
from bame_optim.core.nm import blocks_to_param, param_to_blocks, select, top_n_mask_

__all__ = ["apply_evolved_eager", "evolve_blocks_eager"]


def evolve_blocks_eager(
    weight: Tensor,
    grad: Tensor,
    kept: Tensor,
    count: int,
    oscillation: Tensor | None,
    *,
    n: int,
    m: int,
    lr: float,
    gamma: float,
    revive: str = "sgd",
    zero_pruned: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`bame_optim.kernels.evolve_cpu.evolve_blocks` composed of the core functions (any
    device, dtype and layout)."""
    if zero_pruned:
        pruned = decode_kept(kept, count, m, pruned=True)
        weight.masked_fill_(blocks_to_param(pruned, weight.shape), 0)
    w, g = param_to_blocks(weight, m), param_to_blocks(grad, m)
    mask = decode_kept(kept, count, m)
    proposed = top_n_mask_(lma_scores(w, g, mask, lr, revive=revive), n, prefer=mask)
    if oscillation is None:
        oscillation = torch.zeros(mask.shape[0], dtype=w.dtype, device=w.device)
    new_oscillation = update_oscillation(oscillation, sad(mask, proposed), gamma)
    return encode_kept(proposed, n), new_oscillation, block_norms(w)


def apply_evolved_eager(
    weight: Tensor,
    buffers: list[Tensor],
    kept: Tensor,
    count: int,
    proposed: Tensor,
    frozen: Tensor,
    m: int,
) -> tuple[Tensor, Tensor]:
    """:func:`bame_optim.kernels.evolve_cpu.apply_evolved_` composed of the core functions, as
    :meth:`bame_optim.optim.engine.NMEngine.apply_mask` does it (the flips as an int64 scalar
    tensor)."""
    old = decode_kept(kept, count, m)
    new = select(frozen.unsqueeze(1), old, decode_kept(proposed, count, m))
    new_kept = encode_kept(new, count)
    changed = old != new
    weight.masked_fill_(blocks_to_param(old.logical_and(changed), weight.shape), 0)
    for buffer in buffers:
        buffer.copy_(remap_kept(buffer, kept, count, new_kept, count, m))
    return new_kept, torch.count_nonzero(changed)
