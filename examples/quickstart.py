"""The main job: one short real training run that shows what BAMESGD does.

Trains the same MLP three ways, from the same initial weights on the same batches, and prints
their test accuracy and wall time side by side:

1. dense ``torch.optim.SGD``,
2. a static random N:M mask (``BAMESGD(..., t_i=0, t_f=0)``: drawn at step 0, never changed),
3. BAME (``BAMESGD(..., total_steps=T)`` with the paper's schedule: gradual pruning over the
   first third, mask evolution every ``--delta-t`` steps over the second, a fixed mask after).

Data: scikit-learn's bundled digits by default; ``--data PATH`` reads the four Fashion-MNIST
(or MNIST) IDX files of a folder (docs/data.md says where to get them), verifying
``MD5SUMS.decompressed`` when present. Nothing is downloaded.

Defaults (measured on digits, 5 seeds, 2 CPU cores): 1:16 (the paper's headline
pattern; at 2:8 the static-vs-BAME gap on digits is about half as large), lr 0.05, batch 64,
ΔT 20 (about a dozen mask updates in the evolve phase of the 690-step digits run; the paper's
ΔT = 100 is for runs of tens of thousands of steps), and weight decay 5e-4: the paper's 5e-3,
tuned for 160-epoch CIFAR runs, lowered all three accuracies on these short runs. Biases get no
weight decay in any of the three runs.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import zlib
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from bame_apps.integrations.local_data import load_split
from bame_optim import BAMESGD, nm_param_groups
from bame_optim.core.nm import is_nm_sparse
from bame_optim.kernels import native

METHODS = ("dense SGD", "static N:M", "BAME")
"""The three runs of every seed, in the order they are trained and printed."""
MOMENTUM = 0.9

Split = tuple[torch.Tensor, torch.Tensor]


def mlp(inputs: int, hidden: int, classes: int) -> nn.Sequential:
    """``inputs -> hidden -> hidden -> hidden -> classes`` with ReLU. ``nm_param_groups`` keeps
    the first layer and the classifier dense, so the two hidden-to-hidden layers are N:M."""
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


def make_optimizer(
    method: str, model: nn.Module, args: argparse.Namespace, total_steps: int, seed: int
) -> torch.optim.Optimizer:
    """The optimizer of ``method``. All three share lr, momentum and weight decay, and none
    decays biases (``nm_param_groups`` puts 1-d parameters in a group without weight decay,
    so the dense run gets the same split)."""
    hyper: dict[str, Any] = dict(lr=args.lr, momentum=MOMENTUM, weight_decay=args.weight_decay)
    if method == "dense SGD":
        params = list(model.parameters())
        groups = [
            {"params": [p for p in params if p.ndim > 1]},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
        ]
        return torch.optim.SGD(groups, **hyper)
    groups = nm_param_groups(model, n=args.n, m=args.m)
    if method == "static N:M":
        schedule: dict[str, Any] = dict(t_i=0, t_f=0)
    else:
        schedule = dict(delta_t=args.delta_t)
    return BAMESGD(groups, total_steps=total_steps, seed=seed, **hyper, **schedule)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 4096) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``, evaluated in batches."""
    model.eval()
    pairs = zip(x.split(batch), y.split(batch), strict=True)
    correct = sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in pairs)
    return correct / len(y)


