"""The paper's ablations (section 4.3) at small scale: Table 3's schedule and Fig. 3's α, β, ΔT.

BAME at 1:16 on Fashion-MNIST with the accuracy benchmark's model and recipe
(:data:`benchmarks.accuracy.SMALL`: the small CNN, 30,000 training images, 4 epochs, SGD 0.1
cosine, ΔT = 20, α = β = 0.5), 3 seeds::

    .venv/bin/python -m benchmarks.ablation --output-dir docs/results/ablation   # ~90 min, 54 runs
    .venv/bin/python -m benchmarks.ablation --quick                              # ~1 min

* **Table 3**: the paper's six ``(t_i, t_f)`` rows (fractions of the run's T), with top-1 and
  training-FLOPs ratio beside the paper's; ``--table3 grid`` adds the issue's grid
  ``t_i ∈ {0, T/6, T/3, T/2}`` x ``t_f ∈ {t_i, 2T/3, T}``.
* **Fig. 3**: one knob at a time, the others at their defaults (``t_i = T/3``,
  ``t_f = 2T/3``): α and β ∈ {0, 0.25, 0.5, 0.75, 1}, and the paper's ΔT ∈ {10, 50, 100,
  200, 500} scaled by the recipe's ΔT / 100 (:func:`scaled_delta_t`), since our run is about
  60 times shorter than the paper's 58,800 steps.

Writes ``table3.csv``, ``sweeps.csv``, ``runs.csv``, ``ablation.png`` and ``summary.md`` to
``--output-dir``. Each distinct setting runs once per seed (the default setting is Table 3's
``(T/3, 2T/3)`` row and the middle of every sweep).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path

import torch
from tqdm import tqdm

from bame_apps.integrations.local_data import load_split
from bame_optim.core.schedule import DEFAULT_DELTA_T, evolve_updates

from . import accuracy
from .harness import resolve_device, write_csv

ROOT = Path(__file__).resolve().parents[1]
METHOD = "bame"
PATTERN = (1, 16)
"""The paper's ablations train 1:16 ResNet-32 on CIFAR-10 (section 4.3)."""

PAPER_TABLE3: tuple[tuple[Fraction, Fraction, float, float], ...] = (
    (Fraction(0), Fraction(1, 3), 91.87, 0.07),
    (Fraction(0), Fraction(2, 3), 92.57, 0.07),
    (Fraction(0), Fraction(1), 92.22, 0.07),
    (Fraction(1, 3), Fraction(1), 92.81, 0.29),
    (Fraction(2, 3), Fraction(1), 93.05, 0.41),
    (Fraction(1, 3), Fraction(2, 3), 93.15, 0.29),
)
"""The paper's Table 3, ``(t_i / T, t_f / T, top-1 %, training FLOPs)``: 1:16 ResNet-32 on
CIFAR-10, 300 epochs, ``t_i`` and ``t_f`` in {0, 100, 200, 300} epochs.

.. note:: The paper's text extraction scatters this table: the ``t_i`` column reads 0, 0, 0,
   100, 200, 100 and the rows read (t_f, top-1, FLOPs) 100 91.87 0.07x, 200 92.57 0.07x,
   300 92.22 0.07x, 300 92.81 0.29x, 300 93.05 0.41x, and 93.15 0.29x for the last row, whose
   t_f (200) stands apart. The last row is the default schedule: its 93.15 is Table 4's
   LMA+OBF, and the FLOPs grow with t_i as gradual pruning from dense predicts."""
GRID_T_I = (Fraction(0), Fraction(1, 6), Fraction(1, 3), Fraction(1, 2))
GRID_T_F = (None, Fraction(2, 3), Fraction(1))
"""Issue 18's schedule grid: ``t_f`` of ``None`` means ``t_f = t_i`` (no evolve phase)."""
DEFAULT_T_I, DEFAULT_T_F = Fraction(1, 3), Fraction(2, 3)
"""The paper's default schedule ("t_i and t_f evenly divide the training", section 3.3)."""

ALPHAS = BETAS = (0.0, 0.25, 0.5, 0.75, 1.0)
PAPER_DELTA_TS = (10, 50, 100, 200, 500)
"""Fig. 3's values. The figure's numbers are not in the paper's text; it reports the best at
alpha = beta = 0.5 and ΔT = 100."""
PAPER_STEPS = 300 * 196
"""The paper's CIFAR-10 run: 300 epochs of 196 batches of 256 (50,000 images)."""

QUICK = replace(accuracy.SMALL, epochs=2, batch_size=32, limit_train=1024, delta_t=4)
"""``--quick``: 64 steps on 1,024 images; ΔT = 4 stands for the paper's 100."""
QUICK_TEST_IMAGES = 2000
DEFAULT_DATA = accuracy.DEFAULT_DATA
DEFAULT_OUT = ROOT / "runs" / "ablation"


