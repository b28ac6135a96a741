"""Optimizer-step benchmark of BAMEAdamW against ``torch.optim.AdamW(foreach=True)``.

The AdamW counterpart of :mod:`benchmarks.step` (same models, gradients, timer and interleaving):
per model and N:M pattern, the median time of

* an ordinary BAMEAdamW step (mask fixed: gather the kept weights, torch's functional AdamW on
  the compact moments, scatter back),
* an evolve-phase update step (LMA + OBF with the ``lr·|G|`` revive score, then the update),

each interleaved with ``torch.optim.AdamW(foreach=True)`` steps on an identical copy of the
parameters, and their ratios to it. Both optimizers get ``foreach=True``, lr 1e-3, weight decay
0.05 (DeiT's)::

    .venv/bin/python -m benchmarks.step_adamw                      # all models, 2:4 and 1:16
    .venv/bin/python -m benchmarks.step_adamw --models resnet32 --steps 10   # smoke run
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from bame_optim import BAMEAdamW

from .cli import nm_pattern, write_csv
from .step import DEFAULT_MODELS, FAR, Timer, assign_grads, build_model, interleaved, sparse_groups

HYPER: dict[str, Any] = {"lr": 1e-3, "weight_decay": 0.05, "foreach": True}
"""The hyper-parameters of both optimizers."""


def make_optimizer(model: nn.Module, n: int, m: int, kind: str) -> BAMEAdamW:
    """BAMEAdamW over ``model`` whose steps from the second on are ``kind`` steps:
    ``"ordinary"`` (``t_i = t_f = 0``: the mask is drawn at step 0 and fixed) or ``"update"``
    (``t_i = 0``, ``delta_t = 1``: every later step is an evolve-phase update)."""
    if kind == "ordinary":
        schedule = {"t_i": 0, "t_f": 0}
    elif kind == "update":
        schedule = {"t_i": 0, "t_f": FAR, "total_steps": FAR, "delta_t": 1}
    else:
        raise ValueError(f"Invalid kind value: {kind!r} (ordinary or update)")
    return BAMEAdamW(sparse_groups(model, n, m), n=n, m=m, **HYPER, **schedule)


def time_steps(
    model_name: str, pattern: tuple[int, int], device: torch.device, steps: int, warmup: int,
    bar: tqdm | None = None,
) -> dict[str, Any]:
    """Median ms of AdamW, BAMEAdamW ordinary and BAMEAdamW update steps, interleaved."""
    n, m = pattern
    models = {kind: build_model(model_name, device) for kind in ("adamw", "ordinary", "update")}
    generator = torch.Generator().manual_seed(1)
    grads = [torch.randn(p.shape, generator=generator).to(device)
             for p in models["adamw"].parameters()]
    optimizers: dict[str, torch.optim.Optimizer] = {
        "adamw": torch.optim.AdamW(models["adamw"].parameters(), **HYPER),
        "ordinary": make_optimizer(models["ordinary"], n, m, "ordinary"),
        "update": make_optimizer(models["update"], n, m, "update"),
    }
    for kind, optimizer in optimizers.items():  # step 0: state created, the mask drawn
        assign_grads(models[kind], grads)
        optimizer.step()

    def call(kind: str):
        return optimizers[kind].step

    def before(kind: str) -> None:
        assign_grads(models[kind], grads)

    times = interleaved({kind: call(kind) for kind in optimizers}, steps, warmup, Timer(device),
                        before=before, bar=bar)
    params = sum(p.numel() for p in models["adamw"].parameters()) / 1e6
    return {
        "model": model_name, "pattern": f"{n}:{m}", "params_m": params,
        "adamw_ms": times["adamw"], "ordinary_ms": times["ordinary"],
        "update_ms": times["update"], "ordinary_ratio": times["ordinary"] / times["adamw"],
        "update_ratio": times["update"] / times["adamw"],
        "update_over_ordinary": times["update"] / times["ordinary"],
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | N:M | params (M) | AdamW ms | ordinary ms | ordinary x AdamW | update ms "
        "| update x AdamW | update / ordinary |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['pattern']} | {r['params_m']:.1f} | {r['adamw_ms']:.1f} "
            f"| {r['ordinary_ms']:.1f} | {r['ordinary_ratio']:.2f}x | {r['update_ms']:.1f} "
            f"| {r['update_ratio']:.2f}x | {r['update_over_ordinary']:.1f}x |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    parser.add_argument("--patterns", nargs="+", type=nm_pattern, default=[(2, 4), (1, 16)])
    parser.add_argument("--steps", type=int, default=20, help="timed rounds (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds (default 3)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--csv", type=Path, default=None, help="also write the table to this CSV")
    args = parser.parse_args(argv)
    for name in ("steps", "warmup"):
        if getattr(args, name) < (1 if name == "steps" else 0):
            parser.error(f"argument --{name}: invalid value {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    device = torch.device(args.device)
    jobs = [(model, pattern) for model in args.models for pattern in args.patterns]
    rows = []
    with tqdm(total=len(jobs) * (args.steps + args.warmup), desc="rounds", unit="round") as bar:
        for model, pattern in jobs:
            rows.append(time_steps(model, pattern, device, args.steps, args.warmup, bar))
    print(f"\nBAMEAdamW against torch.optim.AdamW(foreach=True) on {device}; medians of "
          f"{args.steps} interleaved rounds after {args.warmup} warm-up rounds")
    print(format_table(rows))
    if args.csv:
        write_csv(rows, args.csv)
    return rows


if __name__ == "__main__":
    main()
