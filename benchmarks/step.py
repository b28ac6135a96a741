"""Optimizer-step benchmark: BAMESGD against ``torch.optim.SGD`` (``--optimizer sgd``, the
default) or BAMEAdamW against ``torch.optim.AdamW`` (``--optimizer adamw``), each with
``foreach=True`` and with ``fused=True``, in the same run.

For each model's parameter set and N:M pattern (sparse layers from ``nm_param_groups``), with
fixed random gradients assigned to ``.grad`` (no forward or backward), it times
(:mod:`benchmarks.step_timing`)

* (a) ordinary steps: the schedule is ``t_i = t_f = 0`` (random N:M mask at step 0, then the
  frozen phase), so no timed step is an update step,
* (b) evolve-phase mask-update steps: ``t_i = 0``, ``t_f`` far away and ``delta_t = 1``, so
  every timed step is an evolve-phase update (LMA + OBF, then the update; BAMEAdamW revives
  with the ``lr·|G|`` score),
* (b') SGD only: gradual-phase mask-update steps: ``t_i = t_f`` far away, ``delta_t = 1``,
  and the step counter started late in the gradual phase
  (:data:`benchmarks.harness.GRADUAL_LEAD` steps before ``t_i``), where the budget is
  ``n + 1`` per block: after the first (untimed) step prunes to it, every timed step is a
  gradual update that keeps the budget (magnitude pruning, then the SGD update), as all but
  the few budget-dropping updates of a run are,

interleaved with torch's steps on identical copies of the parameters (the order rotates every
round, so machine noise hits all of them) and summarised by the median of many steps after a
warm-up, with the ratios to both torch optimizers (the ratio to the fused one with the
interquartile range of its per-round ratios, :func:`benchmarks.harness.ratio_quartiles`: how
far one run's ratio can be trusted) and the GB/s of the bytes each step must move
(:func:`benchmarks.harness.step_bytes`); the BAME optimizer gets ``fused=True`` (the native
kernel for sparse weights, torch's fused step for dense ones) over ``nm_param_groups``' groups,
torch's optimizers one group over ``model.parameters()`` (the quick start's swap;
:mod:`benchmarks.baseline_groups` times what that choice costs torch).

* SGD (lr 0.1, momentum 0.9, weight decay 5e-4): the ordinary steps of SGD, SGD(fused) and
  every ``--methods`` are interleaved in one loop, each update kind in its own loop with SGD.
  Every timed step is checked with :func:`bame_optim.core.schedule.is_update_step`. The
  mask-update overhead (evolve update step minus ordinary step) is amortised over ΔT = 100 and
  reported as a percentage of (c) a whole training step (forward + backward + optimizer step)
  of ResNet-32 on CIFAR-shaped random data (batch 128 x 3 x 32 x 32), BAMESGD and SGD
  interleaved. Targets: ordinary step <= 1.1x SGD(foreach) at 2:4 and < 1.0x at 1:16, and
  <= 1.0x SGD(fused) at 2:4 and <= 0.7x at 1:16; amortised mask-update cost < 2% of a
  training step; on ResNet-50 at 2:4 and 1:16 an update step (evolve and gradual) <= 10x an
  ordinary step. The columns of ``docs/results/step.csv``.
* AdamW (lr 1e-3, weight decay 0.05: DeiT's): AdamW, AdamW(fused) and BAMEAdamW's ordinary
  and update steps interleaved in one loop, the gradients reassigned before every step.
  Target (issue 19): an ordinary step <= 1.0x ``AdamW(fused=True)`` at 2:4 and <= 0.6x at
  1:16. The columns of ``docs/results/step_adamw.csv``.

``--channels-last`` puts the BAME optimizers' models in the channels-last memory format, where
a convolution's N:M blocks are contiguous rows (the kernels' fast row paths); torch's
optimizers keep the contiguous model, since their fused step is about 2.4x slower on
channels_last weights (ResNet-50's 3x3 weights: 7.3 against 2.8 ms), so the ratios are to
torch's fastest step. Write such runs to a CSV of their own.

Models: ResNet-32, ResNet-50, DeiT-small and GPT-2 small's 48 block Linear layers
(``gpt2_small``, :mod:`benchmarks.harness`). The SGD defaults took 9 minutes on 2 shared, busy
CPU cores before GPT-2 small was added (``--quick``: a smoke run of about a minute per
model)::

    .venv/bin/python -m benchmarks.step                                # cpu, all models
    .venv/bin/python -m benchmarks.step --csv docs/results/step.csv    # record the table
    .venv/bin/python -m benchmarks.step --quick --models resnet32      # seconds
    .venv/bin/python -m benchmarks.step --optimizer adamw --csv docs/results/step_adamw.csv
    .venv/bin/python -m benchmarks.step --channels-last --models resnet32 resnet50
    .venv/bin/python -m benchmarks.step --device cuda --train-models resnet32 resnet50 deit_small
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from bame_optim.methods import METHODS

from .harness import BENCH_MODELS, machine, nm_pattern, resolve_device, write_csv
from .step_report import (
    SGD_TARGETS,
    adamw_row,
    format_adamw_table,
    format_table,
    sgd_rows,
    training_lines,
)
from .step_timing import (
    CHANNELS_LAST_NOTE,
    HYPER,
    INPUT,
    time_adamw_steps,
    time_sgd_steps,
    time_training_step,
)

DEFAULT_MODELS = ("resnet32", "resnet50", "deit_small", "gpt2_small")
DEFAULT_PATTERNS = {"sgd": ((2, 4), (1, 4), (1, 16)), "adamw": ((2, 4), (1, 16))}
DEFAULT_STEPS = {"sgd": (40, 60), "adamw": (20, 20)}
"""Timed ordinary steps of each rule, on the CPU and on a GPU (``--quick``: 5)."""
SGD_ONLY = ("methods", "update_steps", "train_models", "train_batch", "train_steps")
"""The flags of the SGD rule only."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd",
                        help="BAMESGD against SGD (default) or BAMEAdamW against AdamW")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS),
                        choices=list(BENCH_MODELS))
    parser.add_argument("--patterns", nargs="+", type=nm_pattern, default=None,
                        help="N:M patterns (default: 2:4 1:4 1:16; adamw: 2:4 1:16)")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        choices=[m for m in METHODS if m != "dense"],
        help="sgd: methods whose ordinary step is timed (update steps: bame only; default: bame)",
    )
    parser.add_argument("--steps", type=int, default=None,
                        help="timed ordinary steps (default 40, 60 on GPU; adamw: 20)")
    parser.add_argument("--update-steps", type=int, default=None,
                        help="sgd: timed update steps of each phase (default 6, 30 on GPU)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    parser.add_argument(
        "--train-models",
        nargs="*",
        default=None,
        choices=list(INPUT),
        help="sgd: models whose whole training step is timed for the amortised update cost "
        "(default resnet32; resnet50 and deit_small take 224 x 224 input: GPU advised)",
    )
    parser.add_argument("--train-batch", type=int, default=None,
                        help="sgd: training-step batch (default 128)")
    parser.add_argument("--train-steps", type=int, default=None,
                        help="sgd: timed training steps (default 10, 30 on GPU)")
    parser.add_argument("--channels-last", action="store_true",
                        help="BAME's models in the channels-last memory format (torch's stay "
                        "contiguous, its fastest; training steps: every model and the input)")
    parser.add_argument("--quick", action="store_true", help="few steps: a smoke run")
    parser.add_argument("--csv", type=Path, default=None, help="also write the table here")
    args = parser.parse_args(argv)
    _defaults(parser, args)
    for name in ("steps", "update_steps", "train_steps", "train_batch"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"argument --{name.replace('_', '-')}: must be >= 1")
    if args.warmup < 0:
        parser.error("argument --warmup: must be >= 0")
    args.device = resolve_device(parser, args.device)
    return args