@dataclass(frozen=True)
class Setting:
    """One BAME configuration of the ablation: the schedule as fractions of T, the knobs."""

    t_i: Fraction
    t_f: Fraction
    alpha: float
    beta: float
    delta_t: int
    """In steps (already scaled)."""


def at(fraction: Fraction, total_steps: int) -> int:
    """``fraction * T`` rounded down: ``T // 3`` and ``2 * T // 3`` as the optimizer's defaults
    (:func:`bame_optim.core.schedule.resolve_schedule`)."""
    return fraction.numerator * total_steps // fraction.denominator


def scaled_delta_t(paper_value: int, recipe_delta_t: int) -> int:
    """The paper's ΔT in this run: ``paper_value * recipe_delta_t / 100`` rounded, at least 1.

    .. note:: Scaling by the run's length (``T / 58,800``) would make ΔT < 2 for every value,
       i.e. a dense gradient at every step; the accuracy recipe instead stands ΔT = 20 for the
       paper's 100 on its 940-step run, and the sweep keeps the paper's ratios around it.
    """
    return max(1, round(paper_value * recipe_delta_t / DEFAULT_DELTA_T))


def label(fraction: Fraction) -> str:
    """``0``, ``T/6``, ``2T/3``, ``T``."""
    if fraction == 0:
        return "0"
    top = "T" if fraction.numerator == 1 else f"{fraction.numerator}T"
    return top if fraction.denominator == 1 else f"{top}/{fraction.denominator}"


def table3_settings(cfg: accuracy.Config, rows: Sequence[str]) -> list[Setting]:
    """The Table-3 settings: the paper's rows, then (``"grid"`` in ``rows``) the issue's grid
    cells that the paper lacks."""
    pairs = [(t_i, t_f) for t_i, t_f, *_ in PAPER_TABLE3] if "paper" in rows else []
    if "grid" in rows:
        grid = [(t_i, t_i if t_f is None else t_f) for t_i in GRID_T_I for t_f in GRID_T_F]
        pairs += [pair for pair in grid if pair not in pairs]
    return [Setting(t_i, t_f, cfg.alpha, cfg.beta, cfg.delta_t) for t_i, t_f in pairs]


def sweep_settings(cfg: accuracy.Config) -> dict[str, list[Setting]]:
    """Fig. 3's sweeps, one knob at a time around the default setting."""
    default = Setting(DEFAULT_T_I, DEFAULT_T_F, cfg.alpha, cfg.beta, cfg.delta_t)
    return {
        "alpha": [replace(default, alpha=v) for v in ALPHAS],
        "beta": [replace(default, beta=v) for v in BETAS],
        "delta_t": [
            replace(default, delta_t=scaled_delta_t(v, cfg.delta_t)) for v in PAPER_DELTA_TS
        ],
    }


def run_setting(setting: Setting, seed: int, train, test, cfg: accuracy.Config, shape) -> dict:
    """Train BAME 1:16 under ``setting`` from ``seed`` (:func:`benchmarks.accuracy.run_one`)."""
    steps = accuracy.total_steps(cfg, len(train[0]))
    t_i, t_f = at(setting.t_i, steps), at(setting.t_f, steps)
    run_cfg = replace(
        cfg, t_i=t_i, t_f=t_f, alpha=setting.alpha, beta=setting.beta, delta_t=setting.delta_t
    )
    row = accuracy.run_one(METHOD, PATTERN, seed, train, test, run_cfg, shape)
    return {
        "t_i": label(setting.t_i),
        "t_f": label(setting.t_f),
        "t_i_steps": t_i,
        "t_f_steps": t_f,
        "alpha": setting.alpha,
        "beta": setting.beta,
        "delta_t": setting.delta_t,
        "seed": seed,
        "top1": row["top1"],
        "flops": row["flops"],
        "seconds": row["seconds"],
    }


def _stats(runs: list[dict]) -> dict:
    accs = [100 * r["top1"] for r in runs]
    return {
        "top1_mean": statistics.fmean(accs),
        "top1_std": accuracy.top1_std(accs),
        "seeds": " ".join(str(r["seed"]) for r in runs),
        "flops_ratio": runs[0]["flops"],
        "seconds": statistics.fmean(r["seconds"] for r in runs),
    }


def table3(settings: list[Setting], runs: dict[Setting, list[dict]], steps: int) -> list[dict]:
    """One row per schedule, with the paper's numbers where the paper has the row."""
    paper = {(t_i, t_f): (top1, flops) for t_i, t_f, top1, flops in PAPER_TABLE3}
    rows = []
    for s in settings:
        t_i, t_f = at(s.t_i, steps), at(s.t_f, steps)
        top1, flops = paper.get((s.t_i, s.t_f), ("", ""))
        rows.append(
            {
                "t_i": label(s.t_i),
                "t_f": label(s.t_f),
                "t_i_steps": t_i,
                "t_f_steps": t_f,
                "evolve_updates": evolve_updates(t_i, t_f, s.delta_t),
                **_stats(runs[s]),
                "paper_top1": top1,
                "paper_flops": flops,
            }
        )
    return rows


