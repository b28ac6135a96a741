"""Using :class:`bame_optim.BAMESGD` under 🤗 Accelerate (data parallel, several processes).

What already works without this module (and is tested in ``tests/test_accelerate.py``):

* **Step counter.** ``AcceleratedOptimizer.step()`` calls ``BAMESGD.step()`` only when
  gradients are synchronised, so under ``accelerator.accumulate(model)`` the schedule counts
  real updates only. A step that a ``GradScaler`` skips (fp16 overflow) never reaches
  ``BAMESGD.step()`` either: BAMESGD deliberately does not set ``_step_supports_amp_scaling``.
* **Checkpoints.** ``accelerator.save_state`` / ``load_state`` restore masks (their compact
  integer codes), the oscillation EMA, momentum and the schedule exactly: the state holds only
  tensors, ints, floats, strings, lists and dicts (``weights_only=True`` loading accepts it), and
  ``BAMESGD.load_state_dict`` undoes the dtype casts of ``Optimizer.load_state_dict`` (also
  for the state-dict round trip inside ``Accelerator.prepare``).
* **Same masks on every rank.** Mask updates are deterministic functions of the weights, the
  all-reduced gradients and the step counter, so ranks agree by construction.

What this module adds is the *check* of the last point, for when something outside BAMESGD
breaks it (a rank that edits a mask, non-deterministic gradient reduction, a resumed rank that
loaded another checkpoint): :func:`verify_masks` and the step hook :class:`MaskSync`.

.. code-block:: python

    accelerator = Accelerator()
    model, optimizer, loader = accelerator.prepare(model, BAMESGD(...), loader)
    sync = MaskSync(optimizer, accelerator)
    for x, y in loader:
        with accelerator.accumulate(model):
            accelerator.backward(loss_fn(model(x), y))
            optimizer.step()
            sync.after_step()  # a collective on mask-update steps: call it on every rank
            optimizer.zero_grad()

FSDP2 (``fully_shard``; Accelerate's ``fsdp_version=2``): BAMESGD works on the ``DTensor``
shards itself (see :mod:`bame_optim.optim.sharded`; tested with ``torch.distributed.checkpoint``
and two processes in ``tests/test_fsdp.py``). A sharded parameter has a single copy of each
block, so :func:`verify_masks` compares only the step counters and the unsharded parameters.
Not supported: FSDP1 (flat parameters) and DeepSpeed ZeRO (the wrapped optimizer never sees
whole rows). Both collectives go through
:func:`accelerate.utils.gather` and :func:`accelerate.utils.broadcast` when an ``Accelerator``
is given, and through :mod:`torch.distributed` otherwise.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import broadcast as _acc_broadcast
from accelerate.utils import broadcast_object_list as _acc_broadcast_objects
from accelerate.utils import gather as _acc_gather
from torch import Tensor
from torch.optim import Optimizer

from bame_optim.optim.base import NMOptimizer
from bame_optim.optim.sharded import is_sharded

__all__ = ["MaskSync", "unwrap_optimizer", "verify_masks"]

_HASH = 2654435761
"""Knuth's multiplicative hash constant: per-block weights of the mask checksum."""
_PARAM_FIELDS = 4
"""Checksum row per parameter: has mask, kept count, mask hash, oscillation hash (-1 without
an oscillation EMA)."""
_INT_OF = {8: torch.int64, 4: torch.int32, 2: torch.int16}


def unwrap_optimizer(optimizer: Optimizer) -> NMOptimizer:
    """The N:M optimizer (:class:`~bame_optim.optim.base.NMOptimizer`) inside ``optimizer``:
    itself, or the one that an
    ``AcceleratedOptimizer`` (or any wrapper with an ``optimizer`` attribute) holds.

    Raises ``TypeError`` when there is none.
    """
    seen = optimizer
    for _ in range(8):
        if isinstance(seen, NMOptimizer):
            return seen
        seen = getattr(seen, "optimizer", None)
        if seen is None:
            break
    raise TypeError(
        f"Invalid optimizer: {type(optimizer).__name__} holds no N:M optimizer (BAMESGD or a peer)"
    )


def _world(accelerator: Accelerator | None) -> tuple[int, int]:
    """``(world size, rank)`` of the processes the check runs over."""
    if accelerator is not None:
        return accelerator.num_processes, accelerator.process_index
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _gather(row: Tensor, accelerator: Accelerator | None, world: int) -> Tensor:
    """All ranks' ``row`` (1-d) as ``[world, len(row)]`` on the CPU."""
    if accelerator is not None:
        gathered = _acc_gather(row)
    else:
        parts = [torch.empty_like(row) for _ in range(world)]
        dist.all_gather(parts, row)
        gathered = torch.cat(parts)
    return gathered.reshape(world, -1).cpu()


