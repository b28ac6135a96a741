"""The timing loops of the optimizer-step benchmark (:mod:`benchmarks.step`): the optimizers of
each update rule, configured so that every timed step is of the kind asked, and their
interleaved medians against torch's ``foreach`` and ``fused`` optimizers of the same rule."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.optim import Optimizer
from tqdm import tqdm

from bame_optim.core.schedule import is_update_step
from bame_optim.methods import accepted_keywords, make_optimizer

from .harness import (
    ADAMW_HYPER,
    FAR,
    GRADUAL_LEAD,
    SGD_HYPER,
    Timer,
    assign_grads,
    build_model,
    fixed_grads,
    interleaved_rounds,
    medians,
    ratio_quartiles,
    regrad,
    schedule,
    sparse_groups,
    step_bytes,
)

__all__ = [
    "BAME_METHOD",
    "CHANNELS_LAST_NOTE",
    "HYPER",
    "INPUT",
    "make_bame",
    "time_adamw_steps",
    "time_sgd_steps",
    "time_training_step",
    "update_flags",
]

HYPER: dict[str, dict[str, Any]] = {
    "sgd": {k: SGD_HYPER[k] for k in ("lr", "momentum", "weight_decay")} | {"foreach": True},
    "adamw": {k: ADAMW_HYPER[k] for k in ("lr", "weight_decay")} | {"foreach": True},
}
"""The hyper-parameters every optimizer of a rule gets (torch's included): the kernel
benchmarks' values (:data:`benchmarks.harness.SGD_HYPER`, ``ADAMW_HYPER``; AdamW's are DeiT's),
the rest torch's defaults."""
TORCH: dict[str, type[Optimizer]] = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}
"""The torch optimizer of each rule."""
CHANNELS_LAST_NOTE = (
    "BAME's models in the channels-last memory format (their N:M blocks contiguous rows); "
    "torch's optimizers step contiguous copies: their fused step is about 2.4x slower on "
    "channels_last weights, so this compares with torch's fastest step"
)
"""What ``--channels-last`` times, as the report says it."""
BAME_METHOD = {"sgd": "bame", "adamw": "bame_adamw"}
"""The BAME method of each rule (:data:`bame_optim.methods.METHODS`)."""
INPUT = {"resnet32": (10, 3, 32), "resnet50": (1000, 3, 224), "deit_small": (1000, 3, 224)}
"""(classes, channels, image size) of each model's training-step input."""


def make_bame(
    model: nn.Module, n: int, m: int, kind: str, method: str = "bame", rule: str = "sgd"
) -> tuple[Optimizer, int]:
    """An optimizer of ``method`` over ``model`` with ``rule``'s hyper-parameters, configured
    for ``kind`` steps (:func:`benchmarks.harness.schedule`), and how many steps to run before
    the configuration holds (the step-0 mask draw). Methods that take ``fused`` get
    ``fused=True``; for ``kind="gradual"`` the step counter starts at ``FAR - GRADUAL_LEAD``."""
    keywords = schedule(kind)
    groups = sparse_groups(model, n, m)
    fused = {"fused": True, "foreach": False} if "fused" in accepted_keywords(method) else {}
    optimizer = make_optimizer(method, groups, **(HYPER[rule] | fused), n=n, m=m, **keywords)
    if kind == "gradual":
        for group in optimizer.param_groups:
            group["step"] = FAR - GRADUAL_LEAD
    return optimizer, 1


def make_torch(model: nn.Module, rule: str, fused: bool) -> Optimizer:
    """torch's optimizer of ``rule`` over ``model``: ``foreach=True``, or ``fused=True``."""
    extra = {"foreach": False, "fused": True} if fused else {}
    return TORCH[rule](model.parameters(), **(HYPER[rule] | extra))


def update_flags(optimizer: Optimizer) -> list[bool]:
    """Whether the next ``step()`` is a mask-update step, per sparse param group (empty for an
    optimizer without a BAME schedule, such as ``torch.optim.SGD``)."""
    return [
        is_update_step(g["step"], g["delta_t"], g["t_i"], g["t_f"])
        for g in optimizer.param_groups
        if g.get("sparse") and "t_i" in g
    ]