def sweeps(settings: dict[str, list[Setting]], runs: dict[Setting, list[dict]], steps: int):
    """One row per (knob, value); ``paper_value`` is the paper's ΔT for the ΔT sweep."""
    rows = []
    for knob, values in settings.items():
        for i, s in enumerate(values):
            rows.append(
                {
                    "knob": knob,
                    "value": getattr(s, knob),
                    "paper_value": PAPER_DELTA_TS[i] if knob == "delta_t" else getattr(s, knob),
                    "alpha": s.alpha,
                    "beta": s.beta,
                    "delta_t": s.delta_t,
                    "evolve_updates": evolve_updates(at(s.t_i, steps), at(s.t_f, steps), s.delta_t),
                    **_stats(runs[s]),
                }
            )
    return rows


def format_table3(rows: list[dict]) -> str:
    lines = [
        "| t_i | t_f | steps | evolve updates | top-1 % (mean ± std) | train FLOPs "
        "| paper top-1 % | paper FLOPs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        paper = (
            f"{r['paper_top1']:.2f} | {r['paper_flops']:.2f}x" if r["paper_top1"] != "" else "- | -"
        )
        lines.append(
            f"| {r['t_i']} | {r['t_f']} | {r['t_i_steps']}-{r['t_f_steps']} "
            f"| {r['evolve_updates']} | {accuracy.top1_text(r)} "
            f"| {r['flops_ratio']:.2f}x | {paper} |"
        )
    return "\n".join(lines)


KNOB_NAMES = {"alpha": "alpha", "beta": "beta", "delta_t": "ΔT"}


def format_sweeps(rows: list[dict]) -> str:
    lines = [
        "| knob | value | (paper's) | evolve updates | top-1 % (mean ± std) | train FLOPs |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        paper = r["paper_value"] if r["knob"] == "delta_t" else ""
        lines.append(
            f"| {KNOB_NAMES[r['knob']]} | {r['value']:g} | {paper} | {r['evolve_updates']} "
            f"| {accuracy.top1_text(r)} | {r['flops_ratio']:.2f}x |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Fig. 3's layout: top-1 against each knob, one panel per knob, error bars of one std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    knobs = list(dict.fromkeys(r["knob"] for r in rows))
    fig, axes = plt.subplots(1, len(knobs), figsize=(4 * len(knobs), 3.4), sharey=True)
    for ax, knob in zip(axes, knobs, strict=True):
        points = [r for r in rows if r["knob"] == knob]
        xs = range(len(points)) if knob == "delta_t" else [r["value"] for r in points]
        ax.errorbar(
            list(xs),
            [r["top1_mean"] for r in points],
            yerr=[r["top1_std"] or 0.0 for r in points],
            marker="o",
            capsize=3,
        )
        if knob == "delta_t":  # the paper's values, evenly spaced, with the steps used here
            ax.set_xticks(list(xs), [f"{r['paper_value']}\n({r['value']:g})" for r in points])
            ax.set_xlabel("ΔT: paper's (steps here)")
        else:
            ax.set_xticks([r["value"] for r in points])
            ax.set_xlabel(KNOB_NAMES[knob])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("Top-1 accuracy (%)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid seed {text!r} (an integer >= 0)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"invalid seed {text!r} (an integer >= 0)")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 64 steps, seed 0")
    parser.add_argument(
        "--seeds", nargs="+", type=_seed, default=None, help="default: 0 1 2 (--quick: 0)"
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_DATA,
        help=f"Fashion-MNIST IDX folder (default: {DEFAULT_DATA}; docs/data.md)",
    )
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--table3",
        nargs="+",
        choices=("paper", "grid"),
        default=["paper"],
        help="Table 3's rows: the paper's six, and/or issue 18's 4x3 grid",
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device to train on (default: cuda when available)",
    )
    args = parser.parse_args(argv)
    args.seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"argument --seeds: invalid value {args.seeds} (a seed is repeated)")
    if not args.data.is_dir():
        parser.error(
            f"argument --data: {str(args.data)!r} is not a folder (the Fashion-MNIST IDX "
            "files, docs/data.md)"
        )
    if args.output_dir.exists() and not args.output_dir.is_dir():
        parser.error(f"argument --output-dir: {str(args.output_dir)!r} is a file, not a folder")
    args.device = resolve_device(parser, args.device)
    return args


