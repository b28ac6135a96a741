"""The training run's PNG plots: loss and accuracy curves, and the mask oscillation of the
paper's Figure 2. matplotlib is imported when a plot is drawn, not with this module."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["plot_curves", "plot_mask_oscillation"]


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def plot_curves(history: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Training and evaluation loss (left) and accuracy (right) per epoch, as a PNG."""
    figure = _figure(10, 4)
    loss_ax, acc_ax = figure.subplots(1, 2)
    epochs = [row["epoch"] for row in history]
    evaluated = [row for row in history if row.get("eval_accuracy") is not None]
    loss_ax.plot(epochs, [row["train_loss"] for row in history], "o-", label="train")
    acc_ax.plot(epochs, [100 * row["train_accuracy"] for row in history], "o-", label="train")
    if evaluated:
        eval_epochs = [row["epoch"] for row in evaluated]
        loss_ax.plot(eval_epochs, [row["eval_loss"] for row in evaluated], "s-", label="eval")
        acc_ax.plot(
            eval_epochs, [100 * row["eval_accuracy"] for row in evaluated], "s-", label="eval"
        )
    from matplotlib.ticker import MaxNLocator

    loss_ax.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    acc_ax.set(xlabel="epoch", ylabel="top-1 accuracy (%)", title="accuracy")
    for ax in (loss_ax, acc_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        figure.suptitle(title)
    figure.savefig(path, dpi=120)
    return path


def plot_mask_oscillation(sad: dict[str, Tensor], cycles: int, path: Path, title: str = "") -> Path:
    """The paper's Figure 2 for this run, as a PNG: the accumulated SAD of every N:M block of
    the sparse layer with the most mask changes, in block order (left), and the distribution of
    accumulated SAD over all blocks of all sparse layers (right, log-scale counts)."""
    figure = _figure(11, 4)
    layer_ax, hist_ax = figure.subplots(1, 2)
    totals = {name: int(t.sum()) for name, t in sad.items()}
    if not totals or not any(totals.values()):
        for ax in (layer_ax, hist_ax):
            ax.text(0.5, 0.5, "no N:M mask change observed", ha="center", va="center")
            ax.set_axis_off()
    else:
        name = max(totals, key=totals.__getitem__)
        values = sad[name].cpu()
        layer_ax.plot(range(values.numel()), values.tolist(), ".", ms=2, color="tab:blue")
        layer_ax.set(
            xlabel=f"N:M block index of {name}",
            ylabel="accumulated SAD",
            title=f"{name}: {values.numel()} blocks",
        )
        every = torch.cat([t.cpu() for t in sad.values()])
        counts = torch.bincount(every.to(torch.int64))
        levels = torch.arange(counts.numel())
        shown = counts > 0
        xs, ys = levels[shown].tolist(), counts[shown].tolist()
        if len(xs) <= 200:  # one bar per SAD value
            hist_ax.bar(xs, ys, width=0.9, color="tab:orange", log=True)
        else:  # thousands of bar patches take seconds to draw
            hist_ax.semilogy(xs, ys, ".-", color="tab:orange")
        never = float((every == 0).float().mean())
        hist_ax.set(
            xlabel="accumulated SAD per block",
            ylabel="blocks (log scale)",
            title=f"all {every.numel()} blocks: {100 * never:.1f}% never changed",
        )
    figure.suptitle((title + " — " if title else "") + f"{cycles} N:M mask updates compared")
    figure.savefig(path, dpi=120)
    return path
