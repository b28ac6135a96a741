"""What every benchmark shares: the command-line pieces (N:M patterns, ``--device``, CSV
output, the line naming the machine), the model-shape sets and their N:M groups and fixed
gradients, the schedules that make a timed step ordinary or a mask update, the interleaved
timer and its medians, and the bytes an optimizer step moves (to report GB/s against torch's
fused step)."""

from __future__ import annotations

import argparse
import csv
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from bame_apps.integrations.models import MODELS
from bame_optim import nm_param_groups

__all__ = [
    "ADAMW_HYPER",
    "BENCH_MODELS",
    "FAR",
    "GPT2_SMALL_LINEARS",
    "GRADUAL_LEAD",
    "SCHEDULE_KINDS",
    "SGD_HYPER",
    "HostTimer",
    "Timer",
    "assign_grads",
    "build_model",
    "fixed_grads",
    "gbps",
    "in_channels_last",
    "interleaved_rounds",
    "machine",
    "medians",
    "nm_pattern",
    "params_of",
    "ratio_quartiles",
    "regrad",
    "require_at_least",
    "resolve_device",
    "schedule",
    "sparse_groups",
    "step_bytes",
    "write_csv",
]

SGD_HYPER: dict[str, Any] = {"lr": 0.1, "momentum": 0.9, "dampening": 0.0, "weight_decay": 5e-4,
                             "nesterov": False, "maximize": False}
"""Every keyword of a functional kept-SGD call (``torch.optim.sgd.sgd`` takes the same) in the
kernel benchmarks."""
ADAMW_HYPER: dict[str, Any] = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "weight_decay": 0.05,
                               "eps": 1e-8, "amsgrad": False, "maximize": False}
"""Every keyword of a functional kept-AdamW call in the kernel benchmarks (DeiT's lr scale and
weight decay)."""

# ----------------------------------------------------------------------------- command line


def nm_pattern(text: str) -> tuple[int, int]:
    """``argparse`` type of an ``N:M`` pattern such as ``2:4`` (``1 <= N < M``)."""
    try:
        n, m = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid N:M pattern {text!r} (e.g. 2:4)") from None
    if not 1 <= n < m:
        raise argparse.ArgumentTypeError(f"invalid N:M pattern {text!r} (need 1 <= N < M)")
    return n, m


def require_at_least(parser: argparse.ArgumentParser, args: argparse.Namespace,
                     least: dict[str, int]) -> None:
    """A parser error naming the flag and its value for the first of ``args``' attributes in
    ``least`` given below its bound (``None``: not given, no check)."""
    for name, bound in least.items():
        value = getattr(args, name)
        if value is not None and value < bound:
            parser.error(f"Invalid --{name.replace('_', '-')} value: {value} (at least {bound})")


def resolve_device(parser: argparse.ArgumentParser, name: str) -> torch.device:
    """The device ``name``, after allocating on it; an unusable one is a parser error."""
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as err:
        parser.error(f"argument --device: cannot use {name!r}: {err}")
    return device


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Write ``rows`` (dicts with the same keys) to ``path`` as CSV, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def machine(device: torch.device | str) -> str:
    """``"device cpu, torch 2.x, 2 threads"``: what a printed timing was measured on."""
    return f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads"


# ----------------------------------------------------------------------------- models


GPT2_SMALL_LINEARS = (("c_attn", 2304, 768), ("attn_c_proj", 768, 768), ("c_fc", 3072, 768),
                      ("mlp_c_proj", 768, 3072))
"""``(name, out, in)`` of the four Linear layers of each of GPT-2 small's 12 blocks (N:M along
the input dimension, 768 or 3072); embeddings and layer norms are left out."""


def gpt2_small_linears() -> nn.Module:
    """GPT-2 small's 48 block Linear layers (85M weights) as ``[out, in]`` ``nn.Linear``
    weights (HF stores them as Conv1D ``[in, out]``; the step moves the same bytes)."""
    return nn.Sequential(*[
        nn.Linear(d_in, d_out) for _ in range(12) for _, d_out, d_in in GPT2_SMALL_LINEARS
    ])


