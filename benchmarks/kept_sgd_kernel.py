"""The fused CPU kept-SGD kernel against the eager composition and ``SGD(foreach=True)``.

For each model's parameter set and N:M pattern, with fixed random gradients and steady-state
momentum (buffers already present), it times one ordinary optimizer step four ways, in the
same process and interleaved (the order rotates every round, so machine noise hits all of them),
and reports the median over rounds:

* ``sgd``: :func:`torch.optim.sgd.sgd` with ``foreach=True`` on every parameter, dense;
* ``eager``: per sparse parameter ``kept_indices`` + ``gather_kept`` (weights and gradients),
  one :func:`torch.optim.sgd.sgd` (``foreach=True``) over the gathered copies, ``scatter_kept_``;
* ``fused``: :func:`bame_optim.kernels.kept_sgd_cpu.fused_kept_sgd_` on the sparse parameters;
* ``all``: one ``fused_kept_sgd_`` call on the sparse and the dense parameters (``kept`` None).

``eager`` and ``fused`` also step the dense parameters (biases, norms, weights whose dim 1
does not divide by M) with ``sgd(foreach=True)``, as the optimizer does. Sparse parameters are
the ``ndim >= 2`` weights whose dim 1 divides by M. Hyper-parameters: lr 0.1, momentum 0.9,
weight decay 5e-4. Targets: fused <= 1.1x SGD at 2:4 and < 1.0x at 1:16.

Run from the repository root::

    .venv/bin/python -m benchmarks.kept_sgd_kernel                    # all models, 2:4 1:4 1:16
    .venv/bin/python -m benchmarks.kept_sgd_kernel --models resnet32 --rounds 20
    .venv/bin/python -m benchmarks.kept_sgd_kernel --threads 1     # steadier on a busy machine
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import Tensor
from torch.optim.sgd import sgd

from bame_apps.integrations.models import MODELS
from bame_optim.core.kept import encode_kept, gather_kept, kept_indices, scatter_kept_
from bame_optim.core.nm import random_nm_mask
from bame_optim.kernels import kept_sgd_cpu

from .harness import (
    SGD_HYPER,
    Timer,
    build_model,
    interleaved_rounds,
    machine,
    medians,
    nm_pattern,
)

DEFAULT_MODELS = ("resnet32", "resnet50", "deit_small")
DEFAULT_PATTERNS = ((2, 4), (1, 4), (1, 16))


class Setup:
    """One model's parameters split into sparse (with kept sets) and dense, with gradients,
    and three independent copies of parameters and momentum, one per contender."""

    def __init__(self, shapes: list[torch.Size], n: int, m: int, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.n, self.m = n, m
        base = [torch.randn(s, generator=gen) for s in shapes]
        self.grads = [torch.randn(s, generator=gen) for s in shapes]
        self.sparse = [i for i, s in enumerate(shapes) if len(s) >= 2 and s[1] % m == 0]
        self.dense = [i for i in range(len(shapes)) if i not in set(self.sparse)]
        self.kept = [
            encode_kept(random_nm_mask(base[i].numel() // m, n, m, gen), n) for i in self.sparse
        ]
        self.counts = [n] * len(self.sparse)
        contenders = ("sgd", "eager", "fused", "all")
        self.params = {name: [p.clone() for p in base] for name in contenders}
        self.sgd_buffers: list[Tensor | None] = [torch.randn_like(p) for p in base]
        self.buffers: dict[str, dict[str, list[Tensor | None]]] = {}
        for name in ("eager", "fused", "all"):
            self.buffers[name] = {
                "sparse": [
                    torch.randn(base[i].numel() // m, n, generator=gen) for i in self.sparse
                ],
                "dense": [torch.randn_like(base[i]) for i in self.dense],
            }
        self.buffers["all"]["all"] = [*self.buffers["all"]["sparse"], *self.buffers["all"]["dense"]]

    def sparse_numel(self) -> int:
        return sum(self.grads[i].numel() for i in self.sparse)

    def step_sgd(self) -> None:
        sgd(self.params["sgd"], self.grads, self.sgd_buffers, foreach=True, **SGD_HYPER)

    def _step_dense(self, name: str) -> None:
        params = [self.params[name][i] for i in self.dense]
        grads = [self.grads[i] for i in self.dense]
        sgd(params, grads, self.buffers[name]["dense"], foreach=True, **SGD_HYPER)

    def step_eager(self) -> None:
        m = self.m
        params = [self.params["eager"][i] for i in self.sparse]
        grads = [self.grads[i] for i in self.sparse]
        positions = [kept_indices(k, c, m) for k, c in zip(self.kept, self.counts, strict=True)]
        weights = [gather_kept(p, i, m) for p, i in zip(params, positions, strict=True)]
        kept_grads = [gather_kept(g, i, m) for g, i in zip(grads, positions, strict=True)]
        sgd(weights, kept_grads, self.buffers["eager"]["sparse"], foreach=True, **SGD_HYPER)
        for p, i, w in zip(params, positions, weights, strict=True):
            scatter_kept_(p, i, w, m)
        self._step_dense("eager")

    def step_fused(self) -> None:
        kept_sgd_cpu.fused_kept_sgd_(
            [self.params["fused"][i] for i in self.sparse],
            [self.grads[i] for i in self.sparse],
            self.buffers["fused"]["sparse"],
            self.kept,
            self.counts,
            m=self.m,
            **SGD_HYPER,
        )
        self._step_dense("fused")

    def step_all(self) -> None:
        """Sparse and dense parameters in one kernel call (``kept`` None for the dense)."""
        order = self.sparse + self.dense
        kept_sgd_cpu.fused_kept_sgd_(
            [self.params["all"][i] for i in order],
            [self.grads[i] for i in order],
            self.buffers["all"]["all"],
            [*self.kept, *[None] * len(self.dense)],
            [*self.counts, *[None] * len(self.dense)],
            m=self.m,
            **SGD_HYPER,
        )


def model_shapes(name: str) -> list[torch.Size]:
    """The parameter shapes of model ``name``."""
    return [p.shape for p in build_model(name, torch.device("cpu")).parameters()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=MODELS)
    parser.add_argument(
        "--patterns", nargs="+", type=nm_pattern, default=list(DEFAULT_PATTERNS), metavar="N:M"
    )
    parser.add_argument("--rounds", type=int, default=40, help="timed rounds (median)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: unchanged)"
    )
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    start = time.perf_counter()
    if not kept_sgd_cpu.available():
        raise SystemExit("the fused kernel is unavailable (see the warning above)")
    seconds = kept_sgd_cpu.compile_seconds() or time.perf_counter() - start
    print(
        f"kernel ready in {seconds:.1f} s (build or cache load); {machine('cpu')}; "
        f"{args.rounds} interleaved rounds, median"
    )
    for model in args.models:
        shapes = model_shapes(model)
        total = sum(s.numel() for s in shapes)
        print(f"\n{model} ({total / 1e6:.2f} M parameters)")
        print(
            f"{'N:M':>5} {'sparse':>7} {'sgd ms':>8} {'eager ms':>9} {'fused ms':>9} "
            f"{'all ms':>7} {'eager/sgd':>10} {'fused/sgd':>10} {'all/sgd':>8}"
        )
        for n, m in args.patterns:
            setup = Setup(shapes, n, m)
            steps = {
                "sgd": setup.step_sgd,
                "eager": setup.step_eager,
                "fused": setup.step_fused,
                "all": setup.step_all,
            }
            t = medians(interleaved_rounds(steps, args.rounds, args.warmup,
                                           Timer(torch.device("cpu"))))
            share = setup.sparse_numel() / total
            sgd = t["sgd"]
            print(
                f"{n}:{m:<3} {share:>7.1%} {sgd:>8.2f} {t['eager']:>9.2f} "
                f"{t['fused']:>9.2f} {t['all']:>7.2f} "
                f"{t['eager'] / sgd:>9.2f}x {t['fused'] / sgd:>9.2f}x {t['all'] / sgd:>7.2f}x"
            )


if __name__ == "__main__":
    main()
