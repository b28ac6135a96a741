"""The main job: one short real training run that shows what BAMESGD does.

Trains the same MLP three ways on the same batches from the same initial weights and prints
their test accuracy side by side:

1. dense ``torch.optim.SGD``,
2. a static random N:M mask (``BAMESGD(..., t_i=0, t_f=0)``),
3. BAME (``BAMESGD`` with the paper's schedule: gradual pruning over the first third, mask
   evolution over the second, fixed mask for the last).

Data: scikit-learn's bundled digits by default; ``--data PATH`` reads the Fashion-MNIST (or
MNIST) IDX files of a folder, e.g. ``../shared/data/fashion-mnist``. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from bame_optim import BAMESGD, nm_param_groups
from bame_optim.integrations.local_data import load_split

METHODS = ("dense SGD", "static N:M", "BAME")


def mlp(inputs: int, hidden: int, classes: int) -> nn.Sequential:
    """``inputs -> hidden -> hidden -> hidden -> classes``; ``nm_param_groups`` keeps the first
    and last layers dense, so the two hidden-to-hidden layers are N:M sparse."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(inputs, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, classes),
    )


def make_optimizer(method: str, model: nn.Module, args: argparse.Namespace, total_steps: int):
    hyper = dict(lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    if method == "dense SGD":
        return torch.optim.SGD(model.parameters(), **hyper)
    groups = nm_param_groups(model, n=args.n, m=args.m)
    schedule = dict(t_i=0, t_f=0) if method == "static N:M" else dict(delta_t=args.delta_t)
    return BAMESGD(groups, total_steps=total_steps, seed=args.seed, **hyper, **schedule)


def train(method: str, data, args: argparse.Namespace, seed: int) -> dict:
    (x, y), (x_test, y_test) = data
    torch.manual_seed(seed)
    model = mlp(x[0].numel(), args.hidden, int(y.max()) + 1)
    steps_per_epoch = math.ceil(len(x) / args.batch_size)
    total_steps = args.epochs * steps_per_epoch
    optimizer = make_optimizer(method, model, args, total_steps)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    order = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    with tqdm(total=total_steps, desc=f"{method} (seed {seed})", leave=False) as bar:
        for _ in range(args.epochs):
            for idx in torch.randperm(len(x), generator=order).split(args.batch_size):
                optimizer.zero_grad()
                F.cross_entropy(model(x[idx]), y[idx]).backward()
                optimizer.step()
                scheduler.step()
                bar.update()
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    report = optimizer.sparsity_report() if isinstance(optimizer, BAMESGD) else []
    return {"accuracy": accuracy, "seconds": seconds, "report": report}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="folder of Fashion-MNIST/MNIST IDX files")
    parser.add_argument("--n", type=int, default=1, help="kept weights per block (default 1)")
    parser.add_argument("--m", type=int, default=16, help="block size (default 16)")
    parser.add_argument("--epochs", type=int, default=None, help="default 30 digits, 5 IDX")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--delta-t", type=int, default=20, help="mask update interval ΔT")
    parser.add_argument("--seeds", type=int, default=3, help="runs per method (mean ± std)")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--limit-train", type=int, default=None, help="first N training images")
    args = parser.parse_args(argv)
    for name in ("epochs", "batch_size", "hidden", "delta_t", "seeds", "limit_train"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"argument --{name.replace('_', '-')}: invalid value {value} (>= 1)")
    if not 1 <= args.n < args.m:
        parser.error(f"argument --n: invalid value {args.n} (1 <= n < m={args.m} is required)")
    if args.hidden % args.m:
        parser.error(f"argument --hidden: invalid value {args.hidden} (must divide by m={args.m})")
    if args.lr <= 0:
        parser.error(f"argument --lr: invalid value {args.lr} (must be > 0)")
    if args.epochs is None:
        args.epochs = 5 if args.data else 30
    return args


def main(argv: list[str] | None = None) -> dict[str, list[dict]]:
    """Run the three methods and print their accuracies; returns every run's result."""
    args = parse_args(argv)
    name = "digits" if args.data is None else "fashion-mnist"
    (x, y), test = load_split(name, args.data)
    if args.limit_train:
        x, y = x[: args.limit_train], y[: args.limit_train]
    data = ((x, y), test)
    seeds = range(args.seed, args.seed + args.seeds)
    results = {method: [train(method, data, args, seed) for seed in seeds] for method in METHODS}

    source = args.data or "scikit-learn digits"
    print(
        f"\n{source}: {len(x)} train / {len(test[0])} test images, MLP {args.hidden} hidden, "
        f"{args.epochs} epochs, {args.n}:{args.m} sparsity, seeds {list(seeds)}"
    )
    print(f"{'method':<12} {'test accuracy':>20} {'time / run':>12}")
    for method, runs in results.items():
        accs = [100 * r["accuracy"] for r in runs]
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        seconds = statistics.fmean(r["seconds"] for r in runs)
        print(f"{method:<12} {statistics.fmean(accs):>12.2f} ± {spread:<5.2f} {seconds:>10.1f}s")
    for row in results["BAME"][0]["report"]:
        if row["sparse"]:
            print(
                f"  BAME {row['name']}: density {row['density']:.4f}, "
                f"N:M valid {row['nm_valid']}, phase {row['phase']}"
            )
    return results


if __name__ == "__main__":
    main()
