"""The model and the optimizer of a training run: :func:`build_training_model` (the config's
network for the data's classes and channels) and :func:`build_training_optimizer` (the method's
optimizer from :func:`bame_optim.methods.make_optimizer` over the model's N:M parameter
groups; ``optimizer="adamw"`` picks the method's AdamW variant)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from bame_optim import nm_param_groups
from bame_optim.methods import accepted_keywords, make_optimizer

from ..models import DEIT_SMALL, build_model, deit_small
from .config import ConfigError, TrainingConfig
from .data import TrainingData

__all__ = ["build_training_model", "build_training_optimizer", "vit_sizes"]


def vit_sizes(config: TrainingConfig) -> dict[str, int]:
    """The ``VisionTransformer`` sizes of ``config``'s DeiT: DeiT-small's with
    ``config.network.vit_depth`` blocks, ``config.network.vit_width`` wide (``width / 64``
    heads of width 64 and an MLP of ``4 x width``, as every DeiT) and
    ``config.network.vit_patch`` patches."""
    width = config.network.vit_width
    return {
        **DEIT_SMALL,
        "num_layers": config.network.vit_depth,
        "hidden_dim": width,
        "num_heads": width // 64,
        "mlp_dim": 4 * width,
        "patch_size": config.network.vit_patch,
    }


def build_training_model(config: TrainingConfig, data: TrainingData) -> nn.Module:
    """The ``config.network.model`` network for ``data`` (DeiT-small with :func:`vit_sizes`, at the
    data's image size, which must divide by ``config.network.vit_patch``: else
    :class:`~.config.ConfigError` naming ``vit_patch``), its 4-D weights in the channels-last
    memory format with ``config.optim.channels_last``."""
    model = _network(config, data)
    return model.to(memory_format=torch.channels_last) if config.optim.channels_last else model


def _network(config: TrainingConfig, data: TrainingData) -> nn.Module:
    if config.network.model == "deit_small":
        image_size = data.info["input_shape"][-1]
        sizes = vit_sizes(config)
        patch = sizes["patch_size"]
        if image_size % patch:
            raise ConfigError(
                "vit_patch",
                patch,
                f"the images are {image_size} pixels wide, not a multiple of the patch size; "
                "give another patch size, or an image size that divides by it (the cifar10 and "
                "imagenet presets crop to it)",
            )
        if sizes == DEIT_SMALL:
            return deit_small(data.num_classes, data.in_channels, image_size=image_size)
        from torchvision.models import VisionTransformer

        model = VisionTransformer(image_size=image_size, num_classes=data.num_classes, **sizes)
        if data.in_channels != 3:
            proj = model.conv_proj
            model.conv_proj = nn.Conv2d(data.in_channels, proj.out_channels, patch, patch)
        return model
    return build_model(config.network.model, data.num_classes, data.in_channels)


def build_training_optimizer(
    config: TrainingConfig, model: nn.Module, total_steps: int
) -> Optimizer:
    """The optimizer of ``config.registered_method`` (``method_name(method, optimizer)``: e.g.
    ``bame`` with ``adamw`` is :class:`bame_optim.BAMEAdamW`, ``dense`` with ``adamw``
    :class:`torch.optim.AdamW`) over ``model``'s N:M parameter groups (modules matching
    ``config.network.exclude`` kept dense), scheduled over ``total_steps`` optimizer steps.

    With AdamW the groups split off, with ``weight_decay=0``, the 1-D parameters, the position
    embedding and the class token (:func:`bame_optim.nm_param_groups` with
    ``weight_decay=config.optim.weight_decay``, as DeiT trains); with SGD only the 1-D parameters.
    Only the keywords the method takes are passed (``momentum`` means nothing to AdamW,
    ``betas`` nothing to SGD, ``delta_t`` and ``seed`` nothing to a dense optimizer). Patterns
    that match no module raise :class:`~.config.ConfigError` naming ``exclude``."""
    exclude = None if config.network.exclude is None else list(config.network.exclude)
    decay = {"weight_decay": config.optim.weight_decay} if config.optim.optimizer == "adamw" else {}
    try:
        n, m = config.network.n, config.network.m
        groups = nm_param_groups(model, n, m, exclude=exclude, **decay)
    except ValueError as err:
        raise ConfigError("exclude", config.network.exclude, str(err)) from err
    kwargs: dict[str, Any] = {
        "lr": config.optim.lr,
        "momentum": config.optim.momentum,
        "betas": config.optim.betas,
        "eps": config.optim.eps,
        "weight_decay": config.optim.weight_decay,
        "n": config.network.n,
        "m": config.network.m,
        "total_steps": total_steps,
        "delta_t": config.network.delta_t,
        "alpha": config.network.alpha,  # None: the method's own (fixed or default) value
        "beta": config.network.beta,
        "seed": config.optim.seed,
    }
    method = config.registered_method
    taken = accepted_keywords(method)  # e.g. dense SGD takes no N:M keywords
    return make_optimizer(method, groups, **{k: v for k, v in kwargs.items() if k in taken})