def _summary(setup: str, scaling: str, t3: list[dict], sw: list[dict], wall: float) -> str:
    return (
        "\n\n".join(
            [
                "# Ablations: Table 3 (schedule) and Fig. 3 (alpha, beta, ΔT), BAME 1:16",
                setup,
                scaling,
                "## Table 3: training schedule",
                format_table3(t3),
                "## Fig. 3: one knob at a time (the others at their defaults)",
                format_sweeps(sw),
                "![top-1 against alpha, beta and ΔT](ablation.png)",
                f"Wall time: {wall / 60:.1f} min for the whole run.",
            ]
        )
        + "\n"
    )


def main(argv: Sequence[str] | None = None) -> dict[str, list[dict]]:
    args = parse_args(argv)
    cfg = QUICK if args.quick else accuracy.SMALL
    start = time.perf_counter()
    train, test = load_split("fashion-mnist", args.data)
    train = tuple(t[: cfg.limit_train].to(args.device) for t in train)
    test = tuple(t[: QUICK_TEST_IMAGES if args.quick else None].to(args.device) for t in test)
    shape = (train[0].shape[1], train[0].shape[2], int(train[1].max()) + 1)
    steps = accuracy.total_steps(cfg, len(train[0]))

    t3_settings = table3_settings(cfg, args.table3)
    sweep = sweep_settings(cfg)
    unique = list(dict.fromkeys([*t3_settings, *(s for v in sweep.values() for s in v)]))
    runs: dict[Setting, list[dict]] = {s: [] for s in unique}
    with tqdm(total=len(unique) * len(args.seeds), desc="ablation runs", unit="run") as bar:
        for setting in unique:
            for seed in args.seeds:
                bar.set_postfix_str(
                    f"t_i {label(setting.t_i)} t_f {label(setting.t_f)} alpha {setting.alpha} "
                    f"beta {setting.beta} ΔT {setting.delta_t} seed {seed}"
                )
                runs[setting].append(run_setting(setting, seed, train, test, cfg, shape))
                bar.update()
    wall = time.perf_counter() - start

    t3, sw = table3(t3_settings, runs, steps), sweeps(sweep, runs, steps)
    seeds = " ".join(map(str, args.seeds))
    setup = (
        f"BAME {PATTERN[0]}:{PATTERN[1]}, {cfg.model} on Fashion-MNIST ({len(train[0])} train / "
        f"{len(test[0])} test images), {cfg.epochs} epochs of batch {cfg.batch_size} "
        f"(T = {steps} steps), SGD lr {cfg.lr} momentum {cfg.momentum} cosine, weight decay "
        f"{cfg.weight_decay}; defaults t_i = T/3, t_f = 2T/3, alpha = {cfg.alpha}, "
        f"beta = {cfg.beta}, ΔT = {cfg.delta_t}; seeds {seeds}; {len(unique)} settings x "
        f"{len(args.seeds)} seeds on {args.device}."
    )
    ours = evolve_updates(at(DEFAULT_T_I, steps), at(DEFAULT_T_F, steps), cfg.delta_t)
    scaling = (
        f"ΔT scaling: the paper's ΔT x {cfg.delta_t}/{DEFAULT_DELTA_T} (this recipe's ΔT = "
        f"{cfg.delta_t} stands for the paper's {DEFAULT_DELTA_T}), rounded, at least 1: "
        + ", ".join(f"{v} -> {scaled_delta_t(v, cfg.delta_t)}" for v in PAPER_DELTA_TS)
        + f" steps. T = {steps} steps here against {PAPER_STEPS} in the paper (300 CIFAR-10 "
        f"epochs of 196 batches), so the paper's ΔT = 100 makes "
        f"{evolve_updates(PAPER_STEPS // 3, 2 * PAPER_STEPS // 3, DEFAULT_DELTA_T)} evolve "
        f"updates and ours {ours}."
    )
    print(f"\n{setup}\n{scaling}\n\nTable 3 (training schedule):")
    print(format_table3(t3))
    print("\nFig. 3 sweeps (one knob at a time):")
    print(format_sweeps(sw))

    out = args.output_dir
    write_csv(t3, out / "table3.csv")
    write_csv(sw, out / "sweeps.csv")
    write_csv([row for s in unique for row in runs[s]], out / "runs.csv")
    plot(
        sw,
        out / "ablation.png",
        f"BAME 1:16, {cfg.model}, Fashion-MNIST, T = {steps}, seeds {seeds}",
    )
    (out / "summary.md").write_text(_summary(setup, scaling, t3, sw, wall))
    print(
        f"\nwall time {wall / 60:.1f} min; wrote table3.csv, sweeps.csv, runs.csv, "
        f"ablation.png and summary.md to {out}"
    )
    return {"table3": t3, "sweeps": sw}


if __name__ == "__main__":
    main()