BENCH_MODELS = {**MODELS, "gpt2_small": gpt2_small_linears}
"""The models of :data:`bame_apps.integrations.models.MODELS` and the GPT-2-small shapes."""


def build_model(name: str, device: torch.device, seed: int = 0, *,
                channels_last: bool = False) -> nn.Module:
    """Model ``name`` of :data:`BENCH_MODELS` on ``device``, initialised after
    ``torch.manual_seed(seed)``; with ``channels_last`` its 4-D weights in that memory format
    (``nn.Module.to(memory_format=torch.channels_last)``)."""
    torch.manual_seed(seed)
    model = BENCH_MODELS[name]().to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def in_channels_last(tensor: Tensor) -> Tensor:
    """``tensor`` in torch's channels-last memory format where it has one (4-D:
    ``channels_last``, 5-D: ``channels_last_3d``), else ``tensor`` itself."""
    layout = {4: torch.channels_last, 5: torch.channels_last_3d}.get(tensor.ndim)
    return tensor if layout is None else tensor.contiguous(memory_format=layout)


def fixed_grads(model: nn.Module, device: torch.device, seed: int = 1) -> list[Tensor]:
    """Standard-normal gradients of ``model``'s parameters' shapes, drawn on the CPU from a
    generator seeded ``seed`` (the same numbers on every device), on ``device`` in each
    parameter's memory layout (as autograd gives them)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return [torch.empty_like(p, device=device).copy_(torch.randn(p.shape, generator=generator))
            for p in model.parameters()]


def assign_grads(model: nn.Module, grads: list[Tensor]) -> None:
    """Give ``model``'s parameters copies of the fixed gradients ``grads``, each in its
    parameter's memory layout (as autograd gives them)."""
    for p, g in zip(model.parameters(), grads, strict=True):
        p.grad = torch.empty_like(p).copy_(g)


def regrad(models: dict[str, nn.Module], grads: list[Tensor]) -> Callable[[str], None]:
    """An :func:`interleaved_rounds` ``before`` hook that gives ``models[name]`` the fixed
    gradients ``grads`` (:func:`assign_grads`) before each of its timed steps."""

    def before(name: str) -> None:
        assign_grads(models[name], grads)

    return before


def sparse_groups(model: nn.Module, n: int, m: int) -> list[dict[str, Any]]:
    """``nm_param_groups(model, n, m)`` without the warnings about layers left dense."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return nm_param_groups(model, n, m)


def params_of(groups: list[dict[str, Any]], sparse: bool | None = None) -> list[Tensor]:
    """The parameters of ``nm_param_groups``-style groups (items may be ``(name, p)`` pairs):
    all of them, or only those of the sparse (``sparse=True``) or dense groups."""
    return [item[1] if isinstance(item, tuple) else item
            for g in groups if sparse is None or bool(g.get("sparse")) == sparse
            for item in g["params"]]


# ----------------------------------------------------------------------------- schedules


FAR = 10**9
"""A ``t_f`` no benchmark run reaches."""
GRADUAL_LEAD = 10**6
"""Gradual-phase runs start this many steps before ``t_i = FAR``, where the budget
``n + ceil((m - n) * GRADUAL_LEAD / FAR)`` (:func:`bame_optim.core.schedule.gradual_budget`)
is ``n + 1`` per block."""
SCHEDULE_KINDS = ("ordinary", "update", "gradual")
"""What every timed step after the first is: ordinary, an evolve-phase or a gradual-phase
mask update (:func:`schedule`)."""


def schedule(kind: str) -> dict[str, int]:
    """The schedule keywords that make every step from the second on a ``kind`` step.

    ``"ordinary"``: ``t_i = t_f = 0`` (the mask drawn at step 0, frozen after: no later step
    is an update step). ``"update"``: ``t_i = 0``, ``t_f`` far away, ``delta_t = 1``: every
    step from 1 on is an evolve-phase update. ``"gradual"``: ``t_i = t_f`` far away,
    ``delta_t = 1``; the caller starts the step counter at ``FAR - GRADUAL_LEAD``, where the
    first step prunes every block to ``n + 1`` and every later one is a gradual update keeping
    that budget.
    """
    if kind == "ordinary":
        return {"t_i": 0, "t_f": 0}
    if kind == "update":
        return {"t_i": 0, "t_f": FAR, "total_steps": FAR, "delta_t": 1}
    if kind == "gradual":
        return {"t_i": FAR, "t_f": FAR, "total_steps": FAR, "delta_t": 1}
    raise ValueError(f"Invalid kind value: {kind!r} (one of {SCHEDULE_KINDS})")


# ----------------------------------------------------------------------------- timing


class Timer:
    """Wall time of a call in milliseconds; on CUDA with events, synchronising around it."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], Any]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        begin = time.perf_counter()
        fn()
        return 1000 * (time.perf_counter() - begin)


