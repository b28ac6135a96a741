"""One rank of ``test_training_launch.py``'s two-process check of the training loop's
per-epoch sums (:func:`bame_apps.integrations.training.loop.batch_sums`).

Launched by ``torch.distributed.run --nproc_per_node 2``: ``Accelerator(cpu=True)`` (gloo).
For each dataset size in :data:`SIZES` it iterates a prepared loader of :data:`BATCH` samples
per process over an :class:`~bame_apps.integrations.training.EpochSampler` (as the loop does;
Accelerate pads the last round with samples from the epoch's start) and sums, per process and
then over processes, ``batch_sums`` and the naive ``[loss * len(y), hits, len(y)]``. The
"model" predicts ``index % 3`` for even indices and ``(index + 1) % 3`` for odd ones, against
labels ``index % 3``, so only even indices are hits. Writes ``rank{r}.pt`` into the folder
given as first argument: ``{size: (sums, naive)}``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from bame_apps.integrations.training import EpochSampler
from bame_apps.integrations.training.loop import batch_sums

SIZES = (10, 6, 3, 16)
BATCH = 4
CLASSES = 3


def logits_of(index: torch.Tensor) -> torch.Tensor:
    """Confident logits of the prediction described in the module docstring."""
    predicted = torch.where(index % 2 == 0, index % CLASSES, (index + 1) % CLASSES)
    return 4.0 * F.one_hot(predicted, CLASSES).double() + 0.1 * index[:, None].double()


def main() -> None:
    out = Path(sys.argv[1])
    accelerator = Accelerator(cpu=True)
    results = {}
    for size in SIZES:
        index = torch.arange(size)
        data = TensorDataset(index, index % CLASSES)
        loader = accelerator.prepare(
            DataLoader(data, batch_size=BATCH, sampler=EpochSampler(size, seed=1))
        )
        sums = torch.zeros(3, dtype=torch.float64)
        naive = torch.zeros(3, dtype=torch.float64)
        for x, y in loader:
            logits = logits_of(x)
            loss = F.cross_entropy(logits, y, label_smoothing=0.1)
            sums += batch_sums(accelerator, loss, logits, y, label_smoothing=0.1)
            naive += torch.stack(
                [
                    loss.double() * len(y),
                    (logits.argmax(1) == y).sum().double(),
                    torch.tensor(len(y)),
                ]
            )
        results[size] = (accelerator.reduce(sums, "sum"), accelerator.reduce(naive, "sum"))
    torch.save(results, out / f"rank{accelerator.process_index}.pt")
    accelerator.end_training()


if __name__ == "__main__":
    main()