def _broadcast_(tensor: Tensor, accelerator: Accelerator | None) -> None:
    """Overwrite ``tensor`` in place with rank 0's (``bool`` travels as ``uint8``)."""
    buffer = tensor.to(torch.uint8) if tensor.dtype == torch.bool else tensor.contiguous()
    if accelerator is not None:
        result = _acc_broadcast(buffer, from_process=0)
    else:
        dist.broadcast(buffer, src=0)
        result = buffer
    if result is not tensor:
        tensor.copy_(result.to(tensor.dtype))


def _broadcast_objects_(objects: list[Any], accelerator: Accelerator | None) -> None:
    """Replace ``objects`` (picklable) by rank 0's, in place."""
    if accelerator is not None:
        _acc_broadcast_objects(objects, from_process=0)
    else:
        dist.broadcast_object_list(objects, src=0)


def _hash(values: Tensor, device: torch.device) -> Tensor:
    """Position-weighted sum of an integer tensor, in wrapping int64 arithmetic (exact and
    independent of the reduction order, so equal inputs give equal sums on every rank)."""
    flat = values.reshape(-1).to(torch.int64)
    weights = torch.arange(flat.numel(), dtype=torch.int64, device=device) * _HASH % 2**31 + 1
    return (flat * weights).sum()


def _has_mask(state: dict[str, Any]) -> bool:
    return "kept" in state or "mask" in state  # BAMESGD's codes, the dense-weight peers' mask


def _param_row(optimizer: NMOptimizer, p: Tensor, device: torch.device) -> list[Tensor]:
    zero = torch.zeros((), dtype=torch.int64, device=device)
    state = optimizer.state.get(p, {})
    # A sharded parameter's blocks exist once, on different ranks: nothing to compare.
    mask = optimizer.kept_mask(p) if _has_mask(state) and not is_sharded(p) else None
    if mask is None:
        return [zero, zero, zero, zero]
    mask = mask.to(device)
    m = mask.shape[-1]
    position = torch.arange(1, m + 1, dtype=torch.int64, device=device)
    codes = (mask.to(torch.int64) * position).sum(-1)  # one code per block, order-aware
    oscillation = state.get("oscillation")
    if oscillation is None:
        oscillation_hash = zero - 1
    else:
        oscillation = oscillation.to(device).contiguous()
        oscillation_hash = _hash(oscillation.view(_INT_OF[oscillation.element_size()]), device)
    return [zero + 1, mask.sum().to(torch.int64), _hash(codes, device), oscillation_hash]


def _names(optimizer: NMOptimizer) -> list[str]:
    names = []
    for g, group in enumerate(optimizer.param_groups):
        given = group.get("param_names")
        names += [given[j] if given else f"group{g}.param{j}" for j in range(len(group["params"]))]
    return names


@torch.no_grad()
def _repair(optimizer: NMOptimizer, p: Tensor, accelerator: Accelerator | None) -> None:
    """Make parameter ``p`` and its whole optimizer state (mask, oscillation EMA, momentum,
    counters; whatever the method keeps) rank 0's. Every rank runs this, in the same order.
    The state travels pickled, so its keys, shapes and dtypes follow rank 0's too."""
    state = optimizer.state.get(p, {})
    payload = [{k: v.cpu() if isinstance(v, Tensor) else v for k, v in state.items()}]
    _broadcast_objects_(payload, accelerator)
    received = {k: v.to(p.device) if isinstance(v, Tensor) else v for k, v in payload[0].items()}
    if received:
        optimizer.state[p] = received
    else:
        optimizer.state.pop(p, None)
    _broadcast_(p.data, accelerator)


