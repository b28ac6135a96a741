"""torch's optimizer keywords that change the path a step takes (``fused``, ``foreach``) or ask
for what a mask update cannot give (``capturable``, ``differentiable``): their checks, shared
by :class:`bame_optim.BAMESGD` and :class:`bame_optim.BAMEAdamW`."""

from __future__ import annotations

from typing import Any

__all__ = ["FUSED_DEVICE_TYPES", "check_fused_flags"]

FUSED_DEVICE_TYPES = ("cpu", "cuda")
"""Devices with a fused step: the native CPU kernels and the Triton kernels on CUDA (torch's
own fused optimizers for dense parameters)."""

_UNSUPPORTED = {
    "capturable": "a mask update reads masks and scores on the host, which CUDA graphs cannot "
                  "capture",
    "differentiable": "mask updates are not differentiable",
}


def check_fused_flags(group: dict[str, Any], owner: str, torch_keywords: tuple[str, ...]) -> None:
    """``ValueError`` naming a bad ``fused`` of ``group`` (not ``None``/``True``/``False``, or
    ``True`` with ``foreach=True``, or ``True`` for a parameter on a device without a fused
    step), or one of torch's ``torch_keywords`` (``capturable``, ``differentiable``) set to
    anything but ``False``, with the reason it is not supported."""
    for name in torch_keywords:
        if group[name] is not False:
            raise ValueError(f"Invalid {name} value: {group[name]!r} ({owner} supports only "
                             f"{name}=False: {_UNSUPPORTED[name]})")
    fused = group["fused"]
    if fused not in (None, True, False):
        raise ValueError(f"Invalid fused value: {fused!r} (True, False or None)")
    if fused and group["foreach"]:
        raise ValueError("Invalid fused value: True with foreach=True (choose one, as in torch)")
    if fused:
        for p in group.get("params", ()):  # absent when the defaults are checked
            if p.device.type not in FUSED_DEVICE_TYPES or not p.is_floating_point():
                raise ValueError(
                    f"Invalid fused value: True for a parameter of shape {tuple(p.shape)} on "
                    f"{p.device} with dtype {p.dtype} (fused steps run on "
                    f"{'/'.join(FUSED_DEVICE_TYPES)} floating-point tensors; use fused=None)"
                )
