"""One rank of the data-parallel BAMESGD run of ``test_accelerate_multiprocess.py``.

Launched by ``torch.distributed.run --nproc_per_node 2``: ``Accelerator(cpu=True)`` (gloo),
the MLP and data of :func:`build` (shared with the single-process reference of the test),
:class:`~bame_optim.integrations.accelerate.MaskSync` after every step. With
``--corrupt-step T`` rank 1 moves one kept entry of a mask right after the step with counter
``T`` (before the check), so the check must see the mismatch and repair it from rank 0.
Writes ``rank{r}.pt`` with the final masks, weights, step counter, the result of every check
and the warnings raised, into the folder given as first argument.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch
from torch import nn

from bame_optim import BAMESGD, nm_param_groups
from bame_optim.core.kept import encode_kept

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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--corrupt-step", type=int, default=None)
    args = parser.parse_args()

    from accelerate import Accelerator

    from bame_optim.integrations.accelerate import MaskSync

    accelerator = Accelerator(cpu=True)
    model, optimizer, data = build()
    loader = torch.utils.data.DataLoader(data, batch_size=PER_RANK_BATCH, shuffle=False)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    sync = MaskSync(optimizer, accelerator)
    rank = accelerator.process_index
    checks = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            t = optimizer.param_groups[0]["step"] - 1
            if t == args.corrupt_step and rank == 1:
                bame = optimizer.optimizer
                p = bame.param_groups[0]["params"][1]
                mask = bame.kept_mask(p)
                mask[0] = mask[0].roll(1)  # move the kept entries of block 0 (2:4 stays valid)
                bame.state[p]["kept"] = encode_kept(mask, bame.state[p]["kept_count"])
            result = sync.after_step()
            if result is not None:
                checks.append((t, result))
    bame = optimizer.optimizer
    torch.save(
        {
            "masks": masks(bame),
            "weights": {
                k: v.detach().clone()
                for k, v in accelerator.unwrap_model(model).state_dict().items()
            },
            "step": bame.param_groups[0]["step"],
            "checks": checks,
            "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
        },
        args.out / f"rank{rank}.pt",
    )
    accelerator.end_training()


if __name__ == "__main__":
    main()