def verify_masks(
    optimizer: Optimizer, accelerator: Accelerator | None = None, *, fix: bool = True
) -> bool:
    """Check that every rank holds the same BAMESGD masks, oscillation EMA and step counters.

    A **collective**: every process must call it at the same point. It computes on the
    parameters' device, per parameter, a few int64 checksums (whether it has a mask, the kept
    count, a position-weighted hash of the mask bits and a hash of the raw bits of the
    oscillation EMA; any single changed bit or moved kept entry changes them), adds each
    group's ``step``, and runs one ``gather`` of that small vector.

    Without an ``accelerator`` it uses :mod:`torch.distributed` if initialised; in a single
    process it returns ``True`` at once.

    If some rank differs from rank 0 and ``fix`` is true, every rank (i) takes rank 0's step
    counter for the groups that differ and (ii) for each parameter that differs, receives rank
    0's weight (``broadcast``) and whole optimizer state of that parameter (mask codes,
    oscillation EMA, momentum, ...; ``broadcast_object_list``), so afterwards every rank
    continues exactly as rank 0 would; and a ``RuntimeWarning`` naming the parameters
    (``param_names`` of the group, else ``group{g}.param{j}``) and the ranks is issued on
    every rank.

    Args:
        optimizer: a :class:`BAMESGD`, or the ``AcceleratedOptimizer`` around one.
        accelerator: the ``Accelerator`` the optimizer was prepared with, or ``None``.
        fix: repair a mismatch from rank 0 (else only report it).

    Returns:
        ``True`` iff all ranks agreed (before any repair).
    """
    opt = unwrap_optimizer(optimizer)
    world, rank = _world(accelerator)
    if world == 1:
        return True
    params = [(group, p) for group in opt.param_groups for p in group["params"]]
    device = accelerator.device if accelerator is not None else params[0][1].device
    steps = [
        torch.tensor(group["step"], dtype=torch.int64, device=device) for group in opt.param_groups
    ]
    fields = [x for _, p in params for x in _param_row(opt, p, device)]
    gathered = _gather(torch.stack(steps + fields), accelerator, world)

    num_groups = len(steps)
    step_rows = gathered[:, :num_groups]
    param_rows = gathered[:, num_groups:].reshape(world, len(params), _PARAM_FIELDS)
    bad_groups = (step_rows != step_rows[0]).any(0).nonzero().flatten().tolist()
    compared = param_rows
    bad_params = (compared != compared[0]).any(-1).any(0).nonzero().flatten().tolist()
    if not bad_groups and not bad_params:
        return True

    ranks = (
        ((step_rows != step_rows[0]).any(1) | (compared != compared[0]).flatten(1).any(1))
        .nonzero()
        .flatten()
        .tolist()
    )
    names = _names(opt)
    message = (
        f"verify_masks (rank {rank}): ranks {ranks} differ from rank 0 in "
        + (f"the step counter of param groups {bad_groups}; " if bad_groups else "")
        + (f"the masks of {[names[i] for i in bad_params]}" if bad_params else "")
    )
    if fix:
        for g in bad_groups:
            opt.param_groups[g]["step"] = int(step_rows[0, g])
        for i in bad_params:
            _repair(opt, params[i][1], accelerator)
        message += "; rank 0's masks, oscillation EMA, weights and momentum were broadcast"
    warnings.warn(message, RuntimeWarning, stacklevel=2)
    return False


class MaskSync:
    """Runs :func:`verify_masks` after the optimizer steps that may have changed a mask.

    Call :meth:`after_step` on **every** rank right after **every** ``optimizer.step()``
    (including the ones Accelerate skips under gradient accumulation and the ones a grad scaler
    skips): it compares the step counters with those it saw last, so it checks only when a
    real step ran with a counter ``t = group["step"] - 1`` that is a mask-update step
    (the optimizer's ``mask_update_due``) of a group holding masks. The counters are
    equal on every rank, so every rank joins the collective at the same calls.

    Args:
        optimizer: a :class:`BAMESGD` or the ``AcceleratedOptimizer`` around one.
        accelerator: the ``Accelerator`` (``None``: :mod:`torch.distributed` if initialised).
        every_update: check after every mask-update step; ``False`` checks only after the last
            one (``last_mask_update`` of the optimizer), when the masks become final (every step for
            methods whose masks are never final, such as SR-STE).
        fix: passed to :func:`verify_masks`.

    The object keeps only the counters it last saw; nothing is stored in modules or globals.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        accelerator: Accelerator | None = None,
        *,
        every_update: bool = True,
        fix: bool = True,
    ) -> None:
        self.optimizer = unwrap_optimizer(optimizer)
        self.accelerator = accelerator
        self.every_update = every_update
        self.fix = fix
        self._seen = self._steps()

    def _steps(self) -> list[int]:
        return [group["step"] for group in self.optimizer.param_groups]

    def _due(self, group: dict[str, Any], old: int, new: int) -> bool:
        if not any(_has_mask(self.optimizer.state.get(p, {})) for p in group["params"]):
            return False
        if not self.every_update:
            last = self.optimizer.last_mask_update(group)
            return last is None or old <= last < new
        return any(self.optimizer.mask_update_due(group, t) for t in range(old, new))

    def after_step(self) -> bool | None:
        """Verify the masks if a real step since the last call may have changed one.

        Returns:
            ``None`` if no check was due, else the result of :func:`verify_masks`.
        """
        steps = self._steps()
        old = self._seen if len(self._seen) == len(steps) else [0] * len(steps)
        self._seen = steps
        groups = self.optimizer.param_groups
        if not any(self._due(g, a, b) for g, a, b in zip(groups, old, steps, strict=True)):
            return None
        return verify_masks(self.optimizer, self.accelerator, fix=self.fix)