class HostTimer(Timer):
    """Milliseconds until a call returns, the device idle when it starts and not waited for
    after: the host's share of a CUDA step (Python, checks, kernel launches). A step whose
    host time is close to its :class:`Timer` time is bound by launches, not by the GPU. On
    the CPU it is the wall time, as :class:`Timer`."""

    def __call__(self, fn: Callable[[], Any]) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        begin = time.perf_counter()
        fn()
        return 1000 * (time.perf_counter() - begin)


def interleaved_rounds(
    calls: dict[str, Callable[[], Any]],
    steps: int,
    warmup: int,
    timer: Timer,
    before: Callable[[str], None] | None = None,
    bar: tqdm | None = None,
) -> dict[str, list[float]]:
    """Milliseconds of each call in each of ``steps`` rounds after ``warmup`` untimed ones.

    Each round runs every call once, in an order rotated by one every round, so slow phases
    of the machine hit every call alike. ``before(name)`` runs (untimed) before each call.
    """
    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(warmup + steps):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            if before is not None:
                before(name)
            ms = timer(calls[name])
            if r >= warmup:
                times[name].append(ms)
        if bar is not None:
            bar.update()
    return times


def medians(rounds: dict[str, list[float]]) -> dict[str, float]:
    """The median of each call's rounds (of :func:`interleaved_rounds`)."""
    return {name: statistics.median(values) for name, values in rounds.items()}


def ratio_quartiles(numerator: list[float], denominator: list[float]) -> tuple[float, float]:
    """The first and third quartiles of the per-round ratios ``numerator[r] /
    denominator[r]`` of two calls timed in the same rounds: how far one run's ratio of
    medians may be trusted (the machine's slow phases move both calls of a round alike, and
    the ratio's spread shows what they do not). One round gives its ratio twice. Inclusive
    quartiles: they stay within the ratios seen (the exclusive method extrapolates past them
    for a few rounds, below 0 for two)."""
    ratios = [a / b for a, b in zip(numerator, denominator, strict=True)]
    if len(ratios) < 2:
        return ratios[0], ratios[0]
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return q1, q3


# ----------------------------------------------------------------------------- bandwidth


def step_bytes(groups: list[dict[str, Any]], n: int | None, m: int | None, optimizer: str) -> int:
    """Bytes one ordinary step must move, at least, for ``nm_param_groups``-style ``groups``.

    A dense (torch fused) step reads weight, gradient and state and writes weight and state:
    5 words per weight for SGD with momentum, 7 for AdamW. A compact step reads whole cache
    lines of weight and gradient and writes the weight's back (3 words per weight) but reads
    and writes the state of the kept ``n / m`` only (2 words for SGD, 4 for AdamW). With
    ``n`` None every group counts as dense (the torch optimizer)."""
    state_words = {"sgd": 1, "adamw": 2}[optimizer]
    dense = sum(p.numel() * p.element_size() for p in params_of(groups, sparse=False))
    sparse = sum(p.numel() * p.element_size() for p in params_of(groups, sparse=True))
    if n is None or m is None:
        return (dense + sparse) * (3 + 2 * state_words)
    return dense * (3 + 2 * state_words) + round(sparse * (3 + 2 * state_words * n / m))


def gbps(num_bytes: int, ms: float) -> float:
    """GB/s of moving ``num_bytes`` in ``ms`` milliseconds."""
    return num_bytes / ms / 1e6
