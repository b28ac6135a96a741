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
loaded another checkpoint): :func:`verify_masks` and the step hook :class:`MaskSync`. The
check compares checksums of each parameter's mask, oscillation EMA and weights and of the step
counters, says which of them differed on which ranks, and repairs them from rank 0.

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

import math
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

__all__ = ["MaskSync", "optimizer_steps", "unwrap_optimizer", "verify_masks"]

_INT_OF = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}
_CHUNK = 2**20
"""Entries per pass of the codes: bounds their ``int64`` temporaries (8 MiB each)."""
_BITS = 62
"""Positions per exact block code ``sum(2**j * kept_j)`` (``< 2**62``; a longer block is
cut into pieces of 62)."""
_FIELDS = {
    "mask": slice(0, 4),
    "oscillation EMA": slice(4, 6),
    "weights": slice(6, 7),
}
"""What each part of a parameter's checksum row covers: has mask, kept count, block code,
entry code | has oscillation EMA, its code | code of the weights."""
_PARAM_FIELDS = 7


def _mix(index: Tensor) -> Tensor:
    """MurmurHash3's 64-bit finaliser of ``index + 1`` (``int64``, wrapping): a bijection of
    64-bit words that maps only 0 to 0, so distinct indices get distinct non-zero values."""
    z = index + 1
    for multiplier in (-49064778989728563, -4265267296055464877):  # 0xff51...cd, 0xc4ce...53
        z = (z ^ _shift_right(z, 33)) * multiplier
    return z ^ _shift_right(z, 33)


