"""Whole-training-step timing of a small timm DeiT: BAMEAdamW N:M against ``torch.optim.AdamW``.

timm's ``deit_tiny_patch16_224`` built with ``pretrained=False`` (no download), ``--depth``
blocks, on ``--image-size`` images (default 4 blocks, 64 x 64, batch 32, 10 classes). One
training step is ``zero_grad``, forward, cross-entropy, backward and ``step()``, on one fixed
random batch. Timed, interleaved round by round (:func:`benchmarks.harness.interleaved_rounds`, the
order rotated every round), medians:

* ``adamw_foreach``: ``torch.optim.AdamW(foreach=True)``,
* ``adamw_fused``: ``torch.optim.AdamW(fused=True)``,
* ``bame_ordinary``: ``BAMEAdamW`` over ``nm_param_groups(model, n, m, weight_decay=0.05)``
  with its mask fixed (``t_i = t_f = 0``: drawn at the first, untimed step), the step it runs
  between mask updates and after ``t_f``,
* ``bame_update``: the same with a mask update (LMA + OBF) on every step (``t_i = 0``,
  ``ΔT = 1``, evolve phase), the step it runs every ΔT steps of the evolve phase,

each on its own copy of the same initial model, all with lr 1e-3 and weight decay 0.05
(DeiT's). Prints the medians and their ratios to both AdamW timings::

    .venv/bin/python -m benchmarks.vit_step                  # ~1.5 min on 2 quiet CPU cores
    .venv/bin/python -m benchmarks.vit_step --steps 5 --warmup 1    # a smoke run
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from bame_optim import nm_param_groups
from bame_optim.methods import make_optimizer

from .harness import (
    Timer,
    interleaved_rounds,
    machine,
    medians,
    nm_pattern,
    resolve_device,
    schedule,
    write_csv,
)

HYPER: dict[str, Any] = {"lr": 1e-3, "weight_decay": 0.05}
"""The hyper-parameters of every optimizer."""
KINDS = ("adamw_foreach", "adamw_fused", "bame_ordinary", "bame_update")
BASELINES = ("adamw_foreach", "adamw_fused")


def build_deit(depth: int, image_size: int, num_classes: int, seed: int = 0) -> nn.Module:
    """timm's ``deit_tiny_patch16_224`` with ``depth`` blocks at ``image_size``, random init."""
    import timm

    torch.manual_seed(seed)
    return timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=depth,
                             img_size=image_size, num_classes=num_classes)


def build_optimizer(kind: str, model: nn.Module, pattern: tuple[int, int]) -> torch.optim.Optimizer:
    """The optimizer of ``kind`` (:data:`KINDS`) over ``model``."""
    if kind == "adamw_foreach":
        return torch.optim.AdamW(model.parameters(), foreach=True, **HYPER)
    if kind == "adamw_fused":
        return torch.optim.AdamW(model.parameters(), fused=True, **HYPER)
    n, m = pattern
    groups = nm_param_groups(model, n, m, weight_decay=HYPER["weight_decay"])
    if kind == "bame_ordinary":  # static_adamw's schedule: the mask drawn at step 0, then fixed
        return make_optimizer("static_adamw", groups, n=n, m=m, foreach=True, **HYPER)
    if kind == "bame_update":
        return make_optimizer("bame_adamw", groups, n=n, m=m, **schedule("update"), foreach=True,
                              **HYPER)
    raise ValueError(f"Invalid kind value: {kind!r} (one of {', '.join(KINDS)})")


