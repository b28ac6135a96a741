"""BAMESGD: SGD that trains N:M sparse weights with Block-Aware Mask Evolution.

The class only validates arguments and wires ``state`` / ``param_groups`` to the pure
functions of :mod:`bame_optim.core.nm`, :mod:`bame_optim.core.schedule` and
:mod:`bame_optim.core.evolution`;
the SGD arithmetic is in :func:`bame_optim.optim.masked_sgd.masked_sgd`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from bame_optim.core.evolution import (
    DEFAULT_ALPHA,
    DEFAULT_BETA,
    DEFAULT_GAMMA,
    MaskEvolution,
    evolve_mask,
    magnitude_mask,
    obf_freeze,
)
from bame_optim.core.evolution import score_dtype as _score_dtype
from bame_optim.core.kept import (
    encode_kept,
    gather_kept,
    kept_indices,
    mask_from_indices,
    scatter_kept_,
)
from bame_optim.core.nm import (
    blocks_to_param,
    check_nm,
    is_nm_sparse,
    num_blocks,
    param_to_blocks,
    random_nm_mask,
)
from bame_optim.core.schedule import (
    DEFAULT_DELTA_T,
    Phase,
    gradual_budget,
    is_update_step,
    phase,
    resolve_schedule,
)
from bame_optim.optim.masked_sgd import masked_sgd
from bame_optim.optim.sharded import (
    block_range,
    check_row_sharded,
    distribute_state,
    gather_blocks,
    is_sharded,
    local_state,
    local_tensor,
)

__all__ = ["BAMESGD"]

_SEED_STRIDE = 1_000_003
"""Separates the per-parameter generator seeds ``seed * stride + index`` (a prime, so seeds of
nearby (seed, index) pairs do not collide for models with fewer parameters than that)."""


class BAMESGD(Optimizer):
    r"""SGD with momentum that keeps N:M sparse weights and evolves their masks (BAME).

    Dense parameters (``sparse=False`` groups, and with ``sparse=None`` every parameter with
    ``ndim < 2`` or whose dimension 1 does not divide by ``m``) follow :class:`torch.optim.SGD`
    exactly. For a sparse parameter with mask :math:`B` (:meth:`kept_mask`, ``[K, M]`` bool in
    the block view of :mod:`bame_optim.core.nm`) and gradient
    :math:`G = \partial L/\partial(W\odot B)` each ``step()`` at counter :math:`t` does

    .. math::
        &\textbf{if } t \text{ is an update step: } B \leftarrow \text{evolve}(W, G, B, O, t)
            \text{ (Eq. 4-10)},\quad W \leftarrow W \odot B,\quad b \leftarrow b \odot B_{old}
            \odot B \\
        &g \leftarrow G \odot B \; (+\, \lambda W),\quad
        b \leftarrow \mu b + (1-\tau) g,\quad
        g \leftarrow g + \mu b \text{ (Nesterov) else } b,\quad
        W \leftarrow W - \eta g

    so momentum, weight decay and the weight change exist only on kept entries and pruned
    weights stay exactly 0. Update steps are ``t % delta_t == 0`` and ``t == t_i``; by phase
    (see :mod:`bame_optim.core.schedule`): gradual magnitude pruning from M to N kept per block
    before ``t_i``, magnitude pruning to N (or a seeded random N:M mask if ``t_i == 0``) at
    ``t_i``, LMA + OBF (:func:`bame_optim.core.evolution.evolve_mask`) until ``t_f``, fixed after.

    Args:
        params: parameters or param groups (e.g. from :func:`bame_optim.nm_param_groups`).
            A group may override any keyword below and may set ``sparse`` to ``True``
            (every parameter must be N:M-divisible), ``False`` (plain SGD) or ``None`` (auto).
        lr, momentum, dampening, weight_decay, nesterov, maximize, foreach: as
            :class:`torch.optim.SGD`. ``foreach=None`` uses the multi-tensor path when every
            parameter is on CUDA.
        n, m: keep ``n`` of every ``m`` consecutive weights (``1 <= n < m``).
        total_steps: planned number of ``step()`` calls ``T``; needed unless ``t_i`` and
            ``t_f`` are both given.
        t_i, t_f: end of gradual pruning and end of mask evolution (default ``T // 3`` and
            ``2 * T // 3``, the paper's even split).
        delta_t: mask update interval ΔT (default 100, the paper's setting).
        alpha, beta: OBF fractions of Eq. 10 (default 0.5 each); 0 disables freezing.
        gamma: oscillation EMA momentum of Eq. 8 (default 0.9).
        seed: seeds the random start mask used when ``t_i == 0``.

    State of a sparse parameter, kept compact (:mod:`bame_optim.core.kept`): ``kept`` (the kept set
    of every block, one rank per block), ``kept_count`` (kept per block: ``n``, or the gradual
    budget), ``momentum_buffer`` (momentum of the kept weights only, ``[K, kept_count]`` in
    block order; :meth:`momentum_buffer` gives it in the parameter's layout),
    ``oscillation`` (the EMA ``O`` of Eq. 8, ``[K]``, only during the evolve phase: it starts
    at 0 there and is dropped once the mask is fixed), ``last_flips`` and ``last_frozen``.
    Dense parameters have the ``momentum_buffer`` of :class:`torch.optim.SGD`.

    .. note:: The step counter is ``param_groups[i]["step"]``; it advances once per
       ``step()`` that applied an update. A ``step()`` with every gradient ``None`` does
       nothing, and the state-initialising call of ``torch.distributed.checkpoint`` (every
       lr 0, every gradient exactly 0) creates state without advancing or touching masks.
    .. note:: Magnitude-based updates (gradual phase, ``t_i``) need no gradient and apply to
       every sparse parameter of the group, so the N:M guarantee also holds for parameters
       that received no gradient; LMA needs one, and skips (with a warning) a parameter whose
       gradient has NaN or Inf on an update step.
    """

    _extra_defaults: tuple[str, ...] = ()
    """Group keywords a subclass adds (passed through ``**extra_defaults``)."""
    _exact_dtype_state: tuple[str, ...] = ("kept", "oscillation", "kept_mask")
    """State that ``Optimizer.load_state_dict`` would cast to the parameter's dtype."""

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        n: int = 2,
        m: int = 4,
        total_steps: int | None = None,
        t_i: int | None = None,
        t_f: int | None = None,
        delta_t: int = DEFAULT_DELTA_T,
        alpha: float = DEFAULT_ALPHA,
        beta: float = DEFAULT_BETA,
        gamma: float = DEFAULT_GAMMA,
        seed: int = 0,
        sparse: bool | None = None,
        **extra_defaults: Any,
    ) -> None:
        unknown = set(extra_defaults) - set(self._extra_defaults)
        if unknown:
            raise TypeError(
                f"{type(self).__name__}() got unexpected keyword arguments: {sorted(unknown)}"
            )
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            foreach=foreach,
            n=n,
            m=m,
            total_steps=total_steps,
            t_i=t_i,
            t_f=t_f,
            delta_t=delta_t,
            alpha=alpha,
            beta=beta,
            gamma=gamma,
            seed=seed,
            sparse=sparse,
            **extra_defaults,
        )
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (see :meth:`torch.optim.Optimizer.add_param_group`), validating its
        hyper-parameters and resolving its schedule."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _validate_group(group)
        group["t_i"], group["t_f"] = resolve_schedule(
            group["total_steps"], group["t_i"], group["t_f"]
        )
        group.setdefault("step", 0)
        if group["sparse"]:
            for p in group["params"]:
                _check_sparse_param(p, group["m"])

    @staticmethod
    def _is_sparse(p: Tensor, group: dict[str, Any]) -> bool:
        if group["sparse"] is not None:
            return bool(group["sparse"])
        return (
            p.ndim >= 2
            and p.is_floating_point()
            and p.layout == torch.strided
            and p.shape[1] % group["m"] == 0
        )

    def _sparse_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = self.state[p]
        if "kept" not in state:
            # The first forward ran on the untouched (dense) parameter: every weight is kept.
            m = group["m"]
            if is_sharded(p):
                check_row_sharded(p)
            local = local_tensor(p)
            everything = torch.ones(block_range(p, m)[1], m, dtype=torch.bool, device=local.device)
            state["kept"] = distribute_state(encode_kept(everything, m), p, m)
            state["kept_count"] = m
            state["last_flips"] = 0
            state["last_frozen"] = 0
        return state

    def _indices(self, state: dict[str, Any], group: dict[str, Any]) -> Tensor:
        return kept_indices(local_state(state["kept"]), state["kept_count"], group["m"])

    def _is_state_init_call(self) -> bool:
        # torch.distributed.checkpoint initialises optimizer state with lr 0 and zero grads.
        if any(group["lr"] != 0 for group in self.param_groups):
            return False
        grads = [p.grad for group in self.param_groups for p in group["params"]]
        return all(g is None or not _any(g) for g in grads)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One optimization step, with a mask update on update steps.

        Args:
            closure: re-evaluates the model and returns the loss (optional).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = list(chain.from_iterable(g["params"] for g in self.param_groups))
        if all(p.grad is None for p in params):
            return loss
        advance = not self._is_state_init_call()
        index = 0
        for group in self.param_groups:
            self._step_group(group, first_index=index, evolve=advance)
            index += len(group["params"])
            if advance:
                group["step"] += 1
        return loss

    def _step_group(self, group: dict[str, Any], *, first_index: int, evolve: bool) -> None:
        t, t_i, t_f = group["step"], group["t_i"], group["t_f"]
        update = evolve and is_update_step(t, group["delta_t"], t_i, t_f)
        m = group["m"]
        targets, grads, owners, compressed = [], [], [], []
        for offset, p in enumerate(group["params"]):
            if not self._is_sparse(p, group):
                if p.grad is not None:
                    targets.append(p)
                    grads.append(p.grad)
                    owners.append(p)
                continue
            state = self._sparse_state(p, group)
            if update:
                self._update_mask(p, state, group, first_index + offset)
            if evolve and t >= t_f:
                state.pop("oscillation", None)  # the mask is fixed from here on
            if p.grad is None:
                continue
            # SGD on the kept entries only, as [K, kept_count] copies written back below.
            indices = self._indices(state, group)
            kept_weights = gather_kept(local_tensor(p), indices, m)
            targets.append(kept_weights)
            grads.append(gather_kept(local_tensor(p.grad), indices, m))
            owners.append(p)
            compressed.append((p, indices, kept_weights))
        self._sgd_update(group, targets, grads, [None] * len(targets), owners)
        for p, indices, kept_weights in compressed:
            scatter_kept_(local_tensor(p), indices, kept_weights, m)

    def _sgd_update(
        self,
        group: dict[str, Any],
        targets: list[Tensor],
        grads: list[Tensor],
        kept: list[Tensor | None],
        owners: list[Tensor],
    ) -> None:
        """Run :func:`masked_sgd` on ``targets`` with the group's hyper-parameters, keeping
        each momentum buffer in the state of the matching parameter of ``owners``."""
        if not targets:
            return
        # Momentum of a sharded sparse parameter is per-block state: work on this rank's part.
        per_block = [is_sharded(p) and "kept" in self.state[p] for p in owners]
        buffers = [self.state[p].get("momentum_buffer") for p in owners]
        buffers = [
            local_state(b) if b is not None and local else b
            for b, local in zip(buffers, per_block, strict=True)
        ]
        foreach = group["foreach"]
        if foreach is None:
            foreach = all(t.is_cuda for t in targets)
        masked_sgd(
            targets,
            grads,
            buffers,
            kept,
            lr=group["lr"],
            momentum=group["momentum"],
            dampening=group["dampening"],
            weight_decay=group["weight_decay"],
            nesterov=group["nesterov"],
            maximize=group["maximize"],
            foreach=foreach,
        )
        if group["momentum"] != 0:
            for p, buffer, local in zip(owners, buffers, per_block, strict=True):
                if local:
                    buffer = distribute_state(buffer, p, group["m"])
                self.state[p]["momentum_buffer"] = buffer

    def _update_mask(self, p: Tensor, state: dict[str, Any], group: dict[str, Any], index: int):
        n, m, t, t_i = group["n"], group["m"], group["step"], group["t_i"]
        old_indices = self._indices(state, group)
        kept = mask_from_indices(old_indices, m)
        frozen = 0
        current = phase(t, t_i, group["t_f"])
        if current is Phase.PRUNE and t_i == 0:
            new, count = self._start_mask(p, kept, group, index), n
        elif current is not Phase.EVOLVE:
            count = gradual_budget(t, n, m, t_i)
            new = magnitude_mask(param_to_blocks(local_tensor(p), m), kept, count)
        else:
            if p.grad is None:
                return
            grad = param_to_blocks(local_tensor(p.grad), m)
            if not _all_finite(p.grad):
                warnings.warn(
                    f"BAMESGD: the gradient of parameter {index} (shape {tuple(p.shape)}) has "
                    f"NaN or Inf at step {t}; its mask update is skipped for this step",
                    RuntimeWarning,
                    stacklevel=4,
                )
                return
            oscillation = state.get("oscillation")
            if oscillation is None:  # Eq. 8: O starts at 0 with the evolve phase
                oscillation = torch.zeros(
                    kept.shape[0], dtype=_score_dtype(p.dtype), device=kept.device
                )
            else:
                oscillation = local_state(oscillation)
            weight = param_to_blocks(local_tensor(p), m)
            freeze = _sharded_freeze(p, group) if is_sharded(p) else None
            evolution = self._evolve(weight, grad, kept, oscillation, group, freeze)
            state["oscillation"] = distribute_state(evolution.oscillation, p, m)
            new, count = evolution.kept, n
            frozen = int(evolution.frozen.sum())
        changed = kept != new
        # Newly pruned weights go to 0; pruned and revived entries restart with zero momentum.
        local = local_tensor(p)
        local.masked_fill_(blocks_to_param(kept & ~new, local.shape), 0)
        state["kept"], state["kept_count"] = distribute_state(encode_kept(new, count), p, m), count
        buffer = state.get("momentum_buffer")
        if buffer is not None:
            buffer = local_state(buffer)
            dense = torch.zeros(kept.shape, dtype=buffer.dtype, device=buffer.device)
            dense.scatter_(1, old_indices, buffer).masked_fill_(changed, 0)
            compact = dense.gather(1, self._indices(state, group))
            state["momentum_buffer"] = distribute_state(compact, p, m)
        state["last_flips"] = int(changed.sum())
        state["last_frozen"] = frozen

    def _start_mask(self, p: Tensor, kept: Tensor, group: dict[str, Any], index: int) -> Tensor:
        """The mask drawn at ``t_i == 0`` (no gradual phase): a random N:M mask from a
        generator seeded with ``seed`` and the parameter's index, the same on every rank."""
        generator = torch.Generator().manual_seed(group["seed"] * _SEED_STRIDE + index)
        m = group["m"]
        whole = random_nm_mask(num_blocks(p.shape, m), group["n"], m, generator, kept.device)
        first, count = block_range(p, m)  # a sharded parameter takes its own rows' blocks
        return whole[first : first + count]

    def _evolve(
        self,
        weight: Tensor,
        grad: Tensor,
        kept: Tensor,
        oscillation: Tensor,
        group: dict[str, Any],
        freeze: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> MaskEvolution:
        """The evolve-phase mask update of one parameter, on block views: LMA + OBF
        (:func:`bame_optim.core.evolution.evolve_mask`; ``freeze`` ranks the blocks of all shards
        of a sharded parameter). Peer methods override this."""
        return evolve_mask(
            weight,
            grad,
            kept,
            oscillation,
            n=group["n"],
            lr=group["lr"],
            alpha=group["alpha"],
            beta=group["beta"],
            gamma=group["gamma"],
            freeze=freeze,
        )

    def state_dict(self) -> dict[str, Any]:
        """As :meth:`torch.optim.Optimizer.state_dict`. The state of a sharded (FSDP2)
        sparse parameter is given in a form whose shapes do not depend on the phase, because
        ``torch.distributed.checkpoint`` loads into tensors of the shapes that a fresh
        optimizer's state has: ``kept_mask`` (``[K, M]`` bool, row layout), a dense
        ``momentum_buffer`` like the parameter, and ``oscillation`` (zeros when absent).
        :meth:`load_state_dict` turns it back into the compact state."""
        saved = super().state_dict()
        params = chain.from_iterable(group["params"] for group in self.param_groups)
        for i, p in enumerate(params):
            state = saved["state"].get(i)
            if state is not None and "kept" in state and is_sharded(p):
                saved["state"][i] = self._checkpoint_form(p, state)
        return saved

    def _checkpoint_form(self, p: Tensor, state: dict[str, Any]) -> dict[str, Any]:
        group = self._group_of(p)
        m = group["m"]
        indices = self._indices(state, group)
        form = {k: v for k, v in state.items() if k not in ("kept", "momentum_buffer")}
        form["kept_mask"] = distribute_state(mask_from_indices(indices, m), p, m)
        if "oscillation" not in state:
            zeros = torch.zeros(
                indices.shape[0], dtype=_score_dtype(p.dtype), device=indices.device
            )
            form["oscillation"] = distribute_state(zeros, p, m)
        buffer = state.get("momentum_buffer")
        if buffer is not None:
            local = local_tensor(p)
            dense = scatter_kept_(torch.zeros_like(local), indices, local_state(buffer), m)
            form["momentum_buffer"] = _like(dense, p)
        return form

    def _compact_form(self, p: Tensor, state: dict[str, Any]) -> None:
        group = self._group_of(p)
        m = group["m"]
        mask = local_state(state.pop("kept_mask"))
        state["kept"] = distribute_state(encode_kept(mask, state["kept_count"]), p, m)
        buffer = state.get("momentum_buffer")
        if buffer is not None:
            compact = gather_kept(local_tensor(buffer), self._indices(state, group), m)
            state["momentum_buffer"] = distribute_state(compact, p, m)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`, keeping masks and the oscillation EMA in their saved
        dtypes (``Optimizer.load_state_dict`` casts every state tensor to the parameter's
        dtype; ``Accelerator.prepare`` round-trips through it once)."""
        saved = state_dict["state"]
        ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        exact = {
            i: {k: saved[i][k] for k in self._exact_dtype_state if k in saved[i]}
            for i in ids
            if i in saved
        }
        super().load_state_dict(state_dict)
        params = chain.from_iterable(group["params"] for group in self.param_groups)
        for i, p in zip(ids, params, strict=True):
            for key, value in exact.get(i, {}).items():
                self.state[p][key] = value.to(device=p.device)
            if "kept_mask" in self.state.get(p, {}):
                self._compact_form(p, self.state[p])

    def kept_mask(self, p: Tensor) -> Tensor | None:
        """The mask of sparse parameter ``p``: ``[K, M]`` bool in the block view of
        :mod:`bame_optim.core.nm` (``True`` = kept). ``None`` for a dense parameter or before the
        parameter's first ``step()``."""
        state = self.state.get(p, {})
        if "kept" not in state:
            return None
        group = self._group_of(p)
        return mask_from_indices(self._indices(state, group), group["m"])  # this rank's blocks

    def momentum_buffer(self, p: Tensor) -> Tensor | None:
        """The momentum buffer of ``p`` in the parameter's layout (for a sparse parameter,
        zeros at pruned entries), or ``None`` before it exists (or with ``momentum=0``)."""
        state = self.state.get(p, {})
        buffer = state.get("momentum_buffer")
        if buffer is None or "kept" not in state:
            return None if buffer is None else buffer.clone()
        group = self._group_of(p)
        local = local_tensor(p)
        indices, m = self._indices(state, group), group["m"]
        return scatter_kept_(torch.zeros_like(local), indices, local_state(buffer), m)

    def _group_of(self, p: Tensor) -> dict[str, Any]:
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                return group
        raise ValueError(f"Invalid p: a tensor of shape {tuple(p.shape)} not in this optimizer")

    def sparsity_report(self) -> list[dict[str, Any]]:
        """One plain ``dict`` per parameter, for logging: ``name`` (from ``param_names`` when
        the group has them), ``group``, ``shape``, ``sparse``, ``n``, ``m``, ``step``,
        ``phase``, ``density`` (kept fraction of the mask; 1.0 for dense parameters),
        ``nm_valid`` (every block of the weight has at most ``n`` non-zeros; ``None`` for
        dense), and, at the last mask update, ``flips`` (entries whose mask changed) and
        ``frozen_blocks`` (blocks OBF froze) out of ``blocks``."""
        rows = []
        for g, group in enumerate(self.param_groups):
            names = group.get("param_names")
            for j, p in enumerate(group["params"]):
                sparse = self._is_sparse(p, group)
                state = self.state.get(p, {})
                mask = self.kept_mask(p) if sparse else None
                row = {
                    "name": names[j] if names else f"group{g}.param{j}",
                    "group": g,
                    "shape": tuple(p.shape),
                    "sparse": sparse,
                    "n": group["n"] if sparse else None,
                    "m": group["m"] if sparse else None,
                    "step": group["step"],
                    "phase": phase(group["step"], group["t_i"], group["t_f"]).value,
                    "density": float(mask.float().mean()) if mask is not None else 1.0,
                    "nm_valid": is_nm_sparse(local_tensor(p).detach(), group["n"], group["m"])
                    if sparse
                    else None,
                    "flips": state.get("last_flips", 0),
                    "frozen_blocks": state.get("last_frozen", 0),
                    "blocks": num_blocks(p.shape, group["m"]) if sparse else None,
                }
                rows.append(row)
        return rows


def _validate_group(group: dict[str, Any]) -> None:
    for name in ("lr", "momentum", "dampening", "weight_decay"):
        value = group[name]
        if isinstance(value, Tensor) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"Invalid {name} value: {value!r} (a float >= 0 is required)")
    if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
        raise ValueError(
            f"Invalid nesterov value: True (Nesterov momentum requires a momentum and zero "
            f"dampening; got momentum={group['momentum']}, dampening={group['dampening']})"
        )
    check_nm(group["n"], group["m"])
    for name in ("alpha", "beta"):
        value = group[name]
        if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"Invalid {name} value: {value!r} (must be in [0, 1])")
    gamma = group["gamma"]
    if not isinstance(gamma, (int, float)) or not 0.0 <= gamma < 1.0:
        raise ValueError(f"Invalid gamma value: {gamma!r} (must be in [0, 1))")
    delta_t = group["delta_t"]
    if isinstance(delta_t, bool) or not isinstance(delta_t, int) or delta_t < 1:
        raise ValueError(f"Invalid delta_t value: {delta_t!r} (an integer >= 1 is required)")
    seed = group["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"Invalid seed value: {seed!r} (an integer >= 0 is required)")
    if group["sparse"] not in (None, True, False):
        raise ValueError(f"Invalid sparse value: {group['sparse']!r} (True, False or None)")


def _check_sparse_param(p: Tensor, m: int) -> None:
    if not p.is_floating_point() or p.layout != torch.strided:
        raise ValueError(
            f"Invalid sparse parameter of shape {tuple(p.shape)}, dtype {p.dtype}, layout "
            f"{p.layout}: N:M masks need a dense floating-point tensor"
        )
    num_blocks(p.shape, m)


def _any(tensor: Tensor) -> bool:
    # A sharded gradient is reduced over all shards, so every rank gets the same answer.
    found = tensor.any()
    return bool(found.full_tensor() if is_sharded(found) else found)


def _all_finite(tensor: Tensor) -> bool:
    finite = tensor.isfinite().all()
    return bool(finite.full_tensor() if is_sharded(finite) else finite)


def _sharded_freeze(p: Tensor, group: dict[str, Any]) -> Callable[[Tensor, Tensor], Tensor]:
    """OBF (Eq. 10) for one shard: rank the blocks of all shards, keep this rank's."""
    m = group["m"]
    first, count = block_range(p, m)

    def freeze(oscillation: Tensor, norms: Tensor) -> Tensor:
        whole = obf_freeze(
            gather_blocks(oscillation, p, m),
            gather_blocks(norms, p, m),
            group["alpha"],
            group["beta"],
        )
        return whole[first : first + count]

    return freeze


def _like(local: Tensor, p: Tensor) -> Tensor:
    """``local`` (this rank's part, shaped like ``p``'s) as a ``DTensor`` sharded as ``p``."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
    )
