"""What the step benchmarks share: the models (with the GPT-2-small shape set), their N:M groups
and gradients, the interleaved timer, and the bytes an optimizer step moves (to report GB/s
against torch's fused step)."""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from bame_optim import nm_param_groups
from bame_optim.integrations.models import MODELS

__all__ = [
    "BENCH_MODELS",
    "GPT2_SMALL_LINEARS",
    "Timer",
    "assign_grads",
    "build_model",
    "gbps",
    "interleaved",
    "sparse_groups",
    "step_bytes",
]

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
"""The models of :data:`bame_optim.integrations.models.MODELS` and the GPT-2-small shapes."""


def build_model(name: str, device: torch.device, seed: int = 0) -> nn.Module:
    """Model ``name`` of :data:`BENCH_MODELS` on ``device``."""
    torch.manual_seed(seed)
    return BENCH_MODELS[name]().to(device)


def _params(groups: list[dict[str, Any]], sparse: bool) -> list[Tensor]:
    return [item[1] if isinstance(item, tuple) else item
            for g in groups if bool(g.get("sparse")) == sparse for item in g["params"]]


def step_bytes(groups: list[dict[str, Any]], n: int | None, m: int | None, optimizer: str) -> int:
    """Bytes one ordinary step must move, at least, for ``nm_param_groups``-style ``groups``.

    A dense (torch fused) step reads weight, gradient and state and writes weight and state:
    5 words per weight for SGD with momentum, 7 for AdamW. A compact step reads whole cache
    lines of weight and gradient and writes the weight's back (3 words per weight) but reads
    and writes the state of the kept ``n / m`` only (2 words for SGD, 4 for AdamW). With
    ``n`` None every group counts as dense (the torch optimizer)."""
    state_words = {"sgd": 1, "adamw": 2}[optimizer]
    dense = sum(p.numel() * p.element_size() for p in _params(groups, False))
    sparse = sum(p.numel() * p.element_size() for p in _params(groups, True))
    if n is None or m is None:
        return (dense + sparse) * (3 + 2 * state_words)
    return dense * (3 + 2 * state_words) + round(sparse * (3 + 2 * state_words * n / m))


def gbps(num_bytes: int, ms: float) -> float:
    """GB/s of moving ``num_bytes`` in ``ms`` milliseconds."""
    return num_bytes / ms / 1e6


def sparse_groups(model: nn.Module, n: int, m: int) -> list[dict[str, Any]]:
    """``nm_param_groups(model, n, m)`` without the warnings about layers left dense."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return nm_param_groups(model, n, m)


def assign_grads(model: nn.Module, grads: list[Tensor]) -> None:
    """Give ``model``'s parameters clones of the fixed gradients ``grads``."""
    for p, g in zip(model.parameters(), grads, strict=True):
        p.grad = g.clone()


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


def interleaved(
    calls: dict[str, Callable[[], Any]],
    steps: int,
    warmup: int,
    timer: Timer,
    before: Callable[[str], None] | None = None,
    bar: tqdm | None = None,
) -> dict[str, float]:
    """Median milliseconds of each call over ``steps`` rounds after ``warmup`` untimed ones.

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
    return {name: statistics.median(values) for name, values in times.items()}
