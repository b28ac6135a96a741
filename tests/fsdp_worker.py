"""One rank of the FSDP2 test (run by ``torchrun --nproc_per_node 2``; see test_fsdp.py).

Trains a small MLP whose two sparse Linear layers are ``fully_shard``-ed (one of them with an
odd row count, so the shards are uneven) with BAMESGD through the gradual, ``t_i``, evolve and
frozen phases; every rank gets its half of the same global batch. At ``SAVE_AT`` it saves model
and optimizer with ``torch.distributed.checkpoint``; after the run it loads that checkpoint
into a fresh model and optimizer and trains the remaining steps again. Writes ``rank{r}.pt``:
full weights, this rank's masks with their block ranges, and the same after the resumed run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard

from bame_optim import BAMESGD
from bame_optim.optim.sharded import block_range
from tests.torchrun import exit_worker

STEPS = 24
SAVE_AT = 11
GLOBAL_BATCH = 16
SCHEDULE = dict(
    lr=0.1, momentum=0.9, weight_decay=5e-4, n=2, m=4, total_steps=STEPS, delta_t=2
)  # t_i = 8, t_f = 16: updates at 0, 2, ..., 8 (gradual, t_i), 10, 12, 14 (evolve)


def build(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(16, 36), nn.ReLU(), nn.Linear(36, 21), nn.ReLU(), nn.Linear(21, 5)
    )


def optimizer(model: nn.Sequential) -> BAMESGD:
    sparse = [model[0].weight, model[2].weight]
    dense = [p for p in model.parameters() if all(p is not q for q in sparse)]
    return BAMESGD(
        [{"params": sparse, "sparse": True}, {"params": dense, "sparse": False}], **SCHEDULE
    )


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(GLOBAL_BATCH, 16, generator=gen), torch.randint(
        0, 5, (GLOBAL_BATCH,), generator=gen
    )


def train(model: nn.Module, opt: BAMESGD, steps: range, rank: int, world: int) -> None:
    share = GLOBAL_BATCH // world
    for step in steps:
        x, y = batch(step)
        x, y = x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share]
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()


def snapshot(model: nn.Sequential, opt: BAMESGD) -> dict:
    weights = {k: v.full_tensor().detach().clone() for k, v in model.state_dict().items()}
    masks = {}
    for i in (0, 2):
        p = model[i].weight
        masks[str(i)] = (opt.kept_mask(p), block_range(p, 4))
    steps = [g["step"] for g in opt.param_groups]
    return {"weights": weights, "masks": masks, "steps": steps}


def sharded(seed: int) -> tuple[nn.Sequential, BAMESGD]:
    model = build(seed)
    for layer in (model[0], model[2], model[4]):
        fully_shard(layer)
    fully_shard(model)
    return model, optimizer(model)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    model, opt = sharded(seed=0)
    train(model, opt, range(SAVE_AT), rank, world)
    model_state, optim_state = get_state_dict(model, opt)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(args.out / "ckpt"))
    train(model, opt, range(SAVE_AT, STEPS), rank, world)
    whole = snapshot(model, opt)

    model, opt = sharded(seed=1)  # other weights: everything must come from the checkpoint
    model_state, optim_state = get_state_dict(model, opt)  # initialises state via step()
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(args.out / "ckpt"))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    resumed_at = [g["step"] for g in opt.param_groups]
    train(model, opt, range(SAVE_AT, STEPS), rank, world)
    resumed = snapshot(model, opt)
    torch.save(
        {"whole": whole, "resumed": resumed, "resumed_at": resumed_at},
        args.out / f"rank{rank}.pt",
    )
    # No rank tears its process group down while the other may still be in its last
    # collective.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    exit_worker()
