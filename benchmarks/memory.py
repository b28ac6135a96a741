"""Optimizer-state memory benchmark: bytes of state per method and schedule phase, against the
dense torch optimizer of the method's family (SGD or AdamW).

For each model and N:M pattern (sparse layers from ``nm_param_groups``), every method of
:data:`bame_optim.methods.METHODS` is built with ``make_optimizer`` (the hyper-parameters of
its family, :data:`HYPER`: SGD methods lr 0.1, momentum 0.9, weight decay 5e-4; AdamW methods
lr 1e-3, weight decay 0.05; ``total_steps`` small and ``delta_t = 1``, so ``t_i = T // 3`` and
``t_f = 2T // 3`` are reached in a few steps and every step before ``t_f`` is an update step)
and driven through its whole schedule with real ``step()`` calls on fixed random gradients.
After every step the state is measured by walking ``optimizer.state`` (every tensor, in dicts,
lists and tuples, recursively, ``numel() * element_size()``, each tensor object once; Python
numbers count 0) without assuming key names, so the benchmark does not depend on how a method
lays out its state. Each phase reports its peak (the largest state after any step of that
phase; ``prune`` is the step ``t == t_i``). State is split into the sparse parameters' part
and the dense parameters' part (stem, classifier, biases, norms: the family's dense state in
every method).

The reference (1.0) of an SGD method is ``torch.optim.SGD``'s momentum (4 bytes per fp32
parameter), of an AdamW method ``torch.optim.AdamW``'s ``exp_avg`` + ``exp_avg_sq`` (8 bytes)
and per-parameter ``step`` tensor, measured the same way in the same run (rows ``sgd`` and
``adamw``; column ``reference``). Persistent state between steps, not a step's workspace.

Targets (:data:`TARGETS`, checked per phase, for the sparse part and for the whole state):
BAMESGD's sparse-parameter state < 15% of SGD's momentum of those parameters at 1:16, < 60% at
2:4; BAMEAdamW's < 15% / < 60% of AdamW's, outside the evolve phase. 1-3 min on 2 CPU cores::

    .venv/bin/python -m benchmarks.memory                                # all models
    .venv/bin/python -m benchmarks.memory --csv docs/results/memory.csv  # record the table
    .venv/bin/python -m benchmarks.memory --models resnet32 --methods bame static bame_adamw
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from tqdm import tqdm

from bame_apps.integrations.models import MODELS
from bame_optim.core.schedule import Phase, phase
from bame_optim.methods import METHODS, fixed_settings, make_optimizer

from .harness import (
    build_model,
    fixed_grads,
    nm_pattern,
    params_of,
    resolve_device,
    sparse_groups,
    write_csv,
)

DEFAULT_MODELS = ("resnet32", "resnet50", "deit_small")
DEFAULT_PATTERNS = ((2, 4), (1, 4), (1, 16))
HYPER: dict[str, dict[str, Any]] = {
    "sgd": {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4},
    "adamw": {"lr": 1e-3, "weight_decay": 0.05},
}
"""Hyper-parameters of each family (``Method.optimizer``): of its methods and its reference."""
REFERENCES: dict[str, tuple[type[Optimizer], str]] = {
    "sgd": (torch.optim.SGD, "torch SGD"),
    "adamw": (torch.optim.AdamW, "torch AdamW"),
}
"""Each family's reference (1.0; its ``dense`` method, measured as the reference) and name."""
PHASES = tuple(p.value for p in Phase)
"""``gradual``, ``prune`` (the step ``t == t_i``), ``evolve``, ``frozen``."""
BOUNDS = {(1, 16): 0.15, (2, 4): 0.60}
TARGETS: dict[str, tuple[dict[tuple[int, int], float], tuple[str, ...], str]] = {
    "bame": (BOUNDS, (), "BAMESGD's sparse-parameter state over SGD's momentum:"),
    "bame_adamw": (
        BOUNDS,
        ("evolve",),
        "BAMEAdamW's sparse-parameter state over AdamW's (exp_avg + exp_avg_sq + step):",
    ),
}
"""Per method: its bound on the sparse-parameter state over its reference's (strictly below)
per N:M pattern, the phases not checked, and the target as printed."""
MB = 2**20


def walk_bytes(obj: Any, seen: set[int] | None = None) -> tuple[int, int]:
    """``(bytes, tensors)`` of every tensor reachable from ``obj`` through dicts, lists, tuples
    and sets: ``numel() * element_size()`` each, every tensor object counted once (``seen``
    holds the ids already counted). Python numbers, strings and ``None`` count 0 bytes."""
    seen = set() if seen is None else seen
    if isinstance(obj, Tensor):
        if id(obj) in seen:
            return 0, 0
        seen.add(id(obj))
        return obj.numel() * obj.element_size(), 1
    if isinstance(obj, dict):
        items: Iterable[Any] = list(obj.keys()) + list(obj.values())
    elif isinstance(obj, (list, tuple, set, frozenset)):
        items = obj
    else:
        return 0, 0
    total = count = 0
    for item in items:
        b, c = walk_bytes(item, seen)
        total, count = total + b, count + c
    return total, count


