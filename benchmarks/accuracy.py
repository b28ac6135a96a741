"""Accuracy benchmark: train one model per method and N:M pattern on real data, rank them.

Prints a table (method, N:M, top-1 mean ± std over seeds, training-FLOPs ratio, wall time),
and writes it as CSV with a plot. The small default configuration (a small CNN on the real
Fashion-MNIST, 1:16 and 2:4, 3 seeds) fits in about 30 minutes on 2 CPU cores::

    .venv/bin/python -m benchmarks.accuracy                       # Fashion-MNIST, small CNN
    .venv/bin/python -m benchmarks.accuracy --dataset digits      # always available
    .venv/bin/python -m benchmarks.accuracy --dataset cifar10 --data PATH --full   # GPU

``--full`` is the paper's CIFAR-10 recipe: ResNet-32, 300 epochs, SGD 0.1 momentum 0.9 with
cosine decay, weight decay 5e-3, batch 256, ΔT = 100, α = β = 0.5.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from bame_apps.integrations.local_data import load_split
from bame_apps.integrations.models import resnet32, small_cnn
from bame_optim import nm_param_groups
from bame_optim.core.evolution import REVIVE_SCORES
from bame_optim.flops import FlopsProfile, training_flops_ratio
from bame_optim.methods import METHODS, accepted_keywords, fixed_settings, make_optimizer

from .harness import nm_pattern, write_csv

ROOT = Path(__file__).resolve().parents[1]

DEFAULT_METHODS = tuple(name for name, method in METHODS.items() if method.optimizer == "sgd")
"""Every SGD method of the registry, in its order (the AdamW variants: ``--methods``)."""
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "fashion-mnist"


@dataclass(frozen=True)
class Config:
    model: str
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    delta_t: int
    alpha: float
    beta: float
    limit_train: int | None
    augment: bool
    adamw_lr: float = 2e-3
    """Peak lr of the AdamW methods (``*_adamw``)."""
    adamw_weight_decay: float = 0.05
    """Decoupled weight decay of the AdamW methods (DeiT's 0.05)."""
    t_i: int | None = None
    """End of gradual pruning, in steps (``None``: the optimizer's ``T // 3``)."""
    t_f: int | None = None
    """End of mask evolution, in steps (``None``: the optimizer's ``2T // 3``)."""


SMALL = Config(
    model="small_cnn",
    epochs=4,
    batch_size=128,
    lr=0.1,
    momentum=0.9,
    weight_decay=5e-4,
    delta_t=20,
    alpha=0.5,
    beta=0.5,
    limit_train=30000,
    augment=False,
)
"""Fits 30 minutes on 2 CPU cores: 30k images, 4 epochs, so ΔT is scaled down to 20."""
FULL = Config(
    model="resnet32",
    epochs=300,
    batch_size=256,
    lr=0.1,
    momentum=0.9,
    weight_decay=5e-3,
    delta_t=100,
    alpha=0.5,
    beta=0.5,
    limit_train=None,
    augment=True,
)
"""The paper's CIFAR-10 recipe (section 4.1), with the usual crop-and-flip augmentation."""
CROP_PADDING = 4
"""Zero padding of the random crop (He et al. 2016's CIFAR augmentation)."""


def _build_model(name: str, channels: int, classes: int, size: int) -> nn.Module:
    if name == "resnet32":
        return resnet32(num_classes=classes, in_channels=channels)
    return small_cnn(in_channels=channels, num_classes=classes, image_size=size)


def _batches(x, y, batch_size, generator):
    order = torch.randperm(len(x), generator=generator).to(x.device)
    for start in range(0, len(x), batch_size):
        idx = order[start : start + batch_size]
        yield x[idx], y[idx]


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop (zero padding ``CROP_PADDING``) and horizontal flip, per image."""
    b, _, h, w = x.shape
    padded = F.pad(x, [CROP_PADDING] * 4)
    dy, dx = (torch.randint(0, 2 * CROP_PADDING + 1, (2, b), generator=generator)).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]
    flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
    cols = torch.where(flip[:, None, None], cols.flip(-1), cols)
    batch = torch.arange(b, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)


def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(x), 1000):
            correct += (model(x[start : start + 1000]).argmax(1) == y[start : start + 1000]).sum()
    model.train()
    return float(correct) / len(x)


def total_steps(cfg: Config, train_size: int, epochs: int | None = None) -> int:
    """Optimizer steps of ``epochs`` (default ``cfg.epochs``) over ``train_size`` images."""
    return (cfg.epochs if epochs is None else epochs) * math.ceil(train_size / cfg.batch_size)


def _train(model, optimizer, data, cfg: Config, epochs: int, seed: int) -> None:
    x, y = data
    steps = total_steps(cfg, len(x), epochs)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for xb, yb in _batches(x, y, cfg.batch_size, generator):
            if cfg.augment:
                xb = _augment(xb, generator)
            optimizer.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            optimizer.step()
            scheduler.step()


def run_one(
    method, pattern, seed, train, test, cfg: Config, shape, revive_score: str | None = None
) -> dict:
    """Train ``method`` at ``pattern`` from seed ``seed``; return its metrics.
    ``revive_score`` overrides LMA's revive score of the methods that take one."""
    n, m = pattern
    channels, size, classes = shape
    torch.manual_seed(seed)
    model = _build_model(cfg.model, channels, classes, size).to(train[0].device)
    steps = total_steps(cfg, len(train[0]))
    record = METHODS[method]
    pretrains = record.flops is FlopsProfile.PRETRAIN_FIXED
    start = time.perf_counter()
    if pretrains:  # asp's recipe: dense training, then as long again sparse fine-tuning
        dense = torch.optim.SGD(
            model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        _train(model, dense, train, cfg, cfg.epochs, seed)
    groups = nm_param_groups(model, n, m)
    schedule = {
        "n": n,
        "m": m,
        "total_steps": steps,
        "delta_t": cfg.delta_t,
        "alpha": cfg.alpha,
        "beta": cfg.beta,
        "seed": seed,
    }
    schedule.update({k: v for k, v in (("t_i", cfg.t_i), ("t_f", cfg.t_f)) if v is not None})
    for key in fixed_settings(method):  # e.g. lma fixes alpha = 0
        schedule.pop(key, None)
    if record.optimizer == "adamw":
        hyper = {"lr": cfg.adamw_lr, "weight_decay": cfg.adamw_weight_decay}
        if revive_score is not None and "revive_score" in accepted_keywords(method):
            hyper["revive_score"] = revive_score
    else:
        hyper = {"lr": cfg.lr, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay}
    optimizer = make_optimizer(method, groups, **hyper, **schedule)
    handles = record.attach(model, optimizer) if record.attach is not None else []
    _train(model, optimizer, train, cfg, cfg.epochs, seed + 1)
    for handle in handles:
        handle.remove()
    if train[0].is_cuda:
        torch.cuda.synchronize(train[0].device)
    seconds = time.perf_counter() - start
    flops = training_flops_ratio(
        model,
        (channels, size, size),
        method,
        n=n,
        m=m,
        total_steps=steps,
        delta_t=cfg.delta_t,
        **{k: v for k, v in schedule.items() if k in ("t_i", "t_f")},
        **({"pretrain_steps": steps} if pretrains else {}),
    )
    return {
        "method": method,
        "pattern": "-" if _is_dense(method) else f"{n}:{m}",
        "seed": seed,
        "top1": _evaluate(model, *test),
        "flops": flops,
        "seconds": seconds,
    }


def _is_dense(method: str) -> bool:
    return METHODS[method].factory in (torch.optim.SGD, torch.optim.AdamW)


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and spread over seeds, one row per (method, pattern), in first-seen order."""
    grouped: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        grouped.setdefault((row["method"], row["pattern"]), []).append(row)
    table = []
    for (method, pattern), runs in grouped.items():
        accs = [100 * r["top1"] for r in runs]
        table.append(
            {
                "method": method,
                "pattern": pattern,
                "top1_mean": statistics.fmean(accs),
                "top1_std": top1_std(accs),
                "seeds": " ".join(str(r["seed"]) for r in runs),
                "flops_ratio": runs[0]["flops"],
                "seconds": statistics.fmean(r["seconds"] for r in runs),
            }
        )
    return table


def top1_std(accs: list[float]) -> float | None:
    """The sample standard deviation of the seeds' accuracies; ``None`` for one seed."""
    return statistics.stdev(accs) if len(accs) > 1 else None


def top1_text(row: dict) -> str:
    """``mean ± std``, or ``mean (one seed)`` where there is no spread to show."""
    if row["top1_std"] is None:
        return f"{row['top1_mean']:.2f} (one seed)"
    return f"{row['top1_mean']:.2f} ± {row['top1_std']:.2f}"


def format_table(table: list[dict]) -> str:
    lines = [
        "| method | N:M | top-1 % (mean ± std) | train FLOPs | time / run (s) | seeds |",
        "|---|---|---|---|---|---|",
    ]
    for r in table:
        lines.append(
            f"| {r['method']} | {r['pattern']} | {top1_text(r)} "
            f"| {r['flops_ratio']:.2f}x | {r['seconds']:.1f} | {r['seeds']} |"
        )
    return "\n".join(lines)


def plot(table: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    patterns = [p for p in dict.fromkeys(r["pattern"] for r in table) if p != "-"]
    methods = [m for m in dict.fromkeys(r["method"] for r in table) if not _is_dense(m)]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(methods) * len(patterns)), 4))
    width = 0.8 / max(1, len(patterns))
    for i, pattern in enumerate(patterns):
        rows = {r["method"]: r for r in table if r["pattern"] == pattern}
        xs = [j + i * width for j, method in enumerate(methods) if method in rows]
        means = [rows[method]["top1_mean"] for method in methods if method in rows]
        stds = [rows[method]["top1_std"] or 0.0 for method in methods if method in rows]
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=pattern)
    for r, style in zip([r for r in table if _is_dense(r["method"])], ("--", ":"), strict=False):
        ax.axhline(r["top1_mean"], color="black", linestyle=style, label=r["method"])
    ax.set_xticks([j + width * (len(patterns) - 1) / 2 for j in range(len(methods))], methods)
    lows = [r["top1_mean"] - (r["top1_std"] or 0.0) for r in table]
    ax.set_ylim(max(0.0, min(lows) - 2), min(100.0, max(r["top1_mean"] for r in table) + 1))
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dataset", choices=("fashion-mnist", "digits", "cifar10"), default="fashion-mnist"
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help=f"local data folder (default for fashion-mnist: {DEFAULT_DATA})",
    )
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS)
    parser.add_argument("--patterns", nargs="+", type=nm_pattern, default=[(1, 16), (2, 4)])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--revive-score",
        choices=REVIVE_SCORES,
        default=None,
        help="LMA's revive score for the methods that take one (bame_adamw; default: theirs)",
    )
    parser.add_argument("--full", action="store_true", help="the paper's ResNet-32 recipe")
    parser.add_argument("--epochs", type=int, default=None, help="override the config's epochs")
    parser.add_argument(
        "--limit-train",
        type=int,
        default=None,
        help="train on the first N training images (0: all)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "accuracy")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device to train on (default: cuda when available)",
    )
    args = parser.parse_args(argv)
    if args.epochs is not None and args.epochs < 1:
        parser.error(f"argument --epochs: invalid value {args.epochs} (must be >= 1)")
    if args.limit_train is not None and args.limit_train < 0:
        parser.error(f"argument --limit-train: invalid value {args.limit_train} (must be >= 0)")
    if args.dataset == "cifar10" and args.data is None:
        parser.error("argument --data: required for --dataset cifar10 (the python batches folder)")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    cfg = FULL if args.full else SMALL
    if args.epochs is not None:
        cfg = Config(**{**cfg.__dict__, "epochs": args.epochs})
    if args.limit_train is not None:
        cfg = Config(**{**cfg.__dict__, "limit_train": args.limit_train or None})
    path = args.data or (DEFAULT_DATA if args.dataset == "fashion-mnist" else None)
    train, test = load_split(args.dataset, path)
    if cfg.limit_train:
        train = (train[0][: cfg.limit_train], train[1][: cfg.limit_train])
    try:
        device = torch.device(args.device)
        train = tuple(t.to(device) for t in train)
        test = tuple(t.to(device) for t in test)
    except (RuntimeError, AssertionError) as err:
        raise SystemExit(f"argument --device: cannot use {args.device!r}: {err}") from err
    shape = (train[0].shape[1], train[0].shape[2], int(train[1].max()) + 1)
    jobs = [(m, (1, 2)) for m in args.methods if _is_dense(m)]
    jobs += [(m, p) for p in args.patterns for m in args.methods if not _is_dense(m)]
    rows = []
    with tqdm(total=len(jobs) * len(args.seeds), desc="runs", unit="run") as bar:
        for method, pattern in jobs:
            for seed in args.seeds:
                label = method if _is_dense(method) else f"{method} {pattern[0]}:{pattern[1]}"
                bar.set_postfix_str(f"{label} seed {seed}")
                rows.append(
                    run_one(method, pattern, seed, train, test, cfg, shape, args.revive_score)
                )
                bar.update()
    table = summarise(rows)
    print(
        f"\n{args.dataset} ({len(train[0])} train / {len(test[0])} test images), {cfg.model}, "
        f"{cfg.epochs} epochs, batch {cfg.batch_size}, lr {cfg.lr} (AdamW {cfg.adamw_lr}), "
        f"ΔT {cfg.delta_t}" + (f", revive score {args.revive_score}" if args.revive_score else "")
    )
    print(format_table(table))
    write_csv(table, args.out / "accuracy.csv")
    write_csv(rows, args.out / "runs.csv")
    plot(table, args.out / "accuracy.png", f"{args.dataset}, {cfg.model}, {cfg.epochs} epochs")
    print(f"wrote accuracy.csv, runs.csv and accuracy.png to {args.out}")
    return table


if __name__ == "__main__":
    main()
