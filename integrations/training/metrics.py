"""What a training run writes at its end in ``output_dir``: ``metrics.json`` (history, times,
the config, final accuracy, training-FLOPs ratio, sparsity report, mask oscillation summary), the
plots, and ``mask_oscillation.pt``."""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from bame_optim.flops import FlopsProfile, training_flops_ratio
from bame_optim.methods import get_method

from .checkpoints import OSCILLATION_FILE
from .config import TrainingConfig, config_dict, json_default
from .mask_oscillation import MaskOscillation
from .plots import plot_curves, plot_mask_oscillation

__all__ = ["run_title", "write_metrics"]


def run_title(config: TrainingConfig) -> str:
    """``"resnet32 bame 2:4"``: the model, the method and its N:M pattern (none for dense
    training, ``"resnet32 dense"``), as the run's header line and plots show it."""
    if get_method(config.method).flops is FlopsProfile.DENSE:
        return f"{config.model} {config.method}"
    return f"{config.model} {config.method} {config.n}:{config.m}"


def write_metrics(
    config: TrainingConfig,
    data_info: dict[str, Any],
    model: nn.Module,
    optimizer: Optimizer,
    tracker: MaskOscillation | None,
    history: list[dict[str, Any]],
    times: dict[str, float],
    *,
    argv: Sequence[str] | None,
    world: int,
    device: str,
    steps_per_epoch: int,
    total_steps: int,
    global_step: int,
    invocation_seconds: float,
    resumed_from: Path | None = None,
) -> dict[str, Any]:
    """Write ``metrics.json`` (atomically), the plots and ``mask_oscillation.pt`` into
    ``config.output_dir``; return the metrics as read back from the JSON text.

    ``argv`` is the command line recorded (``None``: none), ``world`` the number of processes,
    ``global_step`` the optimizer steps done, ``invocation_seconds`` this process's time.
    """
    output_dir: Path = config.output_dir
    ratio, note = _flops_ratio(config, model, data_info["input_shape"], total_steps)
    evaluated = [row for row in history if row["eval_accuracy"] is not None]
    report = optimizer.sparsity_report() if hasattr(optimizer, "sparsity_report") else []
    title = run_title(config)
    plots = [str(plot_curves(history, output_dir / "curves.png", title))]
    oscillation = None
    if tracker is not None:
        torch.save(tracker.state_dict(), output_dir / OSCILLATION_FILE)
        plots.append(
            str(
                plot_mask_oscillation(
                    tracker.sad, tracker.cycles, output_dir / "mask_oscillation.png", title
                )
            )
        )
        oscillation = tracker.summary()
    metrics = {
        "script": config.script,
        "argv": None if argv is None else list(argv),
        "args": config_dict(config),
        "resumed_from": None if resumed_from is None else str(resumed_from),
        "data": data_info,
        "world_size": world,
        "device": device,
        "global_batch_size": config.batch_size * world * config.grad_accum,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "steps_done": global_step,
        "epochs_done": len(history),
        "history": history,
        "final_eval_accuracy": evaluated[-1]["eval_accuracy"] if evaluated else None,
        "best_eval_accuracy": max(row["eval_accuracy"] for row in evaluated) if evaluated else None,
        "final_train_loss": history[-1]["train_loss"] if history else None,
        "times": {**times, "this_invocation_seconds": invocation_seconds},
        "training_flops_ratio": ratio,
        "training_flops_note": note,
        "sparsity_report": report,
        "mask_oscillation": oscillation,
        "plots": plots,
        "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
    }
    path = output_dir / "metrics.json"
    temporary = path.with_suffix(".json.tmp")
    text = json.dumps(metrics, indent=1, default=json_default)
    temporary.write_text(text)
    os.replace(temporary, path)
    return json.loads(text)  # what the file holds (tuples as lists)


def _flops_ratio(
    config: TrainingConfig, model: nn.Module, input_shape: Sequence[int], total_steps: int
) -> tuple[float | None, str]:
    note = (
        "training FLOPs relative to dense training of the same steps, from "
        "bame_optim.flops.training_flops_ratio (Linear, Conv and MultiheadAttention products)"
    )
    extra: dict[str, Any] = {}
    if get_method(config.method).flops is FlopsProfile.PRETRAIN_FIXED:
        extra = {"pretrain_steps": 0, "finetune_steps": total_steps}
        note += "; asp: no dense pre-training in this run (pretrain_steps=0)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # nm_param_groups warned at set-up
        try:
            ratio = training_flops_ratio(
                model,
                tuple(input_shape),
                config.method,
                n=config.n,
                m=config.m,
                total_steps=total_steps,
                delta_t=config.delta_t,
                exclude=None if config.exclude is None else list(config.exclude),
                **extra,
            )
        except (ValueError, RuntimeError) as err:
            return None, f"{note}; not computed: {err}"
    return ratio, note
