"""Where a run starts: :func:`resolve_resume` finds the checkpoint ``TrainingConfig.resume``
names (or none) and refuses an ``output_dir`` that already holds another run's checkpoints;
:func:`check_resume_compatible` refuses a checkpoint made with other run-defining fields or
another number of processes. Both raise :class:`~.config.ConfigError`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .checkpoints import CHECKPOINT_DIR, TRAINER_STATE, complete_checkpoints, find_checkpoint
from .config import RUN_DEFINING, ConfigError, TrainingConfig, config_dict

__all__ = ["check_resume_compatible", "resolve_resume"]


def resolve_resume(config: TrainingConfig) -> Path | None:
    """The checkpoint folder to resume from (``None``: start fresh).

    ``resume=None`` starts fresh and needs an ``output_dir`` without checkpoints;
    ``resume="auto"`` continues from the latest complete checkpoint in ``output_dir`` (fresh if
    there is none); a path is a checkpoint folder or a folder holding ``epoch_NNNN`` folders
    (directly or in ``checkpoints/``), and must be the latest checkpoint of ``output_dir`` if
    that holds any.
    """
    output_dir = config.outputs.output_dir
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError("output_dir", output_dir, "exists and is not a folder")
    own = complete_checkpoints(output_dir / CHECKPOINT_DIR)
    if config.outputs.resume is None:
        if own:
            raise ConfigError(
                "output_dir",
                output_dir,
                f"it already holds checkpoints up to {own[-1].name}; resume='auto' continues "
                "that run, or choose another output_dir",
            )
        return None
    if str(config.outputs.resume) == "auto":
        return own[-1] if own else None
    target = Path(config.outputs.resume).expanduser()
    if not target.exists():
        raise ConfigError("resume", config.outputs.resume, "no such folder")
    found = find_checkpoint(target)
    if found is None:
        raise ConfigError(
            "resume",
            config.outputs.resume,
            f"no complete checkpoint: expected a folder holding {TRAINER_STATE}, or "
            "epoch_NNNN folders",
        )
    if own and found.resolve() != own[-1].resolve():
        raise ConfigError(
            "resume",
            config.outputs.resume,
            f"output_dir already holds the checkpoint {own[-1].name} of another point of a run; "
            f"resume into another output_dir, or resume='auto' to continue from {own[-1].name}",
        )
    return found


def check_resume_compatible(
    saved: dict[str, Any], config: TrainingConfig, world: int, checkpoint: Path
) -> None:
    """Raise :class:`~.config.ConfigError` unless the trainer state ``saved`` (read from
    ``checkpoint``) was made with this run's :data:`~.config.RUN_DEFINING` fields and
    ``world`` processes."""
    current = config_dict(config)
    for key in RUN_DEFINING:
        if key in saved["args"] and saved["args"][key] != current.get(key):
            raise ConfigError(
                key,
                config.flat()[key],
                f"the checkpoint {checkpoint} was made with {key}={saved['args'][key]!r}; a "
                "resumed run must use the same value",
            )
    if saved.get("world_size", world) != world:
        raise ConfigError(
            "resume",
            config.outputs.resume,
            f"the checkpoint was made with {saved['world_size']} processes, this run has "
            f"{world}: the batches would differ",
        )
