"""Step benchmark of the fused kept kernels: BAMESGD / BAMEAdamW against torch's fused optimizers.

Per model, N:M pattern and rule (``sgd``, ``adamw``), with fixed random gradients and no
forward or backward, the median time of

* ``fused``: ``torch.optim.SGD(fused=True)`` / ``torch.optim.AdamW(fused=True)``, the baseline,
* ``ordinary``: a BAME ordinary step (mask fixed; on CUDA the Triton kernels of
  :mod:`bame_optim.kernels.triton_kept`),
* ``update``: a BAME evolve-phase mask-update step (every step is one),
* ``compiled``: ``torch.compile`` of the BAME optimizer's ``step`` (ordinary steps; the update
  runs through the ``bame_optim::kept_*_`` ops),

interleaved round by round (:func:`benchmarks.harness.interleaved_rounds`), and each one's ratio to
``fused``; then, in a second interleaved pass, each one's host time
(:class:`benchmarks.harness.HostTimer`: until ``step()`` returns, the GPU not waited for). A
step whose host time is near its time is bound by its launches (one Triton launch per kernel
signature, about 8 us of Python per sparse parameter to check it and build its table:
``benchmarks.triton_host``) and Python, not by
the GPU. Both sides pass ``fused=True`` (BAME's dense
parameters then take torch's fused step too, and a sparse one the kernels cannot take raises
instead of falling back to the eager path). Written for CUDA (``python -m tools.gpu_check``
runs it); ``--device cpu`` is a smoke run of the same code (torch's fused CPU optimizers and
the native kept kernels there)::

    python -m benchmarks.kept_step_cuda                                  # cuda, defaults
    python -m benchmarks.kept_step_cuda --quick
    python -m benchmarks.kept_step_cuda --device cpu --quick --no-compile --models resnet32
    python -m benchmarks.kept_step_cuda --quick --channels-last --models resnet50
"""

from __future__ import annotations

import argparse
import copy
import sys
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from bame_optim import BAMESGD, BAMEAdamW

from .harness import (
    HostTimer,
    Timer,
    assign_grads,
    build_model,
    fixed_grads,
    interleaved_rounds,
    machine,
    medians,
    nm_pattern,
    regrad,
    resolve_device,
    schedule,
    sparse_groups,
)

HYPER = {
    "sgd": {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4},
    "adamw": {"lr": 1e-3, "weight_decay": 0.05},
}
"""The hyper-parameters of both optimizers of each rule."""


def make_optimizers(
    models: dict[str, nn.Module], rule: str, n: int, m: int
) -> dict[str, Optimizer]:
    """The baseline (``fused``) and the BAME optimizers of ``rule`` over their own models."""
    bame = BAMESGD if rule == "sgd" else BAMEAdamW
    base = torch.optim.SGD if rule == "sgd" else torch.optim.AdamW
    hyper = HYPER[rule]
    optimizers: dict[str, Optimizer] = {
        "fused": base(models["fused"].parameters(), **hyper, fused=True)
    }
    for kind in ("ordinary", "update", "compiled"):
        if kind in models:
            keywords = schedule("update" if kind == "update" else "ordinary")
            groups = sparse_groups(models[kind], n, m)
            optimizers[kind] = bame(groups, n=n, m=m, **hyper, **keywords, fused=True)
    return optimizers


def time_rule(
    model_name: str, rule: str, pattern: tuple[int, int], device: torch.device, *,
    steps: int, warmup: int, compile_step: bool, channels_last: bool = False,
) -> dict[str, Any]:
    """Median milliseconds of each kind of step and their ratios to the fused baseline (with
    ``channels_last`` the BAME optimizers' models in that memory format, the baseline's
    contiguous)."""
    n, m = pattern
    base = build_model(model_name, device)
    grads = fixed_grads(base, device)
    kinds = ["fused", "ordinary", "update"] + (["compiled"] if compile_step else [])
    models = {kind: copy.deepcopy(base) for kind in kinds}
    if channels_last:
        for kind in kinds[1:]:
            models[kind] = models[kind].to(memory_format=torch.channels_last)
    optimizers = make_optimizers(models, rule, n, m)
    for kind, optimizer in optimizers.items():  # step 0: state created, the mask drawn
        assign_grads(models[kind], grads)
        optimizer.step()
    calls = {kind: optimizer.step for kind, optimizer in optimizers.items()}
    if compile_step:
        calls["compiled"] = torch.compile(optimizers["compiled"].step)
    before = regrad(models, grads)
    times = medians(interleaved_rounds(calls, steps, warmup, Timer(device), before=before))
    host = medians(interleaved_rounds(calls, steps, warmup, HostTimer(device), before=before))
    row: dict[str, Any] = {"model": model_name, "pattern": f"{n}:{m}", "rule": rule}
    for kind in kinds:
        row[f"{kind}_ms"] = times[kind]
        row[f"{kind}_host_ms"] = host[kind]
    for kind in kinds[1:]:
        row[f"{kind}_ratio"] = times[kind] / times["fused"]
    return row


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table: times and ratios to torch's fused optimizer, and host times."""
    kinds = [k for k in ("ordinary", "update", "compiled") if f"{k}_ms" in rows[0]]
    head = ["model", "N:M", "rule", "fused ms"] + [f"{k} ms (x fused)" for k in kinds]
    head += [f"{k} host ms" for k in ("fused", *kinds)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["model"], row["pattern"], row["rule"], f"{row['fused_ms']:.3f}"]
        cells += [f"{row[f'{k}_ms']:.3f} ({row[f'{k}_ratio']:.2f}x)" for k in kinds]
        cells += [f"{row[f'{k}_host_ms']:.3f}" for k in ("fused", *kinds)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, torch.device]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="device (%(default)s)")
    parser.add_argument("--models", nargs="+", default=["resnet32", "resnet50"])
    parser.add_argument("--patterns", nargs="+", type=nm_pattern, default=[(2, 4), (1, 16)])
    parser.add_argument("--rules", nargs="+", choices=tuple(HYPER), default=list(HYPER))
    parser.add_argument("--steps", type=int, default=50, help="timed rounds (%(default)s)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed rounds (%(default)s)")
    parser.add_argument("--quick", action="store_true", help="10 rounds, 2 of warm-up")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled step")
    parser.add_argument("--channels-last", action="store_true",
                        help="BAME's models in the channels-last memory format (torch's fused "
                        "baseline keeps the contiguous one)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup = 10, 2
    return args, resolve_device(parser, args.device)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Time every (model, pattern, rule), print the table; the rows."""
    args, device = parse_args(argv)
    layout = "; BAME's models channels-last" if args.channels_last else ""
    print(f"{machine(device)}; medians of {args.steps} interleaved rounds after {args.warmup} "
          f"warm-up rounds{layout}", flush=True)
    rows = []
    for model in args.models:
        for pattern in args.patterns:
            for rule in args.rules:
                row = time_rule(model, rule, pattern, device, steps=args.steps,
                                warmup=args.warmup, compile_step=not args.no_compile,
                                channels_last=args.channels_last)
                rows.append(row)
                print(", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                for k, v in row.items()), flush=True)
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
