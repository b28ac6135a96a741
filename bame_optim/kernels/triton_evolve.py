r"""Triton kernels for the evolve-phase mask update on CUDA (BAME's LMA + OBF): the passes of
:mod:`bame_optim.kernels.evolve_cpu`, equal bit for bit to the eager core functions.

* :func:`evolve_blocks`: one launch per parameter: per block the pruned weights set to 0
  (optional, :meth:`bame_optim.optim.engine.NMEngine.zero_pruned_`), the LMA scores (Eq. 4,
  5), the proposal of the ``n`` best with :func:`bame_optim.core.nm.top_n_mask`'s ties (a
  rank from all pairs of the block's entries), its stored code
  (:func:`bame_optim.core.kept.encode_kept`), SAD (Eq. 7) and the oscillation EMA (Eq. 8).
  The block norms of Eq. 10 come from ATen (:func:`bame_optim.core.evolution.block_norms`):
  its CUDA reduction's order is ATen's own.
* OBF's selection (Eq. 10) is :func:`bame_optim.core.evolution.obf_freeze` on the device.
* :func:`apply_evolved_`: one launch: the new codes, newly pruned weights set to 0 and the
  compact buffers' rows of the changed blocks remapped in place.

Equality: the kernels compute the scores and the EMA operation by operation in the
parameter's dtype, with the hyper-parameters cast to it on the host (as ATen casts a scalar
operand) and launched with ``enable_fp_fusion=False`` (no multiply-add contracted where the
eager kernels round twice); selections and codes are exact. Tested under
``TRITON_INTERPRET=1`` on the CPU against the eager path (``tests/test_triton_evolve.py``);
on a GPU by ``benchmarks/gpu_check``.
"""

from __future__ import annotations

from functools import lru_cache
from types import ModuleType

import torch
from torch import Tensor

from bame_optim.core.evolution import block_norms
from bame_optim.core.kept import _binomials, _rank_by_bits, _ranked
from bame_optim.core.nm import param_to_blocks
from bame_optim.kernels import evolve_cpu, triton_kept

__all__ = ["MAX_BUFFERS", "apply_evolved_", "available", "evolve_blocks", "supports"]

MAX_BUFFERS = 3
"""Compact buffers :func:`apply_evolved_` remaps in one launch (AdamW with amsgrad has 3)."""
_PAIRS_PER_PROGRAM = 4096
"""``BLOCK_K * M_P2**2``: the entry pairs one program of :func:`evolve_blocks` compares."""
_BLOCKS_PER_PROGRAM = 256
_ENTRIES_PER_APPLY = 1024
"""``BLOCK_K * M_P2`` of :func:`apply_evolved_` at most (as the kept kernels' programs)."""


def available() -> bool:
    """Whether Triton can be imported (checked without importing it)."""
    return triton_kept.available()


def _device() -> str:
    return "cpu" if triton_kept.interpreting() else "cuda"


def supports(
    weight: Tensor,
    grad: Tensor | None,
    kept: Tensor,
    count: int,
    m: int,
    oscillation: Tensor | None = None,
    buffers: list[Tensor] = (),  # type: ignore[assignment]
    *,
    n: int | None = None,
) -> bool:
    """Whether the kernels handle this parameter: what
    :func:`bame_optim.kernels.evolve_cpu.supports` takes, on a CUDA device (on the CPU under
    ``TRITON_INTERPRET=1``), with at most :data:`MAX_BUFFERS` buffers."""
    device = weight.device if weight.device.type == _device() else torch.device(_device())
    return len(buffers) <= MAX_BUFFERS and evolve_cpu.supports_on(
        device, weight, grad, kept, count, m, oscillation, buffers, n=n
    )