def _defaults(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fill in the defaults of ``args.optimizer``'s rule (on the device, ``--quick``); a flag
    of the SGD rule given with another is a parser error."""
    gpu, quick, sgd = args.device.startswith("cuda"), args.quick, args.optimizer == "sgd"
    for name in () if sgd else SGD_ONLY:
        if getattr(args, name) is not None:
            parser.error(f"argument --{name.replace('_', '-')}: only with --optimizer sgd")
    if args.patterns is None:
        args.patterns = list(DEFAULT_PATTERNS[args.optimizer])
    if args.steps is None:
        args.steps = 5 if quick else DEFAULT_STEPS[args.optimizer][gpu]
    if quick:
        args.warmup = min(args.warmup, 1)
    if sgd:
        args.methods = args.methods or ["bame"]
        args.train_models = ["resnet32"] if args.train_models is None else args.train_models
        args.train_batch = 128 if args.train_batch is None else args.train_batch
        if args.update_steps is None:
            args.update_steps = 2 if quick else (30 if gpu else 6)
        if args.train_steps is None:
            args.train_steps = 3 if quick else (30 if gpu else 10)


def run_sgd(args: argparse.Namespace) -> tuple[list[dict[str, Any]], str]:
    """Time every (model, pattern) of ``args`` and the training steps of ``--train-models``:
    the rows and the printed report."""
    train_models = [name for name in args.train_models if name in args.models]
    jobs = [(name, pattern) for name in args.models for pattern in args.patterns]
    rounds_per_job = args.steps + args.warmup + 2 * (args.update_steps + min(args.warmup, 2))
    total = len(jobs) * rounds_per_job + len(train_models) * (
        args.train_steps + max(args.warmup, 1)
    )
    rows: list[dict[str, Any]] = []
    train: dict[str, dict[str, float]] = {}
    start = time.perf_counter()
    with tqdm(total=total, desc="rounds", unit="round") as bar:
        for name, pattern in jobs:
            bar.set_postfix_str(f"{name} {pattern[0]}:{pattern[1]} optimizer steps")
            times = time_sgd_steps(name, pattern, args.device, args.steps, args.update_steps,
                                   args.warmup, args.methods, bar, args.channels_last)
            if name in train_models and name not in train:
                bar.set_postfix_str(f"{name} training steps")
                train[name] = time_training_step(name, args.patterns, args.device,
                                                 args.train_batch, args.train_steps,
                                                 args.warmup, bar, args.channels_last)
            rows += sgd_rows(name, pattern, times, train.get(name), args.methods)
    hyper = HYPER["sgd"]
    header = (
        f"\n{machine(args.device)}; lr {hyper['lr']} momentum {hyper['momentum']} weight decay "
        f"{hyper['weight_decay']}, foreach=True for both (SGD fused=True against BAMESGD "
        f"fused=True in the fused columns); medians of {args.steps} ordinary and "
        f"{args.update_steps} update steps per phase after {args.warmup} warm-up rounds, "
        f"interleaved with SGD; {time.perf_counter() - start:.0f} s{_layout(args)}"
    )
    lines = training_lines(train, args.train_batch, args.train_steps)
    return rows, "\n".join([header, format_table(rows), *lines, SGD_TARGETS])


def run_adamw(args: argparse.Namespace) -> tuple[list[dict[str, Any]], str]:
    """Time every (model, pattern) of ``args`` with the AdamW rule: the rows and the printed
    report."""
    jobs = [(name, pattern) for name in args.models for pattern in args.patterns]
    rows = []
    start = time.perf_counter()
    with tqdm(total=len(jobs) * (args.steps + args.warmup), desc="rounds", unit="round") as bar:
        for name, pattern in jobs:
            bar.set_postfix_str(f"{name} {pattern[0]}:{pattern[1]}")
            times = time_adamw_steps(name, pattern, args.device, args.steps, args.warmup, bar,
                                     args.channels_last)
            rows.append(adamw_row(name, pattern, times))
    hyper = HYPER["adamw"]
    header = (
        f"\nBAMEAdamW against torch.optim.AdamW(foreach=True) and (fused=True); "
        f"{machine(args.device)}; lr {hyper['lr']} weight decay {hyper['weight_decay']}; "
        f"medians of {args.steps} interleaved rounds after {args.warmup} warm-up rounds; "
        f"{time.perf_counter() - start:.0f} s{_layout(args)}"
    )
    return rows, "\n".join([header, format_adamw_table(rows)])


def _layout(args: argparse.Namespace) -> str:
    """The header's note on ``--channels-last`` (nothing without it)."""
    return f"; {CHANNELS_LAST_NOTE}" if args.channels_last else ""


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the benchmark of ``--optimizer``, print its report; the rows."""
    args = parse_args(argv)
    rows, report = (run_sgd if args.optimizer == "sgd" else run_adamw)(args)
    print(report)
    if args.csv is not None:
        write_csv(rows, args.csv)
        print(f"wrote {args.csv}")
    return rows


if __name__ == "__main__":
    main()
