"""Host time of the Triton kept step: the Python a CUDA ``step()`` runs before its launches.

On a GPU a step whose kernels take a fraction of a millisecond is bound by the host: per sparse
parameter the checks of :func:`bame_optim.kernels.ops.usable` (which path),
:func:`bame_optim.kernels.triton_kept._check_state` and ``_items`` (signature and layout), for
AdamW its step counter (``_advance``), and its row of the launch table (``_launch``). This times
exactly those calls, with no kernel launched, per model, N:M pattern and rule: the median
microseconds per step and per sparse parameter. On CUDA tensors it includes the table's pinned
copy; on the CPU it needs ``TRITON_INTERPRET=1`` (the kernels' device is then the CPU), which
is how it runs without a GPU::

    TRITON_INTERPRET=1 .venv/bin/python -m benchmarks.triton_host
    .venv/bin/python -m benchmarks.triton_host --device cuda --models resnet50
"""

from __future__ import annotations

import argparse
import itertools
import statistics

import torch

from bame_optim.core.kept import encode_kept
from bame_optim.core.nm import random_nm_mask
from bame_optim.kernels import ops, triton_kept

from .harness import (
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
    """The host part of one Triton kept step of ``rule`` (``sgd`` with momentum, ``adamw``)
    over ``model``'s sparse weights with random N:M masks, as a call; and the number of
    sparse weights."""
    params = params_of(sparse_groups(model, n, m), sparse=True)
    generator = torch.Generator().manual_seed(0)
    grads = [torch.randn_like(p) for p in params]
    kept = [encode_kept(random_nm_mask(p.numel() // m, n, m, generator), n).to(device)
            for p in params]
    states = [[p.new_zeros(p.numel() // m, n) for p in params]
              for _ in range(1 if rule == "sgd" else 2)]
    steps = [torch.tensor(0.0) for _ in params]  # AdamW's: CPU scalars, as torch keeps them
    counts = [n] * len(params)

    def step() -> None:
        if device.type == "cuda" and not ops.usable(params, grads, None):
            raise RuntimeError("the Triton kernels do not take these parameters")
        triton_kept._check_state(params, states, counts, m)
        items = triton_kept._items(params, grads, kept, counts, m)
        scalars: tuple[float, ...] = ()
        if rule == "adamw":
            triton_kept._advance(steps)
            scalars = (1e-3, 1.0)
        launches: dict[tuple, list] = {}
        for i, key, layout in items:
            launches.setdefault(key, []).append((i, layout, scalars))
        for signature, rows in launches.items():
            triton_kept._launch(rows, signature, params, grads, states, kept, m)

    return step, len(params)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet32", "resnet50", "gpt2_small"])
    parser.add_argument("--patterns", nargs="+", type=nm_pattern, default=[(2, 4)])
    parser.add_argument("--rules", nargs="+", choices=("sgd", "adamw"), default=["sgd", "adamw"])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    device = resolve_device(parser, args.device)
    if device.type != "cuda" and not triton_kept.interpreting():
        parser.error("on the CPU set TRITON_INTERPRET=1 (the kernels' device is then the CPU)")
    torch.set_grad_enabled(False)
    print(f"host time of the Triton kept step, {machine(device)}, median of {args.rounds} rounds")
    print("| model | N:M | rule | sparse weights | host us per step | us per sparse weight |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        model = build_model(name, device)
        for (n, m), rule in itertools.product(args.patterns, args.rules):
            step, count = host_step(model, n, m, rule, device)
            rounds = interleaved_rounds({"host": step}, args.rounds, 3, HostTimer(device))
            us = 1000 * statistics.median(rounds["host"])
            print(f"| {name} | {n}:{m} | {rule} | {count} | {us:.0f} | {us / count:.1f} |")


if __name__ == "__main__":
    main()