def evolve_blocks(
    weight: Tensor,
    grad: Tensor,
    kept: Tensor,
    count: int,
    oscillation: Tensor | None,
    *,
    n: int,
    m: int,
    lr: float,
    gamma: float,
    revive: str = "sgd",
    zero_pruned: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`bame_optim.kernels.evolve_cpu.evolve_blocks` on CUDA tensors (:func:`supports`):
    ``(proposed, oscillation, norms)``, bit for bit the eager core functions on the device."""
    if revive not in ("sgd", "adam"):
        raise ValueError(f"Invalid revive value: {revive!r} (one of ('sgd', 'adam'))")
    if not supports(weight, grad, kept, count, m, oscillation, n=n):
        raise ValueError(
            f"Invalid parameter {tuple(weight.shape)} {weight.dtype} on {weight.device} for the "
            "Triton evolve kernels (see bame_optim.kernels.triton_evolve.supports)"
        )
    kernels = _kernels()
    device, blocks = weight.device, weight.numel() // m
    proposed = torch.empty(evolve_cpu.code_shape(blocks, n, m), device=device,
                           dtype=evolve_cpu.code_dtype(n, m))
    new_oscillation = torch.empty(blocks, dtype=weight.dtype, device=device)
    w_layout, g_layout = evolve_cpu.folded_layouts(weight, grad)  # type: ignore[misc]
    ranked, pranked = kept.ndim == 1, _ranked(n, m)
    by_bits = pranked and m <= 16
    m_p2 = _next_power_of_2(m)
    block_k = max(1, min(_BLOCKS_PER_PROGRAM, _PAIRS_PER_PROGRAM // (m_p2 * m_p2)))
    hyper = _scalars((lr, gamma, 1.0 - gamma), weight.dtype, device)
    placeholder = proposed
    with triton_kept.launch_device(device):
        kernels.evolve_kernel[(_cdiv(blocks, block_k),)](
            weight, grad, kept, evolve_cpu.rank_masks(count, m, device) if ranked else kept,
            proposed, _rank_by_bits(m, device, proposed.dtype) if by_bits else placeholder,
            _binomials(m, device) if pranked and not by_bits else placeholder,
            oscillation if oscillation is not None else new_oscillation, new_oscillation,
            hyper, blocks, weight.shape[1] // m, w_layout[0], w_layout[1], *w_layout[2:],
            *g_layout[2:],
            N=n, M=m, M_P2=m_p2, COUNT=count, COUNT_P2=_next_power_of_2(max(count, 1)),
            BLOCK_K=block_k, RANKED=ranked, PRANKED=pranked, BY_BITS=by_bits,
            HAS_OSC=oscillation is not None, ADAM=revive == "adam", ZERO=bool(zero_pruned),
            F64=weight.dtype == torch.float64, enable_fp_fusion=False,
        )
    return proposed, new_oscillation, block_norms(param_to_blocks(weight, m))


def apply_evolved_(
    weight: Tensor,
    buffers: list[Tensor],
    kept: Tensor,
    count: int,
    proposed: Tensor,
    frozen: Tensor,
    m: int,
) -> tuple[Tensor, Tensor]:
    """:func:`bame_optim.kernels.evolve_cpu.apply_evolved_` on CUDA tensors: ``(new stored kept
    sets, flips as an int64 scalar tensor)``; newly pruned weights set to 0 and the buffers
    remapped in place."""
    if not supports(weight, weight, kept, count, m, buffers=buffers) or not (
        proposed.shape == kept.shape and proposed.dtype == kept.dtype and proposed.is_contiguous()
        and frozen.dtype == torch.bool and frozen.shape == (weight.numel() // m,)
    ):
        raise ValueError(
            f"Invalid arguments for the Triton apply_evolved_ kernel: weight "
            f"{tuple(weight.shape)} {weight.dtype} on {weight.device}, kept {tuple(kept.shape)} "
            f"{kept.dtype}, proposed {tuple(proposed.shape)} {proposed.dtype}, frozen "
            f"{tuple(frozen.shape)} {frozen.dtype}, {len(buffers)} buffers"
        )
    kernels = _kernels()
    device, blocks = weight.device, weight.numel() // m
    new_kept = torch.empty_like(kept)
    (layout,) = evolve_cpu.folded_layouts(weight)  # type: ignore[misc]
    # 256 blocks of 16 entries or more spilled to local memory (1.3 to 12 KB a thread in the
    # sm_90 cubin's cuobjdump -res-usage); 1024 entries fit in registers.
    block_k = max(1, min(_BLOCKS_PER_PROGRAM, _ENTRIES_PER_APPLY // _next_power_of_2(m)))
    grid = _cdiv(blocks, block_k)
    flips = torch.zeros(grid, dtype=torch.int64, device=device)
    slots = [*buffers, *[weight] * (MAX_BUFFERS - len(buffers))]
    ranked = kept.ndim == 1
    with triton_kept.launch_device(device):
        kernels.apply_kernel[(grid,)](
            weight, kept, proposed, frozen, new_kept,
            evolve_cpu.rank_masks(count, m, device) if ranked else kept, *slots, flips,
            blocks, weight.shape[1] // m, layout[0], layout[1], *layout[2:],
            M=m, M_P2=_next_power_of_2(m), COUNT=count,
            COUNT_P2=_next_power_of_2(max(count, 1)), BLOCK_K=block_k, RANKED=ranked,
            BUFFERS=len(buffers),
        )
    return new_kept, flips.sum()


@lru_cache(maxsize=64)
def _scalars_cached(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


def _scalars(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """The hyper-parameters as a tensor of the compute dtype: cast on the host as ATen casts a
    Python scalar (the interpreter would pass float scalars as float32)."""
    return _scalars_cached(tuple(float(v) for v in values), dtype, device)


def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@lru_cache(maxsize=1)
def _kernels() -> ModuleType:
    # Imported on first use only: importing Triton is slow, and TRITON_INTERPRET is read then.
    from bame_optim.kernels import _triton_evolve_kernels

    return _triton_evolve_kernels