def _expect(kind: str, optimizers: dict[str, Optimizer]) -> Callable[[str], None]:
    """A ``before`` hook that raises unless the next step of ``optimizers[name]`` is a
    mask-update step exactly when ``name == kind`` (and ``kind`` is not ordinary)."""

    def before(name: str) -> None:
        want = kind != "ordinary" and name == kind
        if any(f != want for f in update_flags(optimizers[name])):
            what = "a mask-update" if want else "an ordinary"
            raise RuntimeError(f"{name}: the next step is not {what} step")

    return before


def time_sgd_steps(
    model_name: str,
    pattern: tuple[int, int],
    device: torch.device,
    steps: int,
    update_steps: int,
    warmup: int,
    methods: list[str],
    bar: tqdm | None = None,
    channels_last: bool = False,
) -> dict[str, Any]:
    """Median ms of SGD, ordinary steps of every method in ``methods`` and BAME update steps
    (evolve and gradual phase) on ``model_name``'s parameters at ``pattern`` (with
    ``channels_last`` the methods' copies of the model in that memory format, torch's left
    contiguous: its fastest layout, see :data:`CHANNELS_LAST_NOTE`). Keys: ``sgd``,
    ``sgd_fused`` (``fused=True``), ``sgd_u`` / ``sgd_g`` (the SGD partners of the update-step
    loops), ``ordinary:<method>``, ``update`` (evolve), ``gradual``; ``params`` (the count),
    ``bytes_dense`` / ``bytes_sparse`` (what an ordinary SGD / BAMESGD step moves);
    ``fused_quartiles:<method>``, the quartiles of the per-round ratios of the method's
    ordinary step to ``sgd_fused`` (:func:`benchmarks.harness.ratio_quartiles`).

    Gradients are assigned once (a step does not change them). The ordinary steps of SGD,
    SGD(fused) and every method are interleaved in one loop; each update kind in its own
    loop with SGD, of ``update_steps`` rounds after at most 2 warm-up rounds. Every timed step
    is checked to be of its kind before it runs."""
    n, m = pattern
    timer = Timer(device)
    base = build_model(model_name, device)
    grads = fixed_grads(base, device)

    def setup(kind: str, method: str = "bame") -> Optimizer:
        model = copy.deepcopy(base)
        if channels_last and method not in ("sgd", "sgd_fused"):
            model = model.to(memory_format=torch.channels_last)
        assign_grads(model, grads)
        if method in ("sgd", "sgd_fused"):
            return make_torch(model, "sgd", fused=method == "sgd_fused")
        optimizer, start = make_bame(model, n, m, kind, method)
        for _ in range(start):  # the step-0 mask draw, not part of either configuration
            optimizer.step()
        return optimizer

    sgd = setup("ordinary", "sgd")
    optimizers = {"sgd": sgd, "sgd_fused": setup("ordinary", "sgd_fused"),
                  **{f"ordinary:{name}": setup("ordinary", name) for name in methods}}
    rounds = interleaved_rounds({k: o.step for k, o in optimizers.items()}, steps, warmup,
                                timer, _expect("ordinary", optimizers), bar)
    result: dict[str, Any] = medians(rounds)
    for name in methods:
        result[f"fused_quartiles:{name}"] = ratio_quartiles(rounds[f"ordinary:{name}"],
                                                            rounds["sgd_fused"])
    del optimizers
    for kind, partner in (("update", "sgd_u"), ("gradual", "sgd_g")):
        optimizers = {"sgd": sgd, kind: setup(kind)}
        upd = medians(interleaved_rounds({k: o.step for k, o in optimizers.items()},
                                         update_steps, min(warmup, 2), timer,
                                         _expect(kind, optimizers), bar))
        result[partner], result[kind] = upd["sgd"], upd[kind]
    result["params"] = sum(p.numel() for p in base.parameters())
    groups = sparse_groups(base, n, m)
    result["bytes_dense"] = step_bytes(groups, None, None, "sgd")
    result["bytes_sparse"] = step_bytes(groups, n, m, "sgd")
    return result


