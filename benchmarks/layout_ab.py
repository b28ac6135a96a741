"""The BAME optimizers' ordinary step with the model contiguous and in the channels-last memory
format, against torch's fused step (contiguous, its fastest), interleaved in one process.

Runs of :mod:`benchmarks.step` with and without ``--channels-last`` are two runs, and their
ratios move by +-0.15 between runs on a shared machine; here the three steps of a (model,
pattern, rule) share every round, so ``channels_last / contiguous`` is one measurement. Each
optimizer steps its own copy of the model with the same fixed gradients (in the copy's layout,
as autograd gives them), ``fused=True`` for all three. It prints the median milliseconds with
the interquartile range, each BAME step over torch's, and channels-last over contiguous with
the quartiles of the per-round ratios. Run from the repository root::

    .venv/bin/python -m benchmarks.layout_ab --models resnet50 --patterns 2:4 1:16
"""

from __future__ import annotations

import argparse
import copy
import statistics
from typing import Any

import torch
from torch import nn

from .harness import (
    BENCH_MODELS,
    Timer,
    assign_grads,
    build_model,
    fixed_grads,
    interleaved_rounds,
    machine,
    nm_pattern,
    ratio_quartiles,
)
from .kept_simd_ab import summary
from .step_timing import BAME_METHOD, make_bame, make_torch

CONTENDERS = ("torch", "contiguous", "channels_last")


def time_layouts(name: str, n: int, m: int, rule: str, rounds: int,
                 warmup: int) -> dict[str, list[float]]:
    """Milliseconds per round of torch's fused step and BAME's ordinary step on a contiguous
    and on a channels-last copy of model ``name``."""
    base = build_model(name, torch.device("cpu"))
    grads = fixed_grads(base, torch.device("cpu"))
    models: dict[str, nn.Module] = {c: copy.deepcopy(base) for c in CONTENDERS}
    models["channels_last"] = models["channels_last"].to(memory_format=torch.channels_last)
    optimizers = {"torch": make_torch(models["torch"], rule, fused=True)}
    for layout in CONTENDERS[1:]:
        assign_grads(models[layout], grads)
        optimizers[layout], start = make_bame(models[layout], n, m, "ordinary",
                                              BAME_METHOD[rule], rule)
        for _ in range(start):  # the step-0 mask draw
            optimizers[layout].step()

    def before(contender: str) -> None:
        assign_grads(models[contender], grads)

    return interleaved_rounds({c: o.step for c, o in optimizers.items()}, rounds, warmup,
                              Timer(torch.device("cpu")), before=before)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet32", "resnet50"],
                        choices=list(BENCH_MODELS))
    parser.add_argument("--patterns", nargs="+", type=nm_pattern, default=[(2, 4), (1, 16)])
    parser.add_argument("--rules", nargs="+", choices=("sgd", "adamw"), default=["sgd", "adamw"])
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    for flag, least in (("rounds", 2), ("warmup", 0)):
        if getattr(args, flag) < least:
            parser.error(f"Invalid --{flag} value: {getattr(args, flag)} (at least {least})")
    print(f"{machine('cpu')}; {args.rounds} rounds; median ms [interquartile range]; BAME "
          "fused=True, torch fused=True on the contiguous model")
    print(f"{'model':10} {'N:M':5} {'rule':5} " + " ".join(f"{c:>21}" for c in CONTENDERS)
          + "  cont/torch  last/torch  last/cont [rounds' IQR]")
    rows = []
    for name in args.models:
        for (n, m), rule in ((p, r) for p in args.patterns for r in args.rules):
            times = time_layouts(name, n, m, rule, args.rounds, args.warmup)
            med = {c: statistics.median(times[c]) for c in CONTENDERS}
            q1, q3 = ratio_quartiles(times["channels_last"], times["contiguous"])
            rows.append({"model": name, "pattern": f"{n}:{m}", "rule": rule, **med,
                         "last_vs_contiguous_q1": q1, "last_vs_contiguous_q3": q3})
            print(f"{name:10} {n}:{m:<3} {rule:5} "
                  + " ".join(f"{summary(times[c]):>21}" for c in CONTENDERS)
                  + f"  {med['contiguous'] / med['torch']:10.3f}"
                  f"  {med['channels_last'] / med['torch']:10.3f}"
                  f"  {med['channels_last'] / med['contiguous']:9.3f} [{q1:.2f}-{q3:.2f}]",
                  flush=True)
    return rows


if __name__ == "__main__":
    main()
