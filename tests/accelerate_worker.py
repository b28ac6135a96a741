"""One rank of the data-parallel BAMESGD run of ``test_accelerate_multiprocess.py``.

Launched by ``torch.distributed.run --nproc_per_node 2``: ``Accelerator(cpu=True)`` (gloo),
the MLP and data of :func:`build` (shared with the single-process reference of the test),
:class:`~bame_apps.integrations.accelerate.MaskSync` after every step. With
``--corrupt-step T`` rank 1, right after the step with counter ``T`` (before the check),
swaps the kept set of one block of ``2.weight`` between ``{0, 3}`` and ``{1, 2}`` (through the
optimizer's engine, which also zeroes the newly pruned weights): the swap that the former
checksum (sum of kept positions) missed. The check must see it and repair it from rank 0.
Writes ``rank{r}.pt`` into the folder given as first argument: the final masks, weights,
optimizer state and step counter, the swap made, the masks, weights and optimizer state
right after the check at ``T``, the result of every check and the warnings raised.
"""

from __future__ import annotations

import argparse
import copy
import warnings
from pathlib import Path

import torch
from torch import nn

from bame_optim import BAMESGD, nm_param_groups
from tests.torchrun import exit_worker

STEPS = 40
PER_RANK_BATCH = 8
WORLD = 2
SCHEDULE = {"delta_t": 3, "t_i": 6, "t_f": 30, "total_steps": STEPS}
HYPER = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}


def build() -> tuple[nn.Module, BAMESGD, torch.utils.data.TensorDataset]:
    """The seeded model (every Linear 2:4 sparse), its optimizer and the dataset."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
    )
    optimizer = BAMESGD(nm_param_groups(model, n=2, m=4, exclude=()), **HYPER, **SCHEDULE)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS * WORLD * PER_RANK_BATCH, 16, generator=gen)
    y = (x[:, :4].argmax(1) + (x[:, 4] > 1).long()) % 4
    return model, optimizer, torch.utils.data.TensorDataset(x, y)


def masks(optimizer: BAMESGD) -> dict[str, torch.Tensor]:
    """Masks by parameter name."""
    group = optimizer.param_groups[0]
    return {
        name: optimizer.kept_mask(p)
        for name, p in zip(group["param_names"], group["params"], strict=True)
    }


def swap_0_3_with_1_2(optimizer: BAMESGD, p: torch.Tensor) -> tuple[int, list[bool]]:
    """Swap the kept set of the first block of ``p`` holding ``{0, 3}`` or ``{1, 2}`` (2:4)
    for the other one; returns the block and its new kept set."""
    pair = torch.tensor([[True, False, False, True], [False, True, True, False]])
    mask = optimizer.kept_mask(p)
    block = next(k for k in range(mask.shape[0]) if (mask[k] == pair).all(1).any())
    mask[block] = pair[1] if torch.equal(mask[block], pair[0]) else pair[0]
    group = optimizer.param_groups[0]
    state = optimizer.state[p]
    with torch.no_grad():
        optimizer.engine.apply_mask(p, state, mask, state["kept_count"], group["m"])
    return block, mask[block].tolist()


def snapshot(optimizer: BAMESGD, model: nn.Module) -> dict:
    """Masks, weights and optimizer state, copied."""
    return {
        "masks": masks(optimizer),
        "weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "optimizer": copy.deepcopy(optimizer.state_dict()),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--corrupt-step", type=int, default=None)
    args = parser.parse_args()

    from accelerate import Accelerator

    from bame_apps.integrations.accelerate import MaskSync

    accelerator = Accelerator(cpu=True)
    model, optimizer, data = build()
    loader = torch.utils.data.DataLoader(data, batch_size=PER_RANK_BATCH, shuffle=False)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    sync = MaskSync(optimizer, accelerator)
    rank = accelerator.process_index
    checks, swap, repaired = [], None, None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            t = optimizer.param_groups[0]["step"] - 1
            bame = optimizer.optimizer
            if t == args.corrupt_step and rank == 1:
                swap = swap_0_3_with_1_2(bame, bame.param_groups[0]["params"][1])
            result = sync.after_step()
            if result is not None:
                checks.append((t, result))
            if t == args.corrupt_step:
                repaired = snapshot(bame, accelerator.unwrap_model(model))
    bame = optimizer.optimizer
    torch.save(
        {
            **snapshot(bame, accelerator.unwrap_model(model)),
            "swap": swap,
            "repaired": repaired,
            "rank": rank,
            "step": bame.param_groups[0]["step"],
            "checks": checks,
            "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
        },
        args.out / f"rank{rank}.pt",
    )
    accelerator.wait_for_everyone()  # no rank tears the group down mid-collective
    accelerator.end_training()


if __name__ == "__main__":
    main()
    exit_worker()
