"""Host time of the Triton kept step: the Python a CUDA ``step()`` runs before its launches.

On a GPU a step whose kernels take a fraction of a millisecond is bound by the host: per sparse
parameter the check of :func:`bame_optim.kernels.triton_kept.supports` (which path, as
:func:`bame_optim.kernels.ops.usable` asks it), and inside
:func:`~bame_optim.kernels.triton_kept.kept_sgd_` / ``kept_adamw_`` the state check, the
signature and layout, AdamW's step counter and the row of the launch table. This times those
two calls per model, N:M pattern and rule: the median microseconds per step and per sparse
parameter. On the CPU the kernels record their launches instead of running
(:func:`tools.triton_static.recorded_launches`, so run it from the root of a checkout: ``tools``
is not installed); on CUDA they launch, the GPU not waited for::

    .venv/bin/python -m benchmarks.triton_host
    .venv/bin/python -m benchmarks.triton_host --device cuda --models resnet50
"""

from __future__ import annotations

import argparse
import itertools
import statistics
from contextlib import AbstractContextManager, nullcontext

import torch

from bame_optim.core.kept import encode_kept
from bame_optim.core.nm import random_nm_mask
from bame_optim.kernels import triton_kept

from .harness import (
    ADAMW_HYPER,
    SGD_HYPER,
    HostTimer,
    build_model,
    interleaved_rounds,
    machine,
    nm_pattern,
    params_of,
    resolve_device,
    sparse_groups,
)


def host_step(model: torch.nn.Module, n: int, m: int, rule: str, device: torch.device):
    """One Triton kept step of ``rule`` (``sgd`` with momentum, ``adamw``) over ``model``'s
    sparse weights with random N:M masks, with the path check before it, as a call; and the
    number of sparse weights."""
    params = params_of(sparse_groups(model, n, m), sparse=True)
    generator = torch.Generator().manual_seed(0)
    grads = [torch.randn_like(p) for p in params]
    kept = [encode_kept(random_nm_mask(p.numel() // m, n, m, generator), n).to(device)
            for p in params]
    counts = [n] * len(params)

    def state() -> list[torch.Tensor]:
        return [p.new_zeros(p.numel() // m, n) for p in params]

    if rule == "sgd":
        buffers, first = state(), [False] * len(params)

        def kept_step() -> None:
            triton_kept.kept_sgd_(params, grads, buffers, kept, counts, first, m=m,
                                  **SGD_HYPER)
    else:
        moments = (state(), state())
        steps = [torch.tensor(0.0) for _ in params]  # CPU scalars, as torch keeps them

        def kept_step() -> None:
            triton_kept.kept_adamw_(params, grads, *moments, [], steps, kept, counts, m=m,
                                    **ADAMW_HYPER)

    def step() -> None:
        if not all(triton_kept.supports(p, g) for p, g in zip(params, grads, strict=True)):
            raise RuntimeError("the Triton kernels do not take these parameters")
        kept_step()

    return step, len(params)


def _kernels_on(device: torch.device) -> AbstractContextManager:
    """Off CUDA, the kernels' launches recorded instead of run (the host functions then take
    CPU tensors); on CUDA nothing changes."""
    if device.type == "cuda":
        return nullcontext()
    from tools.triton_static import recorded_launches  # a checkout's, not installed

    return recorded_launches()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet32", "resnet50", "gpt2_small"])
    parser.add_argument("--patterns", nargs="+", type=nm_pattern, default=[(2, 4)])
    parser.add_argument("--rules", nargs="+", choices=("sgd", "adamw"), default=["sgd", "adamw"])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    device = resolve_device(parser, args.device)
    print(f"host time of the Triton kept step, {machine(device)}, median of {args.rounds} rounds")
    print("| model | N:M | rule | sparse weights | host us per step | us per sparse weight |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        model = build_model(name, device)
        for (n, m), rule in itertools.product(args.patterns, args.rules):
            step, count = host_step(model, n, m, rule, device)
            with _kernels_on(device), torch.no_grad():
                rounds = interleaved_rounds({"host": step}, args.rounds, 3, HostTimer(device))
            us = 1000 * statistics.median(rounds["host"])
            print(f"| {name} | {n}:{m} | {rule} | {count} | {us:.0f} | {us / count:.1f} |")


if __name__ == "__main__":
    main()
