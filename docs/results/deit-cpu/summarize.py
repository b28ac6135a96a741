"""Summarize the DeiT CPU runs of the README (section "DeiT's recipe"): read each run's
``metrics.json`` and write, next to this file, ``accuracy.csv``, ``accuracy.md`` (the table),
``curves.png`` (train loss and eval accuracy per epoch of every run) and a copy of each run's
``metrics.json``, ``curves.png`` and log (``METHOD.metrics.json``, ``METHOD.curves.png``,
``METHOD.log``, from ``ROOT/METHOD.log`` if there is one).

Usage: ``.venv/bin/python docs/results/deit-cpu/summarize.py runs/deit-cpu`` (a folder holding
one output folder per method: ``dense``, ``static``, ``bame``).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
METHODS = ("dense", "static", "bame")


def _row(name: str, metrics: dict[str, Any]) -> dict[str, Any]:
    args, history = metrics["args"], metrics["history"]
    evaluated = [row for row in history if row["eval_accuracy"] is not None]
    return {
        "method": name,
        "registered": f"{args['method']}_{args['optimizer']}"
        if args["optimizer"] != "sgd"
        else args["method"],
        "pattern": "dense" if args["method"] == "dense" else f"{args['n']}:{args['m']}",
        "epochs": len(history),
        "train_loss_per_epoch": " ".join(f"{row['train_loss']:.4f}" for row in history),
        "final_train_loss": round(history[-1]["train_loss"], 4),
        "final_eval_loss": round(evaluated[-1]["eval_loss"], 4),
        "final_eval_accuracy": round(100 * evaluated[-1]["eval_accuracy"], 2),
        "best_eval_accuracy": round(100 * max(r["eval_accuracy"] for r in evaluated), 2),
        "train_minutes": round(metrics["times"]["train_seconds"] / 60, 1),
        "training_flops_ratio": metrics.get("training_flops_ratio"),
    }


def _plot(runs: dict[str, dict[str, Any]], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(figure)
    loss_ax, acc_ax = figure.subplots(1, 2)
    for name, metrics in runs.items():
        history = metrics["history"]
        epochs = [row["epoch"] for row in history]
        loss_ax.plot(epochs, [row["train_loss"] for row in history], "o-", label=name)
        evaluated = [row for row in history if row["eval_accuracy"] is not None]
        acc_ax.plot(
            [row["epoch"] for row in evaluated],
            [100 * row["eval_accuracy"] for row in evaluated],
            "s-",
            label=name,
        )
    loss_ax.set(xlabel="epoch", ylabel="train loss (label smoothing 0.1)", title="train loss")
    acc_ax.set(xlabel="epoch", ylabel="eval accuracy (%)", title="eval accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    figure.suptitle("ViT (DeiT-Ti width 192, 4 blocks, patch 7) on Fashion-MNIST, AdamW, CPU")
    figure.savefig(path, dpi=110)


def main() -> None:
    """Read ``ROOT/METHOD/metrics.json`` for each method and write the summary files."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="the folder of the runs' output folders")
    root = parser.parse_args().root
    runs = {name: json.loads((root / name / "metrics.json").read_text()) for name in METHODS}
    rows = [_row(name, metrics) for name, metrics in runs.items()]
    with open(HERE / "accuracy.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "| method | optimizer | N:M | train loss per epoch | eval loss | eval acc. (%) "
        "| best (%) | train min |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['method']} | {row['registered']} | {row['pattern']} "
            f"| {row['train_loss_per_epoch']} | {row['final_eval_loss']} "
            f"| {row['final_eval_accuracy']} | {row['best_eval_accuracy']} "
            f"| {row['train_minutes']} |"
        )
    (HERE / "accuracy.md").write_text("\n".join(lines) + "\n")
    _plot(runs, HERE / "curves.png")
    for name in METHODS:
        shutil.copyfile(root / name / "metrics.json", HERE / f"{name}.metrics.json")
        if (root / name / "curves.png").is_file():
            shutil.copyfile(root / name / "curves.png", HERE / f"{name}.curves.png")
        if (root / f"{name}.log").is_file():  # the run's printed lines
            shutil.copyfile(root / f"{name}.log", HERE / f"{name}.log")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