def train(method: str, data: tuple[Split, Split], args: argparse.Namespace, seed: int) -> dict:
    """Train one model with ``method`` and return ``accuracy`` (test, in [0, 1]), ``seconds``
    (wall time of the training loop), ``steps``, ``model``, ``report`` (BAMESGD's
    ``sparsity_report()``, empty for dense SGD) and ``nm_valid`` (every sparse weight passes
    :func:`bame_optim.core.nm.is_nm_sparse`; ``None`` for dense SGD).

    The initial weights and the batch order depend on ``seed`` only, so the three methods of
    one seed start from the same weights and see the same batches.
    """
    (x, y), (x_test, y_test) = data
    torch.manual_seed(seed)
    model = mlp(x[0].numel(), args.hidden, int(max(y.max(), y_test.max())) + 1)
    total_steps = args.epochs * math.ceil(len(x) / args.batch_size)
    optimizer = make_optimizer(method, model, args, total_steps, seed)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    if method == "BAME" and seed == args.seed:
        print(optimizer.schedule_summary())
    order = torch.Generator().manual_seed(seed)
    model.train()
    start = time.perf_counter()
    with tqdm(total=total_steps, desc=f"{method} (seed {seed})", leave=False) as bar:
        for _ in range(args.epochs):
            for idx in torch.randperm(len(x), generator=order).split(args.batch_size):
                optimizer.zero_grad()
                loss = F.cross_entropy(model(x[idx]), y[idx])
                loss.backward()
                optimizer.step()
                scheduler.step()
                bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    seconds = time.perf_counter() - start
    result: dict[str, Any] = {
        "accuracy": accuracy(model, x_test, y_test),
        "seconds": seconds,
        "steps": total_steps,
        "model": model,
        "report": [],
        "nm_valid": None,
    }
    if isinstance(optimizer, BAMESGD):
        result["report"] = optimizer.sparsity_report()
        sparse = [
            (p, group["n"], group["m"])
            for group in optimizer.param_groups
            if group["sparse"]
            for p in group["params"]
        ]
        result["nm_valid"] = bool(sparse) and all(is_nm_sparse(p, n, m) for p, n, m in sparse)
    return result