def state_bytes(
    optimizer: Optimizer, sparse_ids: set[int], counts: dict[int, int] | None = None
) -> dict[str, int]:
    """Bytes of ``optimizer``'s state: ``sparse`` (state of the parameters whose ``id`` is in
    ``sparse_ids``), ``dense`` (state of the other parameters), ``other`` (state keyed by
    something that is not a parameter, and tensors in param groups besides their params),
    ``total``, and ``tensors`` (how many tensors were counted).

    ``counts`` maps a parameter's ``id`` to how many parameters it stands for (see
    :func:`representatives`); its state is counted that many times (default once)."""
    counts = counts or {}
    params = {id(p) for g in optimizer.param_groups for p in g["params"]}
    seen: set[int] = set(params)  # a parameter itself is not state
    out = {"sparse": 0, "dense": 0, "other": 0, "tensors": 0}
    for key, value in optimizer.state.items():
        b, c = walk_bytes(value, seen)
        if id(key) in sparse_ids:
            part = "sparse"
        elif id(key) in params:
            part = "dense"
        else:
            part = "other"
            b2, c2 = walk_bytes(key, seen)
            b, c = b + b2, c + c2
        times = counts.get(id(key), 1)
        out[part] += b * times
        out["tensors"] += c * times
    for group in optimizer.param_groups:
        b, c = walk_bytes({k: v for k, v in group.items() if k != "params"}, seen)
        out["other"] += b
        out["tensors"] += c
    out["total"] = out["sparse"] + out["dense"] + out["other"]
    return out


def representatives(groups: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[int, int]]:
    """``groups`` with one parameter per shape in each group, and how many parameters of the
    group each stands for (by ``id``).

    Optimizer state is per parameter (``optimizer.state`` is keyed by parameter) and, for N:M
    masks, a function of the parameter's shape and its group's settings, so the state of a
    model is the sum over shapes of count x the state of one parameter of that shape. ResNet-50
    has 28 distinct shapes among 161 parameters (45% of the weights), DeiT-small 12 among 152
    (11%): measuring those is 2-9x faster. ``--exact`` measures every parameter instead, and
    ``tests/test_memory_benchmark.py`` checks that both agree for every method.
    """
    out, counts = [], {}
    for group in groups:
        first: dict[tuple[int, ...], Any] = {}
        for item in group["params"]:
            p = item[1] if isinstance(item, tuple) else item
            key = tuple(p.shape)
            if key in first:
                rep = first[key]
                counts[id(rep[1] if isinstance(rep, tuple) else rep)] += 1
            else:
                first[key] = item
                counts[id(p)] = 1
        out.append({**group, "params": list(first.values())})
    return out, counts


def schedule_of(optimizer: Optimizer) -> tuple[int, int, int] | None:
    """``(t, t_i, t_f)`` of the first sparse group, ``None`` without a BAME schedule (MaxQ has
    a ``t_i``, the end of its ramp, but no ``t_f``)."""
    for g in optimizer.param_groups:
        if g.get("sparse") and "t_i" in g and "t_f" in g:
            return g["step"], g["t_i"], g["t_f"]
    return None


class Run:
    """One model with fixed random gradients and its initial weights, to restore before each
    method so every method starts from the same point."""

    def __init__(self, model: str | nn.Module, device: torch.device, seed: int = 0) -> None:
        if isinstance(model, str):
            model = build_model(model, device, seed)
        self.model = model.to(device)
        self.params = list(self.model.parameters())
        grads = fixed_grads(self.model, device, seed + 1)
        self.grads = {id(p): g for p, g in zip(self.params, grads, strict=True)}
        self.initial = [p.detach().clone() for p in self.params]
        self.numel = sum(p.numel() for p in self.params)

    def reset(self) -> None:
        """Initial weights back, gradients dropped."""
        with torch.no_grad():
            for p, w in zip(self.params, self.initial, strict=True):
                p.copy_(w)
                p.grad = None

    def assign_grads(self, params: Iterable[Tensor]) -> None:
        """Give ``params`` clones of their fixed random gradients."""
        for p in params:
            p.grad = self.grads[id(p)].clone()


def measure_reference(run: Run, sparse_ids: set[int], family: str = "sgd") -> dict[str, int]:
    """State bytes of ``family``'s reference (``torch.optim.SGD``'s momentum,
    ``torch.optim.AdamW``'s moments and steps) over the whole model after one step."""
    run.reset()
    run.assign_grads(run.params)
    reference = REFERENCES[family][0](run.params, **HYPER[family])
    reference.step()
    return state_bytes(reference, sparse_ids)