def _shift_right(z: Tensor, bits: int) -> Tensor:
    """Logical right shift of ``int64`` words (torch shifts arithmetically)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def _code(values: Tensor, *, odd: bool, start: int = 0) -> Tensor:
    """``sum_i values_i * w_(start + i)`` modulo ``2**64`` (wrapping ``int64``; exact, so
    independent of the reduction order and equal on every rank for equal inputs) over the
    flattened ``values`` (an integer tensor), with ``w_i = _mix(i)``, or ``_mix(i) | 1`` when
    ``odd``; in chunks of :data:`_CHUNK` entries.

    With odd weights any difference in a **single** entry changes the code (``d * w != 0``
    modulo ``2**64`` for odd ``w`` and ``d != 0`` modulo ``2**64``); with ``_mix(i)`` (distinct,
    non-zero) a 0/1 tensor's code changes when one entry flips or when two entries swap
    (``w_a - w_b != 0``). Differences in several entries are missed only if their weighted sum
    cancels modulo ``2**64``; nothing rules that out, but no structure of the data makes it
    likely (the weights are pseudo-random)."""
    flat = values.reshape(-1)
    total = torch.zeros((), dtype=torch.int64, device=flat.device)
    for first in range(0, flat.numel(), _CHUNK):
        part = flat[first : first + _CHUNK].to(torch.int64)
        index = torch.arange(part.numel(), dtype=torch.int64, device=flat.device) + start + first
        weights = _mix(index) | 1 if odd else _mix(index)
        total += (part * weights).sum()
    return total


def _bits_code(tensor: Tensor) -> Tensor:
    """:func:`_code` of the raw bits of ``tensor`` (each entry read as an integer of its size):
    bitwise, so any single changed entry (a last-bit rounding difference, ``-0.0`` against
    ``0.0``, another NaN) changes it."""
    tensor = tensor.detach()
    if tensor.is_complex():
        tensor = torch.view_as_real(tensor)
    return _code(tensor.contiguous().view(_INT_OF[tensor.element_size()]), odd=True)


def _mask_codes(mask: Tensor) -> list[Tensor]:
    """Kept count, block code and entry code of a ``[K, M]`` bool mask.

    Block code: per block (pieces of :data:`_BITS` positions when ``M > 62``) the exact,
    one-to-one code ``c = sum_j 2**j * kept_j``, combined as :func:`_code` with odd weights.
    So **any** difference inside one block of ``M <= 62`` (any other kept set: a moved kept
    entry, the swap ``{0, 3}`` / ``{1, 2}`` of 2:4, ...) changes it. Entry code: :func:`_code`
    of the flattened mask; it changes with any single flipped entry and any single swap of
    two entries, for every ``M``. Differences in several blocks are very likely but not
    certainly seen (see :func:`_code`)."""
    k, m = mask.shape
    width = min(m, _BITS)
    pieces = -(-m // width)
    powers = 2 ** torch.arange(width, dtype=torch.int64, device=mask.device)
    rows = max(1, _CHUNK // (pieces * width))
    block_code = torch.zeros((), dtype=torch.int64, device=mask.device)
    for first in range(0, k, rows):
        part = mask[first : first + rows].to(torch.int64)
        if pieces * width != m:  # M > 62, not a multiple of 62: pad the last piece
            part = torch.nn.functional.pad(part, (0, pieces * width - m))
        codes = (part.reshape(-1, width) * powers).sum(-1)
        block_code += _code(codes, odd=True, start=first * pieces)
    return [mask.sum().to(torch.int64), block_code, _code(mask, odd=False)]


def optimizer_steps(batches_per_epoch: int, epochs: int, gradient_accumulation_steps: int) -> int:
    """The ``total_steps`` of an N:M optimizer under ``accelerator.accumulate``: optimizer
    steps, not batches. Accelerate also steps at the end of every epoch's loader, so an epoch
    of ``B`` batches gives ``ceil(B / gradient_accumulation_steps)`` steps (a plain loop that
    steps every ``k``-th batch gives ``B // k``). Give ``len()`` of the prepared loader (one
    process's share of the batches)."""
    for name, value, least in (("batches_per_epoch", batches_per_epoch, 1), ("epochs", epochs, 1),
                               ("gradient_accumulation_steps", gradient_accumulation_steps, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"Invalid {name} value: {value!r} (an integer >= {least} is required)")
    return epochs * math.ceil(batches_per_epoch / gradient_accumulation_steps)


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


def _has_mask(state: dict[str, Any]) -> bool:
    return "kept" in state or "mask" in state  # BAMESGD's codes, the dense-weight peers' mask


def _param_row(optimizer: NMOptimizer, p: Tensor, device: torch.device) -> list[Tensor]:
    """The ``int64`` checksums of ``p`` (see :data:`_FIELDS`), on ``device``. Each is
    computed on the device of the tensor it covers. A sharded parameter's blocks and weights
    exist once, on different ranks: its row is constant."""
    zero = torch.zeros((), dtype=torch.int64, device=device)
    if is_sharded(p):
        return [zero] * _PARAM_FIELDS
    state = optimizer.state.get(p, {})
    mask = optimizer.kept_mask(p) if _has_mask(state) else None
    row = [zero] * 4 if mask is None else [zero + 1, *_mask_codes(mask)]
    oscillation = state.get("oscillation")
    row += [zero, zero] if oscillation is None else [zero + 1, _bits_code(oscillation)]
    row.append(_bits_code(p))
    return [x.to(device) for x in row]


def _differences(rows: Tensor) -> dict[str, list[int]]:
    """For the ``[world, _PARAM_FIELDS]`` rows of one parameter: what differs from rank 0
    (keys of :data:`_FIELDS`) and on which ranks."""
    found = {}
    for what, fields in _FIELDS.items():
        ranks = (rows[:, fields] != rows[0, fields]).any(1).nonzero().flatten().tolist()
        if ranks:
            found[what] = ranks
    return found


def _describe(name: str, found: dict[str, list[int]]) -> str:
    parts = [f"the {what} (ranks {ranks})" for what, ranks in found.items()]
    return f"{name!r}: " + ", ".join(parts)


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
    """Check that every rank holds the same masks, oscillation EMA, weights and step counters.

    A **collective**: every process must call it at the same point. It computes, per
    parameter, seven ``int64`` checksums on the device of the tensors they cover
    (:func:`_param_row`): for the mask whether there is one, its kept count, a block code and
    an entry code; for the oscillation EMA whether there is one and a bitwise code; a bitwise
    code of the weights. It adds each group's ``step`` and runs one ``gather`` of that vector.

    What a difference is certain to show (codes modulo ``2**64``, see :func:`_mask_codes` and
    :func:`_code`): any difference of the mask inside one block (``M <= 62``; for larger
    ``M`` inside one piece of 62 positions) and any single flipped or swapped mask entry;
    any single differing entry of the oscillation EMA or of the weights (bitwise, down to the
    last bit); any step counter. Differences spread over several blocks or entries are missed
    only if their pseudo-randomly weighted sum cancels modulo ``2**64``: not impossible, but
    no pattern of the data makes it likely. Momentum is not compared (a differing momentum
    makes the weights differ at the next check).

    Without an ``accelerator`` it uses :mod:`torch.distributed` if initialised; in a single
    process it returns ``True`` at once.

    If some rank differs from rank 0, a ``RuntimeWarning`` is issued on every rank that says
    what differed and where: the step counter of which param group, and for each parameter
    (``param_names`` of the group, else ``group{g}.param{j}``) whether its mask, oscillation
    EMA or weights differed, each with the ranks. If ``fix`` is true, every rank then (i) takes
    rank 0's step counter for the groups that differ and (ii) for each parameter that
    differs, receives rank 0's weight (``broadcast``) and whole optimizer state of that
    parameter (mask codes, oscillation EMA, momentum, ...; ``broadcast_object_list``), so
    afterwards every rank continues exactly as rank 0 would.

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
    bad_groups = {
        g: ranks
        for g in range(num_groups)
        if (ranks := (step_rows[:, g] != step_rows[0, g]).nonzero().flatten().tolist())
    }
    bad_params = {i: found for i in range(len(params)) if (found := _differences(param_rows[:, i]))}
    if not bad_groups and not bad_params:
        return True

    ranks = sorted(
        {r for found in bad_groups.values() for r in found}
        | {r for found in bad_params.values() for ranks in found.values() for r in ranks}
    )
    names = _names(opt)
    details = [f"the step counter of param group {g} (ranks {r})" for g, r in bad_groups.items()]
    details += [_describe(names[i], found) for i, found in bad_params.items()]
    message = f"verify_masks (rank {rank}): ranks {ranks} differ from rank 0 in " + "; ".join(
        details
    )
    if fix:
        for g in bad_groups:
            opt.param_groups[g]["step"] = int(step_rows[0, g])
        for i in bad_params:
            _repair(opt, params[i][1], accelerator)
        message += (
            "; repaired: rank 0's step counters and, for those parameters, its weights and "
            "whole optimizer state (mask, oscillation EMA, momentum) were broadcast"
        )
    else:
        message += "; not repaired (fix=False)"
    warnings.warn(message, RuntimeWarning, stacklevel=2)
    return False


class MaskSync:
    """Runs :func:`verify_masks` after the optimizer steps that may have changed a mask.

    Call :meth:`after_step` on **every** rank right after **every** ``optimizer.step()``
    (including the ones Accelerate skips under gradient accumulation and the ones a grad scaler
    skips): it compares the step counters with those it saw last, so it checks only when a
    real step ran with a counter ``t = group["step"] - 1`` that is a mask-update step
    (the optimizer's ``mask_update_due``) of a group holding masks, after the first real step
    it sees (a rank resumed from another checkpoint, in any phase), and, once the masks are
    final, every ``delta_t`` steps (``t % delta_t == 0``, where the optimizer re-masks the
    weights). The counters are equal on every rank (the first check makes them so), so every
    rank joins the collective at the same calls.

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
        self._checked = False

    def _steps(self) -> list[int]:
        return [group["step"] for group in self.optimizer.param_groups]

    def _due(self, group: dict[str, Any], old: int, new: int) -> bool:
        if not any(_has_mask(self.optimizer.state.get(p, {})) for p in group["params"]):
            return False
        last = self.optimizer.last_mask_update(group)
        if not self.every_update:
            return last is None or old <= last < new
        if any(self.optimizer.mask_update_due(group, t) for t in range(old, new)):
            return True
        interval = group.get("delta_t")
        return last is not None and bool(interval) and any(
            t > last and t % interval == 0 for t in range(old, new)
        )

    def after_step(self) -> bool | None:
        """Verify the masks if a real step since the last call may have changed one.

        Returns:
            ``None`` if no check was due, else the result of :func:`verify_masks`.
        """
        steps = self._steps()
        old = self._seen if len(self._seen) == len(steps) else [0] * len(steps)
        self._seen = steps
        groups = self.optimizer.param_groups
        first = not self._checked and steps != old
        if not first and not any(
            self._due(g, a, b) for g, a, b in zip(groups, old, steps, strict=True)
        ):
            return None
        self._checked = True
        return verify_masks(self.optimizer, self.accelerator, fix=self.fix)