def build_parser() -> argparse.ArgumentParser:
    """The command line of the main job (``--help`` lists it)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--data", type=Path, help="folder of the 4 IDX files (default: scikit-learn digits)")
    add("--n", type=int, default=1, help="kept weights per block (default: %(default)s)")
    add("--m", type=int, default=16, help="block size M (default: %(default)s)")
    add("--epochs", type=int, help="default: 30 on digits, 3 with --data")
    add("--batch-size", type=int, default=64, help="default: %(default)s")
    add("--hidden", type=int, default=256, help="hidden layer width (default: %(default)s)")
    add("--lr", type=float, default=0.05, help="peak lr, cosine to 0 (default: %(default)s)")
    add("--weight-decay", type=float, default=5e-4, help="default: %(default)s")
    add("--delta-t", type=int, default=20, help="BAME mask update interval (default: %(default)s)")
    add("--seeds", type=int, help="runs per method, mean ± std (default: 5 digits, 3 --data)")
    add("--seed", type=int, default=0, help="first seed (default: %(default)s)")
    add("--limit-train", type=int, help="train on the first N training images only")
    return parser


def parse_args(
    argv: list[str] | None, parser: argparse.ArgumentParser | None = None
) -> argparse.Namespace:
    """Parse and validate the command line; a bad value exits through ``parser.error`` (status
    2) with a message naming the flag and the value."""
    parser = parser or build_parser()
    args = parser.parse_args(argv)

    for name in ("epochs", "batch_size", "hidden", "delta_t", "seeds", "limit_train"):
        value = getattr(args, name)
        if value is not None and value < 1:
            flag = "--" + name.replace("_", "-")
            parser.error(f"argument {flag}: invalid value {value} (an integer >= 1 is required)")
    if args.m < 2:
        parser.error(f"argument --m: invalid value {args.m} (m >= 2 is required)")
    if not 1 <= args.n < args.m:
        parser.error(f"argument --n: invalid value {args.n} (1 <= n < m = {args.m} is required)")
    if args.hidden % args.m:
        parser.error(
            f"argument --hidden: invalid value {args.hidden} (must be divisible by m = {args.m})"
        )
    if not (math.isfinite(args.lr) and args.lr > 0):
        parser.error(f"argument --lr: invalid value {args.lr} (a finite lr > 0 is required)")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        parser.error(
            f"argument --weight-decay: invalid value {args.weight_decay} (finite, >= 0 required)"
        )
    if args.seed < 0:
        parser.error(f"argument --seed: invalid value {args.seed} (>= 0 required)")
    if args.data is not None and not args.data.is_dir():
        parser.error(f"argument --data: invalid value '{args.data}' (not a folder)")
    if args.epochs is None:
        args.epochs = 30 if args.data is None else 3
    if args.seeds is None:
        args.seeds = 5 if args.data is None else 3
    return args


def load_data(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[Split, Split]:
    """The train and test split selected by ``--data`` and ``--limit-train``; a damaged file
    or a too-large ``--limit-train`` exits with an argparse error that names it."""
    try:
        if args.data is None:
            (x, y), test = load_split("digits")
        else:
            (x, y), test = load_split("fashion-mnist", args.data)
    except (OSError, ValueError) as err:
        parser.error(f"argument --data: {err}")
    except zlib.error as err:  # a corrupt deflate stream: the loader does not name the file
        parser.error(f"argument --data: a gzipped file in {args.data} is corrupt ({err})")
    if args.limit_train is not None:
        if args.limit_train > len(x):
            parser.error(
                f"argument --limit-train: invalid value {args.limit_train} "
                f"(the training set has {len(x)} images)"
            )
        x, y = x[: args.limit_train], y[: args.limit_train]
    return (x, y), test


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def print_table(results: dict[str, list[dict]], args: argparse.Namespace, sizes: str) -> None:
    """Print the accuracy / wall-time table and the BAME sparsity summary."""
    seeds = list(range(args.seed, args.seed + args.seeds))
    source = args.data if args.data is not None else "scikit-learn digits"
    steps = results[METHODS[0]][0]["steps"]
    print(f"\n{source}: {sizes}; MLP with 3 hidden layers of {args.hidden}; seeds {seeds}")
    print(
        f"{args.epochs} epochs = {steps} steps of batch {args.batch_size}, lr {args.lr} cosine, "
        f"momentum {MOMENTUM}, weight decay {args.weight_decay}; {args.n}:{args.m} sparse "
        f"hidden-to-hidden layers, BAME ΔT {args.delta_t}"
    )
    print(f"{'method':<12} {'test accuracy (%)':>19} {'wall time / run':>17}")
    for method, runs in results.items():
        acc, acc_std = _mean_std([100 * r["accuracy"] for r in runs])
        sec, sec_std = _mean_std([r["seconds"] for r in runs])
        print(f"{method:<12} {acc:>10.2f} ± {acc_std:<6.2f} {sec:>9.1f} ± {sec_std:.1f} s")
    valid = all(r["nm_valid"] for r in results["BAME"])
    sparse = [row for row in results["BAME"][0]["report"] if row["sparse"]]
    layers = ", ".join(
        f"{row['name']} {row['shape'][0]}x{row['shape'][1]} density {row['density']:.4f} "
        f"N:M valid {row['nm_valid']}"
        for row in sparse
    )
    print(
        f"BAME sparse layers (seed {seeds[0]}, phase {sparse[0]['phase']}): {layers}; "
        f"{args.n}:{args.m} valid in all {len(seeds)} seeds: {valid}"
    )


def main(argv: list[str] | None = None) -> dict[str, list[dict]]:
    """Run the three methods for every seed and print their accuracies.

    Returns ``{method: [result of train() per seed]}`` in the order of :data:`METHODS`.
    """
    parser = build_parser()
    args = parse_args(argv, parser)
    data = load_data(args, parser)
    seeds = range(args.seed, args.seed + args.seeds)
    # The native kernels compile on first use (about a minute, once per cache): built before any
    # run is timed, the wall-time column is training alone.
    native.load()
    results = {method: [train(method, data, args, seed) for seed in seeds] for method in METHODS}
    sizes = f"{len(data[0][0])} train / {len(data[1][0])} test images"
    print_table(results, args, sizes)
    return results


if __name__ == "__main__":
    main()