def time_adamw_steps(
    model_name: str,
    pattern: tuple[int, int],
    device: torch.device,
    steps: int,
    warmup: int,
    bar: tqdm | None = None,
    channels_last: bool = False,
) -> dict[str, Any]:
    """Median ms of AdamW (``adamw``: ``foreach=True``; ``adamw_fused``), and of BAMEAdamW's
    ordinary (``ordinary``) and evolve-phase update (``update``) steps on ``model_name``'s
    parameters at ``pattern`` (BAMEAdamW's copies in the channels-last memory format with
    ``channels_last``, as in :func:`time_sgd_steps`), all four interleaved in one loop, each
    on its own copy of the model, the gradients reassigned (untimed) before every step;
    ``params`` (the count), ``bytes_dense`` / ``bytes_sparse`` (what an ordinary AdamW /
    BAMEAdamW step moves) and ``fused_quartiles`` (of the per-round ratios of ``ordinary`` to
    ``adamw_fused``)."""
    n, m = pattern
    kinds = ("adamw", "adamw_fused", "ordinary", "update")
    models = {kind: build_model(model_name, device,
                                channels_last=channels_last and kind in ("ordinary", "update"))
              for kind in kinds}
    grads = fixed_grads(models["adamw"], device)
    optimizers: dict[str, Optimizer] = {
        "adamw": make_torch(models["adamw"], "adamw", fused=False),
        "adamw_fused": make_torch(models["adamw_fused"], "adamw", fused=True),
        "ordinary": make_bame(models["ordinary"], n, m, "ordinary", "bame_adamw", "adamw")[0],
        "update": make_bame(models["update"], n, m, "update", "bame_adamw", "adamw")[0],
    }
    for kind, optimizer in optimizers.items():  # step 0: state created, the mask drawn
        assign_grads(models[kind], grads)
        optimizer.step()
    rounds = interleaved_rounds({kind: o.step for kind, o in optimizers.items()}, steps,
                                warmup, Timer(device), before=regrad(models, grads), bar=bar)
    result: dict[str, Any] = medians(rounds)
    result["fused_quartiles"] = ratio_quartiles(rounds["ordinary"], rounds["adamw_fused"])
    result["params"] = sum(p.numel() for p in models["adamw"].parameters())
    groups = sparse_groups(models["adamw"], n, m)
    result["bytes_dense"] = step_bytes(groups, None, None, "adamw")
    result["bytes_sparse"] = step_bytes(groups, n, m, "adamw")
    return result


def time_training_step(
    model_name: str,
    patterns: list[tuple[int, int]],
    device: torch.device,
    batch: int,
    steps: int,
    warmup: int,
    bar: tqdm | None = None,
    channels_last: bool = False,
) -> dict[str, float]:
    """Median ms of a whole training step (``zero_grad``, forward, backward, ``step``) on
    random data of the model's input shape, with SGD and with BAMESGD (ordinary steps) at each
    pattern, all interleaved (with ``channels_last`` every model and the input in that memory
    format). Keys ``sgd`` and ``n:m`` per pattern."""
    classes, channels, size = INPUT[model_name]
    generator = torch.Generator(device="cpu").manual_seed(2)
    x = torch.randn(batch, channels, size, size, generator=generator).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,), generator=generator).to(device)
    base = build_model(model_name, device, channels_last=channels_last)
    models = {"sgd": copy.deepcopy(base)}
    optimizers: dict[str, Optimizer] = {"sgd": make_torch(models["sgd"], "sgd", fused=False)}
    for n, m in patterns:
        models[f"{n}:{m}"] = model = copy.deepcopy(base)
        optimizers[f"{n}:{m}"] = make_bame(model, n, m, "ordinary")[0]

    def train_step(name: str) -> Callable[[], None]:
        def run() -> None:
            optimizers[name].zero_grad()
            F.cross_entropy(models[name](x), y).backward()
            optimizers[name].step()

        return run

    # at least one warm-up round: the first BAMESGD step draws the mask (not ordinary)
    return medians(interleaved_rounds(
        {name: train_step(name) for name in models}, steps, max(warmup, 1), Timer(device), None, bar
    ))
