"""Optimizer-step benchmark of BAMEAdamW against ``torch.optim.AdamW`` with ``foreach=True`` and
with ``fused=True``.

The AdamW counterpart of :mod:`benchmarks.step` (same models, gradients, timer and interleaving):
per model and N:M pattern, the median time of

* an ordinary BAMEAdamW step (mask fixed: gather the kept weights, torch's functional AdamW on
  the compact moments, scatter back),
* an evolve-phase update step (LMA + OBF with the ``lr·|G|`` revive score, then the update),

each interleaved with ``torch.optim.AdamW(foreach=True)`` and ``AdamW(fused=True)`` steps on
identical copies of the parameters, and their ratios to both, with the GB/s of the bytes each
step must move (:func:`benchmarks.step_common.step_bytes`). All get lr 1e-3, weight decay 0.05
(DeiT's); BAMEAdamW gets ``foreach=True`` and, where it takes the keyword, ``fused=True``
(the fused kept-AdamW kernel is used either way where it runs: its default is ``fused=None``).
Targets (issue 19): an ordinary step <= 1.0x ``AdamW(fused=True)`` at 2:4 and <= 0.6x at
1:16::

    .venv/bin/python -m benchmarks.step_adamw                      # all models, 2:4 and 1:16
    .venv/bin/python -m benchmarks.step_adamw --models resnet32 --steps 10   # smoke run
"""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from bame_optim import BAMEAdamW

from .cli import nm_pattern, write_csv
from .step import DEFAULT_MODELS, FAR
from .step_common import (
    BENCH_MODELS,
    Timer,
    assign_grads,
    build_model,
    gbps,
    interleaved,
    sparse_groups,
    step_bytes,
)

HYPER: dict[str, Any] = {"lr": 1e-3, "weight_decay": 0.05, "foreach": True}
"""The hyper-parameters of every optimizer."""
TARGET_FUSED = {"2:4": 1.0, "1:16": 0.6}
"""Ordinary step over AdamW(fused=True)'s, at most (issue 19)."""


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
    fused = ({"fused": True, "foreach": False}
             if "fused" in inspect.signature(BAMEAdamW).parameters else {})
    return BAMEAdamW(sparse_groups(model, n, m), n=n, m=m, **(HYPER | fused), **schedule)


def time_steps(
    model_name: str, pattern: tuple[int, int], device: torch.device, steps: int, warmup: int,
    bar: tqdm | None = None,
) -> dict[str, Any]:
    """Median ms of AdamW, BAMEAdamW ordinary and BAMEAdamW update steps, interleaved."""
    n, m = pattern
    kinds = ("adamw", "adamw_fused", "ordinary", "update")
    models = {kind: build_model(model_name, device) for kind in kinds}
    generator = torch.Generator().manual_seed(1)
    grads = [torch.randn(p.shape, generator=generator).to(device)
             for p in models["adamw"].parameters()]
    optimizers: dict[str, torch.optim.Optimizer] = {
        "adamw": torch.optim.AdamW(models["adamw"].parameters(), **HYPER),
        "adamw_fused": torch.optim.AdamW(models["adamw_fused"].parameters(),
                                         **(HYPER | {"foreach": False, "fused": True})),
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
    groups = sparse_groups(models["adamw"], n, m)
    fused_bytes, ordinary_bytes = step_bytes(groups, None, None, "adamw"), step_bytes(
        groups, n, m, "adamw")
    ratio_fused = times["ordinary"] / times["adamw_fused"]
    return {
        "model": model_name, "pattern": f"{n}:{m}", "params_m": params,
        "adamw_ms": times["adamw"], "ordinary_ms": times["ordinary"],
        "update_ms": times["update"], "ordinary_ratio": times["ordinary"] / times["adamw"],
        "update_ratio": times["update"] / times["adamw"],
        "update_over_ordinary": times["update"] / times["ordinary"],
        "adamw_fused_ms": times["adamw_fused"], "ordinary_vs_fused": ratio_fused,
        "fused_gbps": gbps(fused_bytes, times["adamw_fused"]),
        "ordinary_gbps": gbps(ordinary_bytes, times["ordinary"]),
        "target": ("PASS" if ratio_fused <= TARGET_FUSED[f"{n}:{m}"] else "MISS")
        if f"{n}:{m}" in TARGET_FUSED else "-",
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | N:M | params (M) | AdamW ms | ordinary ms | ordinary x AdamW "
        "| fused AdamW ms | x fused | GB/s fused AdamW / ordinary | update ms "
        "| update x AdamW | update / ordinary | target (x fused) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['pattern']} | {r['params_m']:.1f} | {r['adamw_ms']:.1f} "
            f"| {r['ordinary_ms']:.1f} | {r['ordinary_ratio']:.2f}x "
            f"| {r['adamw_fused_ms']:.1f} | {r['ordinary_vs_fused']:.2f}x "
            f"| {r['fused_gbps']:.1f} / {r['ordinary_gbps']:.1f} | {r['update_ms']:.1f} "
            f"| {r['update_ratio']:.2f}x | {r['update_over_ordinary']:.1f}x | {r['target']} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS),
                        choices=list(BENCH_MODELS))
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
    print(f"\nBAMEAdamW against torch.optim.AdamW(foreach=True) and (fused=True) on {device}, "
          f"{torch.get_num_threads()} threads; medians of "
          f"{args.steps} interleaved rounds after {args.warmup} warm-up rounds")
    print(format_table(rows))
    if args.csv:
        write_csv(rows, args.csv)
    return rows


if __name__ == "__main__":
    main()
