"""The model and the optimizer of a training run: :func:`build_training_model` (the config's
network for the data's classes and channels) and :func:`build_training_optimizer` (the method's
optimizer from :func:`bame_optim.methods.make_optimizer` over the model's N:M parameter
groups)."""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.optim import Optimizer

from bame_optim import nm_param_groups
from bame_optim.methods import accepted_keywords, make_optimizer

from ..models import DEIT_SMALL, build_model, deit_small
from .config import ConfigError, TrainingConfig
from .data import TrainingData

__all__ = ["build_training_model", "build_training_optimizer"]


def build_training_model(config: TrainingConfig, data: TrainingData) -> nn.Module:
    """The ``config.model`` network for ``data`` (``config.vit_depth`` encoder blocks for
    DeiT-small, at the data's image size)."""
    if config.model == "deit_small":
        image_size = data.info["input_shape"][-1]
        if config.vit_depth == DEIT_SMALL["num_layers"]:
            return deit_small(data.num_classes, data.in_channels, image_size=image_size)
        from torchvision.models import VisionTransformer

        sizes = {**DEIT_SMALL, "num_layers": config.vit_depth}
        model = VisionTransformer(image_size=image_size, num_classes=data.num_classes, **sizes)
        if data.in_channels != 3:
            proj = model.conv_proj
            model.conv_proj = nn.Conv2d(data.in_channels, proj.out_channels, 16, 16)
        return model
    return build_model(config.model, data.num_classes, data.in_channels)


def build_training_optimizer(
    config: TrainingConfig, model: nn.Module, total_steps: int
) -> Optimizer:
    """The ``config.method`` optimizer over ``model``'s N:M parameter groups (modules matching
    ``config.exclude`` kept dense), scheduled over ``total_steps`` optimizer steps. Only the
    keywords the method takes are passed (``delta_t`` and ``seed`` mean nothing to dense SGD).
    Patterns that match no module raise :class:`~.config.ConfigError` naming ``exclude``."""
    exclude = None if config.exclude is None else list(config.exclude)
    try:
        groups = nm_param_groups(model, config.n, config.m, exclude=exclude)
    except ValueError as err:
        raise ConfigError("exclude", config.exclude, str(err)) from err
    kwargs: dict[str, Any] = {
        "lr": config.lr,
        "momentum": config.momentum,
        "weight_decay": config.weight_decay,
        "n": config.n,
        "m": config.m,
        "total_steps": total_steps,
        "delta_t": config.delta_t,
        "alpha": config.alpha,  # None: the method's own (fixed or default) value
        "beta": config.beta,
        "seed": config.seed,
    }
    taken = accepted_keywords(config.method)  # e.g. dense SGD takes no N:M keywords
    return make_optimizer(config.method, groups, **{k: v for k, v in kwargs.items() if k in taken})