def measure_method(
    run: Run, method: str, pattern: tuple[int, int], total_steps: int, exact: bool = False
) -> dict[str, dict[str, int]]:
    """Peak state bytes per phase of ``method`` at ``pattern``, driving the optimizer from step
    0 to ``total_steps`` with ``delta_t = 1``. Keys: the phases reached (``"-"`` for an
    optimizer without a BAME schedule); values as :func:`state_bytes` plus ``steps`` (how many
    steps of that phase were measured). Unless ``exact``, one parameter per shape is stepped
    and counted for all of its shape (:func:`representatives`)."""
    n, m = pattern
    run.reset()
    groups = sparse_groups(run.model, n, m)
    counts: dict[int, int] = {}
    if not exact:
        groups, counts = representatives(groups)
    stepped = params_of(groups)
    sparse_ids = {id(p) for p in params_of(groups, sparse=True)}
    schedule: dict[str, Any] = {"n": n, "m": m, "total_steps": total_steps, "delta_t": 1}
    for key in fixed_settings(method):
        schedule.pop(key, None)
    optimizer = make_optimizer(method, groups, **HYPER[METHODS[method].optimizer], **schedule)
    peaks: dict[str, dict[str, int]] = {}
    for _ in range(total_steps):
        where = schedule_of(optimizer)
        label = "-" if where is None else phase(*where).value
        run.assign_grads(stepped)
        optimizer.step()
        now = state_bytes(optimizer, sparse_ids, counts)
        peak = peaks.setdefault(label, {**dict.fromkeys(now, 0), "steps": 0})
        for key, value in now.items():
            peak[key] = max(peak[key], value)
        peak["steps"] += 1
    return peaks


def _row(
    base: dict[str, Any], ref: dict[str, int], method: str, phase_: str, b: dict[str, int]
) -> dict[str, Any]:
    return {
        **base,
        "method": method,
        "phase": phase_,
        "steps": b["steps"],
        "state_mb": b["total"] / MB,
        "ratio": b["total"] / ref["total"],
        "sparse_mb": b["sparse"] / MB,
        "sparse_ratio": b["sparse"] / ref["sparse"] if ref["sparse"] else float("nan"),
        "dense_mb": b["dense"] / MB,
        "other_mb": b["other"] / MB,
        "tensors": b["tensors"],
        "state_bytes": b["total"],
        "sparse_bytes": b["sparse"],
        "dense_bytes": b["dense"],
    }