def time_training_steps(
    depth: int, image_size: int, batch: int, pattern: tuple[int, int], device: torch.device,
    steps: int, warmup: int, bar: tqdm | None = None,
) -> dict[str, Any]:
    """Median ms of a training step with each optimizer of :data:`KINDS`, interleaved, their
    ratios to the AdamW ones, and the sparse parameters of the BAMEAdamW runs."""
    classes = 10
    base = build_deit(depth, image_size, classes).to(device)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, image_size, image_size, generator=generator).to(device)
    y = torch.randint(0, classes, (batch,), generator=generator).to(device)
    models = {kind: copy.deepcopy(base) for kind in KINDS}
    optimizers = {kind: build_optimizer(kind, models[kind], pattern) for kind in KINDS}

    def train_step(kind: str) -> Callable[[], None]:
        def run() -> None:
            optimizers[kind].zero_grad()
            F.cross_entropy(models[kind](x), y).backward()
            optimizers[kind].step()

        return run

    # at least one warm-up round: BAMEAdamW's first step draws the mask (not an ordinary step)
    times = medians(interleaved_rounds({kind: train_step(kind) for kind in KINDS}, steps,
                                       max(warmup, 1), Timer(device), None, bar))
    report = optimizers["bame_ordinary"].sparsity_report()
    rows = [row for row in report if row["sparse"]]
    n, m = pattern
    for kind in ("bame_ordinary", "bame_update"):
        bad = [r["name"] for r in optimizers[kind].sparsity_report()
               if r["sparse"] and not (r["nm_valid"] and r["density"] == n / m)]
        if bad:
            raise RuntimeError(f"{kind}: not exactly {n}:{m} after the timed steps: {bad}")
    result: dict[str, Any] = {
        "depth": depth, "image_size": image_size, "batch": batch, "pattern": f"{n}:{m}",
        "params_m": sum(p.numel() for p in base.parameters()) / 1e6,
        "sparse_params": len(rows),
        "sparse_weights": sum(int(torch.Size(r["shape"]).numel()) for r in rows),
    }
    for kind in KINDS:
        result[f"{kind}_ms"] = times[kind]
    for kind in ("bame_ordinary", "bame_update"):
        for baseline in BASELINES:
            result[f"{kind}_vs_{baseline}"] = times[kind] / times[baseline]
    result["adamw_fused_vs_adamw_foreach"] = times["adamw_fused"] / times["adamw_foreach"]
    return result


def format_report(row: dict[str, Any]) -> str:
    lines = [
        "| optimizer | step ms | x AdamW foreach | x AdamW fused |",
        "|---|---|---|---|",
    ]
    for kind in KINDS:
        ms = row[f"{kind}_ms"]
        lines.append(f"| {kind} | {ms:.1f} | {ms / row['adamw_foreach_ms']:.2f}x "
                     f"| {ms / row['adamw_fused_ms']:.2f}x |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=4, help="transformer blocks (default 4)")
    parser.add_argument("--image-size", type=int, default=64, help="pixels (default 64)")
    parser.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    parser.add_argument("--pattern", type=nm_pattern, default=(2, 4), help="N:M (default 2:4)")
    parser.add_argument("--steps", type=int, default=30, help="timed rounds (default 30)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds (default 3)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--csv", type=Path, default=None, help="also write the row to this CSV")
    args = parser.parse_args(argv)
    for name in ("depth", "image_size", "batch", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"argument --{name.replace('_', '-')}: must be >= 1")
    if args.image_size % 16:
        parser.error("argument --image-size: must be a multiple of the patch size 16")
    if args.warmup < 0:
        parser.error("argument --warmup: must be >= 0")
    args.device = resolve_device(parser, args.device)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    with tqdm(total=args.steps + max(args.warmup, 1), desc="rounds", unit="round") as bar:
        row = time_training_steps(args.depth, args.image_size, args.batch, args.pattern,
                                  args.device, args.steps, args.warmup, bar)
    print(
        f"\nDeiT-tiny (timm, random init), {args.depth} blocks, {args.image_size}x"
        f"{args.image_size} images, batch {args.batch}, {row['params_m']:.2f} M params; "
        f"BAMEAdamW {row['pattern']} on {row['sparse_params']} sparse weights "
        f"({row['sparse_weights']:,}); {machine(args.device)}; forward + backward + step, "
        f"medians of "
        f"{args.steps} interleaved rounds after {max(args.warmup, 1)} warm-up rounds"
    )
    print(format_report(row))
    if args.csv is not None:
        write_csv([row], args.csv)
        print(f"wrote {args.csv}")
    return row


if __name__ == "__main__":
    main()
