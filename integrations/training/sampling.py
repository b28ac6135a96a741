"""The reproducible data order of a training run: :func:`epoch_seed` and :class:`EpochSampler`.

The training order of epoch ``e`` is a permutation drawn from a generator seeded with
``(seed, e)``, and the loop re-seeds the global RNGs (augmentation, worker seeds, dropout) from
``(seed, e, rank)`` at the start of every epoch, so a run resumed at an epoch boundary computes
exactly what the uninterrupted run computes.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

__all__ = ["EpochSampler", "epoch_seed"]


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of the global RNGs during ``epoch`` (distinct per epoch, below 2**31; the
    process index is added by ``set_seed(..., device_specific=True)``)."""
    return (seed * 1_000_003 + 7919 * (epoch + 1)) % (2**31 - 1024)


class EpochSampler(Sampler[int]):
    """A random permutation of ``range(size)`` that depends only on ``(seed, epoch)``.

    Call :meth:`set_epoch` before iterating (``DataLoaderShard.set_epoch`` forwards it). The
    order does not depend on any RNG state, so a resumed run sees the same order. It has no
    ``generator`` attribute on purpose: Accelerate then leaves it alone, and every process
    draws the same permutation (Accelerate's ``BatchSamplerShard`` splits the batches).
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch``."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size
