"""torch's fused step over one param group against over ``nm_param_groups``' groups, in one
process: how much the step benchmark's choice of baseline moves its ratios.

:mod:`benchmarks.step` gives torch one group over ``model.parameters()`` (the one-line swap of
the quick start) and BAME ``nm_param_groups(model, n, m)``: sparse weights, dense weights and
1-D parameters without weight decay, so one fused call per group. Here torch's own fused
optimizer steps two copies of a model, one over each grouping, interleaved, with the same fixed
gradients; ``groups / one`` near 1 says the grouping is not what the benchmark's ratios
measure. Run from the repository root::

    .venv/bin/python -m benchmarks.baseline_groups
    .venv/bin/python -m benchmarks.baseline_groups --models resnet32 --rules sgd --rounds 41
"""

from __future__ import annotations

import argparse
import copy
import statistics
from typing import Any

import torch
from torch.optim import Optimizer

from .harness import (
    BENCH_MODELS,
    Timer,
    build_model,
    fixed_grads,
    interleaved_rounds,
    machine,
    ratio_quartiles,
    regrad,
    require_at_least,
    sparse_groups,
)
from .kept_simd_ab import summary
from .step_timing import HYPER, TORCH, make_torch

GROUP_KEYS = ("params", "weight_decay")
"""What torch's optimizer takes of each ``nm_param_groups`` group (the rest is BAME's)."""


def grouped_torch(model: torch.nn.Module, rule: str, n: int, m: int) -> Optimizer:
    """torch's fused optimizer of ``rule`` over ``nm_param_groups(model, n, m)``'s groups, with
    their weight decay and the step benchmark's other hyper-parameters."""
    groups = [{k: g[k] for k in GROUP_KEYS if k in g} for g in sparse_groups(model, n, m)]
    return TORCH[rule](groups, **(HYPER[rule] | {"foreach": False, "fused": True}))


def time_groupings(name: str, rule: str, rounds: int, warmup: int, n: int = 2, m: int = 4
                   ) -> dict[str, list[float]]:
    """Milliseconds per round of torch's fused step over one group (``"one"``) and over
    ``nm_param_groups``' groups (``"groups"``), each on its own copy of model ``name``."""
    base = build_model(name, torch.device("cpu"))
    grads = fixed_grads(base, torch.device("cpu"))
    one, grouped = copy.deepcopy(base), copy.deepcopy(base)
    optimizers = {"one": make_torch(one, rule, fused=True),
                  "groups": grouped_torch(grouped, rule, n, m)}
    before = regrad({"one": one, "groups": grouped}, grads)
    return interleaved_rounds({c: o.step for c, o in optimizers.items()}, rounds, warmup,
                              Timer(torch.device("cpu")), before=before)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(BENCH_MODELS),
                        default=["resnet32", "resnet50", "deit_small", "gpt2_small"])
    parser.add_argument("--rules", nargs="+", choices=("sgd", "adamw"), default=["sgd", "adamw"])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    require_at_least(parser, args, {"rounds": 2, "warmup": 0})
    print(f"{machine('cpu')}; torch fused=True; {args.rounds} rounds; median ms "
          "[interquartile range]")
    print(f"{'model':10} {'rule':5} {'one group':>21} {'nm_param_groups':>21}  "
          "groups/one [rounds' IQR]")
    rows = []
    for name in args.models:
        for rule in args.rules:
            times = time_groupings(name, rule, args.rounds, args.warmup)
            med = {c: statistics.median(v) for c, v in times.items()}
            q1, q3 = ratio_quartiles(times["groups"], times["one"])
            rows.append({"model": name, "rule": rule, **med, "q1": q1, "q3": q3})
            print(f"{name:10} {rule:5} {summary(times['one']):>21} "
                  f"{summary(times['groups']):>21}  {med['groups'] / med['one']:10.3f} "
                  f"[{q1:.2f}-{q3:.2f}]", flush=True)
    return rows


if __name__ == "__main__":
    main()
