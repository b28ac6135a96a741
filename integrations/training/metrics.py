"""What a training run writes in ``output_dir``: ``metrics.json`` (history, times, the config,
final accuracy, training-FLOPs ratio, sparsity report, mask oscillation summary, library
versions), rewritten atomically after every epoch (``"complete": false``, no plots yet) and at
the end, with the plots and ``mask_oscillation.pt``."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
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
from .protocols import MaskedOptimizer

__all__ = ["LIBRARIES", "MetricsWriter", "atomic_write_text", "library_versions", "run_title"]

LIBRARIES = (
    "torch",
    "bame_optim",
    "accelerate",
    "datasets",
    "torchvision",
    "numpy",
    "huggingface_hub",
    "pyarrow",
    "safetensors",
    "pillow",
    "tqdm",
    "matplotlib",
    "tensorboard",
    "wandb",
)
"""The distributions whose versions ``metrics.json`` records (``None``: not installed)."""


def library_versions() -> dict[str, str | None]:
    """``{"python": ..., "platform": ..., "cuda": ..., "cudnn": ...}`` and the installed version
    of each of :data:`LIBRARIES` (``None`` for one that is not installed; ``cuda`` and
    ``cudnn`` are ``None`` on a CPU build of torch)."""
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    versions: dict[str, str | None] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.version.cuda,
        "cudnn": None if cudnn is None else str(cudnn),
    }
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` by a file holding ``text``, atomically: ``text`` goes to a temporary
    file in the same folder, which is flushed to disk and renamed over ``path``
    (``os.replace``). A reader, or a crash at any point, sees the old file or the new one,
    never a part; on an exception the temporary file is removed and ``path`` is unchanged."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def run_title(config: TrainingConfig) -> str:
    """``"resnet32 bame 2:4"``: the model, the registered method (``bame_adamw`` with AdamW)
    and its N:M pattern (none for dense training, ``"resnet32 dense"``), as the run's header
    line and plots show it."""
    method = config.registered_method
    if get_method(method).flops is FlopsProfile.DENSE:
        return f"{config.network.model} {method}"
    return f"{config.network.model} {method} {config.network.n}:{config.network.m}"


@dataclass
class MetricsWriter:
    """Writes one run's ``metrics.json`` into ``config.outputs.output_dir`` (main process only).

    Attributes: the run's ``config``, ``data_info`` (the data's description), the unwrapped
    ``model``, the ``optimizer`` (inside Accelerate's wrapper), the mask oscillation
    ``tracker`` (``None``: dense), the command line ``argv`` recorded (``None``: none),
    ``world`` (processes), ``device``, ``steps_per_epoch``, ``total_steps``, ``resumed_from``
    and ``started`` (``time.perf_counter()`` when this process started). The training-FLOPs
    ratio and the library versions are found at the first write and kept.
    """

    config: TrainingConfig
    data_info: dict[str, Any]
    model: nn.Module
    optimizer: Optimizer
    tracker: MaskOscillation | None
    argv: Sequence[str] | None
    world: int
    device: str
    steps_per_epoch: int
    total_steps: int
    resumed_from: Path | None = None
    started: float = field(default_factory=time.perf_counter)
    _flops: tuple[float | None, str] | None = field(default=None, init=False, repr=False)
    _versions: dict[str, str | None] = field(default_factory=dict, init=False, repr=False)

    def write(
        self,
        history: list[dict[str, Any]],
        times: dict[str, float],
        global_step: int,
        *,
        final: bool,
    ) -> dict[str, Any]:
        """Write ``metrics.json`` (:func:`atomic_write_text`) for the epochs of ``history``,
        ``global_step`` optimizer steps done; with ``final`` also the plots and
        ``mask_oscillation.pt``. Returns the metrics as read back from the JSON text."""
        config, output_dir = self.config, self.config.outputs.output_dir
        if self._flops is None:
            shape = self.data_info["input_shape"]
            self._flops = _flops_ratio(config, self.model, shape, self.total_steps)
        ratio, note = self._flops
        self._versions = self._versions or library_versions()
        evaluated = [row for row in history if row["eval_accuracy"] is not None]
        optimizer = self.optimizer
        report = optimizer.sparsity_report() if isinstance(optimizer, MaskedOptimizer) else []
        plots: list[str] = []
        if final:
            plots = self._plots(history)
        metrics = {
            "script": config.outputs.script,
            "complete": final,
            "argv": None if self.argv is None else list(self.argv),
            "args": config_dict(config),
            "resumed_from": None if self.resumed_from is None else str(self.resumed_from),
            "data": self.data_info,
            "world_size": self.world,
            "device": self.device,
            "global_batch_size": config.optim.batch_size * self.world * config.optim.grad_accum,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "steps_done": global_step,
            "epochs_done": len(history),
            "history": history,
            "final_eval_accuracy": evaluated[-1]["eval_accuracy"] if evaluated else None,
            "best_eval_accuracy": max(r["eval_accuracy"] for r in evaluated) if evaluated else None,
            "final_train_loss": history[-1]["train_loss"] if history else None,
            "times": {**times, "this_invocation_seconds": time.perf_counter() - self.started},
            "training_flops_ratio": ratio,
            "training_flops_note": note,
            "sparsity_report": report,
            "mask_oscillation": self.tracker.summary() if self.tracker is not None else None,
            "plots": plots,
            "versions": self._versions,
        }
        text = json.dumps(metrics, indent=1, default=json_default)
        atomic_write_text(output_dir / "metrics.json", text)
        return json.loads(text)  # what the file holds (tuples as lists)

    def _plots(self, history: list[dict[str, Any]]) -> list[str]:
        """The curves and mask oscillation plots, and ``mask_oscillation.pt``."""
        output_dir, tracker = self.config.outputs.output_dir, self.tracker
        title = run_title(self.config)
        plots = [str(plot_curves(history, output_dir / "curves.png", title))]
        if tracker is not None:
            torch.save(tracker.state_dict(), output_dir / OSCILLATION_FILE)
            path = output_dir / "mask_oscillation.png"
            plots.append(str(plot_mask_oscillation(tracker.sad, tracker.cycles, path, title)))
        return plots


def _flops_ratio(
    config: TrainingConfig, model: nn.Module, input_shape: Sequence[int], total_steps: int
) -> tuple[float | None, str]:
    note = (
        "training FLOPs relative to dense training of the same steps, from "
        "bame_optim.flops.training_flops_ratio (Linear, Conv and MultiheadAttention products)"
    )
    extra: dict[str, Any] = {}
    if get_method(config.registered_method).flops is FlopsProfile.PRETRAIN_FIXED:
        extra = {"pretrain_steps": 0, "finetune_steps": total_steps}
        note += "; asp: no dense pre-training in this run (pretrain_steps=0)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # nm_param_groups warned at set-up
        try:
            ratio = training_flops_ratio(
                model,
                tuple(input_shape),
                config.registered_method,
                n=config.network.n,
                m=config.network.m,
                total_steps=total_steps,
                delta_t=config.network.delta_t,
                exclude=None if config.network.exclude is None else list(config.network.exclude),
                **extra,
            )
        except (ValueError, RuntimeError) as err:
            return None, f"{note}; not computed: {err}"
    return ratio, note