def collect(
    models: list[str],
    patterns: list[tuple[int, int]],
    methods: list[str],
    total_steps: int,
    device: torch.device,
    exact: bool = False,
) -> list[dict[str, Any]]:
    """One row per (model, pattern, method, phase) with bytes and ratios to the reference of
    the method's family (``reference``: ``sgd`` or ``adamw``; its own row first)."""
    rows: list[dict[str, Any]] = []
    families: dict[str, list[str]] = {}  # each family asked for: its methods but the reference
    for method in methods:
        record = METHODS[method]
        members = families.setdefault(record.optimizer, [])
        if record.factory is not REFERENCES[record.optimizer][0]:
            members.append(method)
    total = len(models) * len(patterns) * sum(len(v) for v in families.values())
    with tqdm(total=total, unit="run") as bar:
        for name in models:
            run = Run(name, device)
            for pattern in patterns:
                groups = sparse_groups(run.model, *pattern)
                sparse_ids = {id(p) for p in params_of(groups, sparse=True)}
                sparse_numel = sum(p.numel() for p in run.params if id(p) in sparse_ids)
                for family, members in families.items():
                    ref = measure_reference(run, sparse_ids, family)
                    base = {
                        "model": name,
                        "n": pattern[0],
                        "m": pattern[1],
                        "params_m": run.numel / 1e6,
                        "sparse_params_m": sparse_numel / 1e6,
                        "reference": family,
                        "ref_mb": ref["total"] / MB,
                        "ref_sparse_mb": ref["sparse"] / MB,
                    }
                    results = {family: {"-": {**ref, "steps": 1}}}
                    for method in members:
                        bar.set_postfix_str(f"{name} {pattern[0]}:{pattern[1]} {method}")
                        results[method] = measure_method(run, method, pattern, total_steps, exact)
                        bar.update()
                    for method, peaks in results.items():
                        rows.extend(_row(base, ref, method, k, b) for k, b in peaks.items())
            del run
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """One line per (model, pattern, method): peak MB, and ratio to its reference per phase."""
    lines = [
        "| model | N:M | method | 1.0 = | params (M) / sparse | peak state MB | x ref, whole: "
        "gradual / prune / evolve / frozen | x ref, sparse part: gradual / prune / evolve / "
        "frozen | dense part MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    grouped: dict[tuple[str, int, int, str], dict[str, dict[str, Any]]] = {}
    for r in rows:
        grouped.setdefault((r["model"], r["n"], r["m"], r["method"]), {})[r["phase"]] = r
    for (model, n, m, method), by_phase in grouped.items():
        first = next(iter(by_phase.values()))
        labels = ["-"] if "-" in by_phase else list(PHASES)
        reference = REFERENCES[first["reference"]][1]

        def ratios(key: str, by_phase=by_phase, labels=labels) -> str:
            return " / ".join(f"{by_phase[p][key]:.3f}" if p in by_phase else "-" for p in labels)

        lines.append(
            f"| {model} | {n}:{m} "
            f"| {f'{reference} (1.0)' if method == first['reference'] else method} "
            f"| {reference} | {first['params_m']:.2f} / {first['sparse_params_m']:.2f} "
            f"| {max(r['state_mb'] for r in by_phase.values()):.2f} "
            f"| {ratios('ratio')} | {ratios('sparse_ratio')} "
            f"| {max(r['dense_mb'] for r in by_phase.values()):.2f} |"
        )
    return "\n".join(lines)


def target_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of the methods of :data:`TARGETS` at their patterns and phases with a target,
    with PASS/MISS for the sparse part and the whole state."""
    out = []
    for r in rows:
        bounds, skip, _ = TARGETS.get(r["method"], ({}, (), ""))
        bound = bounds.get((r["n"], r["m"]))
        if bound is not None and r["phase"] not in skip:
            sparse, whole = ("PASS" if r[k] < bound else "MISS" for k in ("sparse_ratio", "ratio"))
            pattern = f"{r['n']}:{r['m']}"
            out.append(dict(r, pattern=pattern, bound=bound, sparse=sparse, whole=whole))
    return out


def format_targets(checks: list[dict[str, Any]]) -> str:
    """One table per method of ``checks``, under its target."""
    blocks = []
    for method, (bounds, skip, text) in TARGETS.items():
        mine = [c for c in checks if c["method"] == method]
        if not mine:
            continue
        ref = REFERENCES[mine[0]["reference"]][1].removeprefix("torch ")
        where = ", ".join(f"< {b:.0%} at {n}:{m}" for (n, m), b in bounds.items())
        lines = [
            f"\ntarget: {text} {where}"
            + (f", outside the {' and '.join(skip)} phase" if skip else ""),
            f"| model | N:M | phase | target | sparse part x {ref} | sparse part "
            f"| whole state x {ref} | whole state |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {c['model']} | {c['pattern']} | {c['phase']} | < {c['bound']:.2f} "
            f"| {c['sparse_ratio']:.3f} | {c['sparse']} | {c['ratio']:.3f} | {c['whole']} |"
            for c in mine
        ]
        blocks.append("\n".join(lines))
    return "\n".join(blocks)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=sorted(MODELS))
    parser.add_argument("--patterns", nargs="+", type=nm_pattern, default=list(DEFAULT_PATTERNS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument(
        "--total-steps",
        type=int,
        default=5,
        help="schedule length T driven through (t_i = T // 3, t_f = 2T // 3; default 5: "
        "gradual 0 (n(0) = M, the largest budget), prune 1, evolve 2, frozen 3-4)",
    )
    parser.add_argument(
        "--exact",
        action="store_true",
        help="step every parameter instead of one per shape (slower, same numbers)",
    )
    parser.add_argument("--csv", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.total_steps < 5:
        parser.error("argument --total-steps: must be >= 5 (to reach every phase)")
    args.device = resolve_device(parser, args.device)
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    start = time.perf_counter()
    rows = collect(
        args.models, args.patterns, args.methods, args.total_steps, args.device, args.exact
    )
    seconds = time.perf_counter() - start
    t = args.total_steps
    print(
        f"\noptimizer state after each step, peak per phase (T = {t}, t_i = {t // 3}, "
        f"t_f = {2 * t // 3}, ΔT = 1; methods that fix the schedule keep theirs); ratios to "
        f"the reference of the method's family (column '1.0 =': torch.optim.SGD's momentum, or "
        f"torch.optim.AdamW's exp_avg + exp_avg_sq + step; whole: all parameters; sparse part: "
        f"the sparse parameters only); device {args.device}; {seconds:.0f} s"
    )
    print(format_table(rows))
    checks = target_rows(rows)
    if checks:
        print(format_targets(checks))
    if args.csv is not None:
        write_csv(rows, args.csv)
        print(f"wrote {args.csv}")
    return rows


if __name__ == "__main__":
    main()
