"""The fused CPU kept kernels' AVX-512 paths against their AVX2 paths and torch's fused step.

For each model, N:M pattern and rule (SGD, AdamW) it times one ordinary step of the kept
kernel on the model's sparse weights (by default only the 3x3 convolutions, the layers the
AVX-512 tiles take; ``--layers all`` for every weight whose dim 1 divides by M) three ways,
in the same process and interleaved (the order rotates every round):

* ``torch``: ``torch.optim.sgd.sgd`` / ``torch.optim.adamw.adamw`` with ``fused=True`` on the
  same weights, dense;
* ``avx512``: :func:`bame_optim.kernels.kept_sgd_cpu.fused_kept_sgd_` /
  :func:`~bame_optim.kernels.kept_adamw_cpu.fused_kept_adamw_` with ``avx512=True``;
* ``avx2``: the same with ``avx512=False``.

It prints the median milliseconds with the interquartile range, and the ratios of the medians
(``avx512/torch``, ``avx2/torch``, ``avx512/avx2``). On a machine shared with other work only
the ratios measured in one run mean much. Hyper-parameters: SGD lr 0.1, momentum 0.9, weight
decay 5e-4; AdamW lr 1e-3, weight decay 0.05. Steady state: momentum and moments present.

Run from the repository root::

    .venv/bin/python -m benchmarks.kept_simd_ab                      # resnet50 resnet32, 2:4 1:16
    .venv/bin/python -m benchmarks.kept_simd_ab --threads 1 --rounds 31
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
from torch.optim.adamw import adamw
from torch.optim.sgd import sgd

from bame_optim.core.kept import encode_kept
from bame_optim.core.nm import random_nm_mask
from bame_optim.kernels import kept_adamw_cpu, kept_sgd_cpu

from .harness import (
    ADAMW_HYPER,
    SGD_HYPER,
    Timer,
    build_model,
    interleaved_rounds,
    machine,
    nm_pattern,
)

CONTENDERS = ("torch", "avx512", "avx2")


def shapes_of(model: str, m: int, layers: str) -> list[torch.Size]:
    """Shapes of ``model``'s sparse weights: dim 1 divisible by ``m``, ``ndim >= 2``; with
    ``layers="3x3"`` only 3x3 convolution weights."""
    shapes = [p.shape for p in build_model(model, torch.device("cpu")).parameters()]
    shapes = [s for s in shapes if len(s) >= 2 and s[1] % m == 0]
    if layers == "3x3":
        shapes = [s for s in shapes if tuple(s[2:]) == (3, 3)]
    return shapes


def steps(shapes: list[torch.Size], n: int, m: int, rule: str) -> dict[str, Callable[[], None]]:
    """One step of each contender on its own copy of the same weights and state."""
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(s, generator=gen) for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    kept = [encode_kept(random_nm_mask(p.numel() // m, n, m, gen), n) for p in base]
    counts = [n] * len(base)

    def compact() -> list[torch.Tensor]:
        return [torch.rand(p.numel() // m, n, generator=gen) for p in base]

    calls: dict[str, Callable[[], None]] = {}
    if rule == "sgd":
        dense_buffers = [torch.rand_like(p) for p in base]
        weights = [p.clone() for p in base]
        calls["torch"] = lambda: sgd(weights, grads, dense_buffers, fused=True, foreach=False,
                                     **SGD_HYPER)
        for name in ("avx512", "avx2"):
            ws, buffers = [p.clone() for p in base], compact()
            calls[name] = (lambda ws=ws, buffers=buffers, wide=name == "avx512":
                           kept_sgd_cpu.fused_kept_sgd_(ws, grads, buffers, kept, counts, m=m,
                                                        avx512=wide, **SGD_HYPER))
        return calls
    hyper = {k: v for k, v in ADAMW_HYPER.items()}
    weights = [p.clone() for p in base]
    moments = [torch.zeros_like(p) for p in base], [torch.rand_like(p) for p in base]
    dense_steps = [torch.tensor(5.0) for _ in base]
    calls["torch"] = lambda: adamw(weights, grads, *moments, [], dense_steps, fused=True,
                                   foreach=False, **hyper)
    for name in ("avx512", "avx2"):
        ws, exp_avgs, exp_avg_sqs = [p.clone() for p in base], compact(), compact()
        state_steps = [torch.tensor(5.0) for _ in base]
        calls[name] = (lambda ws=ws, m1=exp_avgs, m2=exp_avg_sqs, st=state_steps,
                       wide=name == "avx512":
                       kept_adamw_cpu.fused_kept_adamw_(ws, grads, m1, m2, [], st, kept, counts,
                                                        m=m, avx512=wide, **hyper))
    return calls


def summary(values: list[float]) -> str:
    """``median [q1-q3]`` (inclusive quartiles: within the values, as
    :func:`benchmarks.harness.ratio_quartiles`)."""
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return f"{median:7.2f} [{q1:.2f}-{q3:.2f}]"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "resnet32"])
    parser.add_argument("--patterns", nargs="+", type=nm_pattern, default=[(2, 4), (1, 16)])
    parser.add_argument("--rules", nargs="+", choices=("sgd", "adamw"), default=["sgd", "adamw"])
    parser.add_argument("--layers", choices=("3x3", "all"), default="3x3",
                        help="which sparse weights: 3x3 convolutions (default) or all")
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if not (kept_sgd_cpu.available() and kept_adamw_cpu.available()):
        raise SystemExit(f"the kept kernels are unavailable: {kept_sgd_cpu.error()}")
    print(f"{machine('cpu')}, CPU has AVX-512: {kept_sgd_cpu.cpu_has_avx512()}, "
          f"{args.rounds} rounds, layers {args.layers}; median ms [interquartile range]")
    header = f"{'model':9} {'N:M':5} {'rule':5} " + " ".join(f"{c:>21}" for c in CONTENDERS)
    print(header + "  avx512/torch avx2/torch avx512/avx2")
    for model in args.models:
        for n, m in args.patterns:
            shapes = shapes_of(model, m, args.layers)
            if not shapes:
                continue
            for rule in args.rules:
                times = interleaved_rounds(steps(shapes, n, m, rule), args.rounds,
                                           args.warmup, Timer(torch.device("cpu")))
                med = {name: statistics.median(times[name]) for name in CONTENDERS}
                print(f"{model:9} {n}:{m:<3} {rule:5} "
                      + " ".join(f"{summary(times[c]):>21}" for c in CONTENDERS)
                      + f"  {med['avx512'] / med['torch']:12.3f} {med['avx2'] / med['torch']:10.3f}"
                      f" {med['avx512'] / med['avx2']:11.3f}", flush=True)


if __name__ == "__main__":
    main()
