"""The BAME optimizers' ordinary step with the model contiguous and in the channels-last memory
format, against torch's fused step (contiguous, its fastest), interleaved in one process.

Runs of :mod:`benchmarks.step` with and without ``--channels-last`` are two runs, and their
ratios move by +-0.15 between runs on a shared machine; here the three steps of a (model,
pattern, rule) share every round, so ``channels_last / contiguous`` is one measurement. Each
optimizer steps its own copy of the model with the same fixed gradients (in the copy's layout,
as autograd gives them), ``fused=True`` for all three. It prints the median milliseconds with
the interquartile range, each BAME step over torch's, and channels-last over contiguous with
the quartiles of the per-round ratios. ``--train-batch`` times whole training steps instead
(forward and backward in each copy's layout, the input too), so the convolutions' own change
shows with the optimizer's. Run from the repository root::

    .venv/bin/python -m benchmarks.layout_ab --models resnet50 --patterns 2:4 1:16
    .venv/bin/python -m benchmarks.layout_ab --models resnet32 --train-batch 128 --rules sgd
"""

from __future__ import annotations

import argparse
import copy
import statistics
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

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
    regrad,
    require_at_least,
)
from .kept_simd_ab import summary
from .step_timing import BAME_METHOD, INPUT, make_bame, make_torch

CONTENDERS = ("torch", "contiguous", "channels_last")


def time_layouts(name: str, n: int, m: int, rule: str, rounds: int, warmup: int,
                 batch: int | None = None) -> dict[str, list[float]]:
    """Milliseconds per round of torch's fused step and BAME's ordinary step on a contiguous
    and on a channels-last copy of model ``name``; with ``batch``, of whole training steps
    (``zero_grad``, forward and backward of ``batch`` random inputs of the model's
    :data:`~benchmarks.step_timing.INPUT` shape in the copy's layout, ``step``)."""
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
    timer = Timer(torch.device("cpu"))
    if batch is None:
        return interleaved_rounds({c: o.step for c, o in optimizers.items()}, rounds, warmup,
                                  timer, before=regrad(models, grads))
    classes, channels, size = INPUT[name]
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(batch, channels, size, size, generator=generator)
    y = torch.randint(0, classes, (batch,), generator=generator)

    def training_step(contender: str) -> Callable[[], None]:
        last = contender == "channels_last"
        inputs = x.contiguous(memory_format=torch.channels_last) if last else x

        def run() -> None:
            optimizers[contender].zero_grad()
            F.cross_entropy(models[contender](inputs), y).backward()
            optimizers[contender].step()

        return run

    return interleaved_rounds({c: training_step(c) for c in CONTENDERS}, rounds, warmup, timer)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet32", "resnet50"],
                        choices=list(BENCH_MODELS))
    parser.add_argument("--patterns", nargs="+", type=nm_pattern, default=[(2, 4), (1, 16)])
    parser.add_argument("--rules", nargs="+", choices=("sgd", "adamw"), default=["sgd", "adamw"])
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--train-batch", type=int, default=None, metavar="BATCH",
                        help="time whole training steps of this batch instead of optimizer "
                        f"steps (models: {', '.join(INPUT)})")
    args = parser.parse_args(argv)
    require_at_least(parser, args, {"rounds": 2, "warmup": 0, "train_batch": 1})
    if args.train_batch is not None:
        for name in args.models:
            if name not in INPUT:
                parser.error(f"Invalid --models value: {name!r} with --train-batch (a model "
                             f"with an input shape: {', '.join(INPUT)})")
    what = ("optimizer steps" if args.train_batch is None
            else f"training steps of batch {args.train_batch} (forward, backward, step)")
    print(f"{machine('cpu')}; {what}; {args.rounds} rounds; median ms [interquartile range]; "
          "BAME fused=True, torch fused=True on the contiguous model")
    print(f"{'model':10} {'N:M':5} {'rule':5} " + " ".join(f"{c:>21}" for c in CONTENDERS)
          + "  cont/torch  last/torch  last/cont [rounds' IQR]")
    rows = []
    for name in args.models:
        for (n, m), rule in ((p, r) for p in args.patterns for r in args.rules):
            times = time_layouts(name, n, m, rule, args.rounds, args.warmup, args.train_batch)
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
