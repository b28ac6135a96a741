"""2:4 semi-structured kernels on CUDA (``torch.sparse.to_sparse_semi_structured``), chosen per
layer at run time, with the masked dense math as the fallback everywhere else.

**Experimental until verified on a GPU:** the CUDA paths were written and tested on the CPU
fallback only; ``python -m benchmarks.gpu_check`` runs their checks in one call.

A Linear weight ``W [out, in]`` that is 2:4 along its input dimension (docs/design.md section 1,
``n=2, m=4``) can be packed for the sparse tensor-core kernels of cuSPARSELt (default) or
CUTLASS. The kernels exist only on CUDA with compute capability >= 8.0, for float16/bfloat16,
for shapes that are multiples of the backend's minimum, and they are not always faster (on
Hopper the published speed-ups are small, and small GEMMs are slower), so every choice here is
made per ``(rows, shape, dtype, device)`` by one timing, cached in a :class:`KernelChooser`.

* :func:`support_reason`, :func:`device_backend`: why a setting cannot use the kernels.
* :func:`pack_semi_structured`: validated packing of a 2:4 weight.
* :class:`KernelChooser`: one timing of sparse vs dense per GEMM shape, kept in the instance.
* :func:`export_semi_structured`, :func:`check_export`: inference export and its check.

Training (an autograd Function over the packed tensors, packs refreshed after every optimizer
step) lives in :mod:`bame_optim.kernels.semi_structured_training`.
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from bame_optim.core.nm import is_nm_sparse, param_to_blocks, top_n_mask
from bame_optim.groups import is_hf_conv1d

__all__ = [
    "CHECK_TOLERANCES",
    "MIN_CAPABILITY",
    "MIN_SPARSE_SHAPE",
    "SEMI_STRUCTURED_DTYPES",
    "CheckResult",
    "ExportReport",
    "KernelChoice",
    "KernelChooser",
    "LayerExport",
    "check_export",
    "cuda_time_ms",
    "device_backend",
    "export_semi_structured",
    "pack_semi_structured",
    "support_reason",
]

SEMI_STRUCTURED_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)
"""Dtypes used here (both backends also pack int8; cuSPARSELt float8 and CUTLASS float32)."""

MIN_CAPABILITY = (8, 0)
"""Sparse tensor cores start with Ampere (sm80)."""

CUTLASS_CAPABILITY_MAJOR = 8
"""torch's CUTLASS 2:4 kernels are built for sm8x only ("Supported only on GPUs with compute
capability 8.x", aten/src/ATen/native/sparse/cuda/SparseSemiStructuredOps.cu)."""

MIN_SPARSE_SHAPE: MappingProxyType[str, tuple[int, int]] = MappingProxyType(
    {"cusparselt": (16, 16), "cutlass": (32, 64)}
)
"""Float16/bfloat16 sparse operand ``(rows, cols)``: both dimensions must be multiples of these
(``_DTYPE_SHAPE_CONSTRAINTS.sparse_min_rows/cols`` of ``SparseSemiStructuredTensorCUSPARSELT``
and ``...CUTLASS`` in torch 2.14 ``torch/sparse/semi_structured.py``). The dense operand is
padded to multiples of 8 by torch itself (``dense_min_rows/cols``)."""

CHECK_TOLERANCES: MappingProxyType[torch.dtype, tuple[float, float]] = MappingProxyType(
    {
        torch.float16: (1e-2, 1e-2),
        torch.bfloat16: (4e-2, 4e-2),
        torch.float32: (1e-4, 1e-5),
        torch.float64: (1e-7, 1e-7),
    }
)
"""``(rtol, atol)`` of :func:`check_export` by output dtype: about 10 float16 ulps and 5
bfloat16 ulps (both GEMMs accumulate in float32 but round and order differently)."""


def device_backend(
    device_type: str,
    capability: tuple[int, int] | None,
    cusparselt: bool,
    force_cutlass: bool = False,
) -> tuple[str | None, str | None]:
    """``(backend, None)`` for a device that runs the 2:4 kernels, else ``(None, reason)``.

    Pure function of the device facts (``torch.cuda.get_device_capability``,
    ``torch.backends.cusparselt.is_available()``, ``SparseSemiStructuredTensor._FORCE_CUTLASS``),
    so the rules are testable without a GPU.
    """
    if device_type != "cuda":
        return None, f"device {device_type}: the 2:4 kernels need CUDA"
    if capability is None or tuple(capability) < MIN_CAPABILITY:
        return None, f"compute capability {capability} < {MIN_CAPABILITY}"
    if cusparselt and not force_cutlass:
        return "cusparselt", None
    if capability[0] == CUTLASS_CAPABILITY_MAJOR:
        return "cutlass", None
    return None, f"no backend: cuSPARSELt unavailable and CUTLASS needs sm8x, got {capability}"


def _device_facts(device: torch.device) -> tuple[str | None, str | None]:
    if device.type != "cuda" or not torch.cuda.is_available():
        return device_backend(device.type, None, False)
    force = bool(getattr(torch.sparse.SparseSemiStructuredTensor, "_FORCE_CUTLASS", False))
    capability = torch.cuda.get_device_capability(device)
    return device_backend("cuda", capability, torch.backends.cusparselt.is_available(), force)


def support_reason(shape: tuple[int, ...], dtype: torch.dtype, backend: str) -> str | None:
    """Why a sparse operand of ``shape`` and ``dtype`` cannot be packed for ``backend``
    (``None`` when it can)."""
    if dtype not in SEMI_STRUCTURED_DTYPES:
        return f"dtype {dtype}: the 2:4 path here is float16/bfloat16 only"
    if len(shape) != 2:
        return f"shape {tuple(shape)}: a 2-D weight is needed"
    min_rows, min_cols = MIN_SPARSE_SHAPE[backend]
    rows, cols = shape
    if rows < min_rows or rows % min_rows or cols < min_cols or cols % min_cols:
        return f"shape {tuple(shape)}: {backend} needs multiples of {(min_rows, min_cols)}"
    return None


def pack_semi_structured(weight: Tensor, backend: str | None = None) -> Tensor:
    """Pack a 2:4 weight ``[p, q]`` (2 non-zeros at most in every 4 consecutive entries of a
    row) as a ``SparseSemiStructuredTensor`` for ``backend`` (default: the device's).

    .. note::
        ``to_sparse_semi_structured`` is ``SparseSemiStructuredTensorCUSPARSELT.from_dense``
        unless CUTLASS is forced; the class is called directly so that the backend whose shape
        rules were checked is the one used. Packing keeps the weight's zeros and does not
        re-prune, so a row block with 3 or 4 non-zeros is refused here instead of corrupted.
    """
    if not isinstance(weight, Tensor) or weight.ndim != 2:
        raise ValueError(f"Invalid weight shape: {getattr(weight, 'shape', weight)} (2-D needed)")
    if weight.dtype not in SEMI_STRUCTURED_DTYPES:
        raise ValueError(f"Invalid weight dtype: {weight.dtype} (float16 or bfloat16 needed)")
    if backend is not None and backend not in MIN_SPARSE_SHAPE:
        raise ValueError(f"Invalid backend value: {backend!r} (one of {tuple(MIN_SPARSE_SHAPE)})")
    found, reason = _device_facts(weight.device)
    backend = backend or found
    if backend is None:
        raise ValueError(f"Invalid weight device: {weight.device} ({reason})")
    reason = support_reason(tuple(weight.shape), weight.dtype, backend)
    if reason is not None:
        raise ValueError(f"Invalid weight shape: {tuple(weight.shape)} ({reason})")
    if not is_nm_sparse(weight, 2, 4):
        raise ValueError("Invalid weight value: not 2:4 along its rows (dim 1)")
    cls = (
        torch.sparse.SparseSemiStructuredTensorCUTLASS
        if backend == "cutlass"
        else torch.sparse.SparseSemiStructuredTensorCUSPARSELT
    )
    return cls.from_dense(weight.detach().contiguous())


def cuda_time_ms(fn: Callable[[], Any], warmup: int = 5, repeats: int = 20) -> float:
    """Median time of ``fn()`` in milliseconds on the current CUDA stream (CUDA events, after
    ``warmup`` untimed calls)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


@dataclass(frozen=True)
class KernelChoice:
    """One decision of :class:`KernelChooser` (times in milliseconds, ``None`` if not timed)."""

    sparse: bool
    reason: str
    backend: str | None = None
    dense_ms: float | None = None
    sparse_ms: float | None = None


class KernelChooser:
    """Chooses sparse or dense per GEMM ``Y[rows, p] = X[rows, q] @ S[p, q]ᵀ`` by one timing.

    The first call of :meth:`choose` for a ``(rows, p, q, dtype, device)`` key checks the device,
    dtype and shape rules and, where they pass, times ``F.linear`` with a random 2:4 ``S``
    dense and packed (median of ``repeats`` after ``warmup``). The decision is cached in
    :attr:`choices` of this instance (no module-level cache): pass one chooser to several calls
    to share timings.

    Args:
        min_speedup: sparse is chosen when ``dense_ms / sparse_ms >= min_speedup`` (``0``
            forces sparse wherever it is supported, for tests).
        warmup, repeats: timing calls.
        seed: seed of the random operands (a private generator; the global RNG is untouched).
    """

    def __init__(
        self, min_speedup: float = 1.0, warmup: int = 5, repeats: int = 20, seed: int = 0
    ) -> None:
        if not min_speedup >= 0 or min_speedup == float("inf"):
            raise ValueError(f"Invalid min_speedup value: {min_speedup} (finite, >= 0 needed)")
        if warmup < 0 or repeats < 1:
            raise ValueError(f"Invalid warmup/repeats value: {warmup}/{repeats}")
        self.min_speedup = min_speedup
        self.warmup = warmup
        self.repeats = repeats
        self.seed = seed
        self.choices: dict[tuple[int, int, int, torch.dtype, str], KernelChoice] = {}

    def support(
        self, shape: tuple[int, int], dtype: torch.dtype, device: torch.device | str
    ) -> tuple[str | None, str | None]:
        """``(backend, None)`` when the kernels accept this operand, else ``(None, reason)``."""
        backend, reason = _device_facts(torch.device(device))
        if backend is None:
            return None, reason
        reason = support_reason(shape, dtype, backend)
        return (None, reason) if reason else (backend, None)

    def choose(
        self, rows: int, shape: tuple[int, int], dtype: torch.dtype, device: torch.device | str
    ) -> KernelChoice:
        """The cached or newly measured choice for ``rows`` dense rows and sparse ``shape``."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None and torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())
        key = (int(rows), int(shape[0]), int(shape[1]), dtype, str(device))
        if key not in self.choices:
            backend, reason = self.support(shape, dtype, device)
            if backend is None:
                self.choices[key] = KernelChoice(False, str(reason))
            else:
                self.choices[key] = self._measure(key[0], key[1:3], dtype, device, backend)
        return self.choices[key]

    def _measure(
        self,
        rows: int,
        shape: tuple[int, int],
        dtype: torch.dtype,
        device: torch.device,
        backend: str,
    ) -> KernelChoice:
        generator = torch.Generator(device).manual_seed(self.seed)
        x = torch.randn(rows, shape[1], generator=generator, device=device, dtype=dtype)
        w = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        blocks = param_to_blocks(w, 4)
        w = (blocks * top_n_mask(blocks.abs().float(), 2)).reshape(shape)
        try:
            with torch.no_grad(), torch.autocast(device.type, enabled=False), _device_ctx(device):
                packed = pack_semi_structured(w, backend)
                dense_ms = cuda_time_ms(lambda: F.linear(x, w), self.warmup, self.repeats)
                sparse_ms = cuda_time_ms(lambda: F.linear(x, packed), self.warmup, self.repeats)
        except (RuntimeError, NotImplementedError, ValueError) as error:
            message = str(error).splitlines()[0] if str(error) else ""
            return KernelChoice(False, f"{backend} failed: {type(error).__name__}: {message}")
        ratio = dense_ms / sparse_ms
        sparse = ratio >= self.min_speedup
        verdict = "sparse chosen" if sparse else "dense faster"
        times = f"{backend} {sparse_ms:.3f} ms vs dense {dense_ms:.3f} ms"
        reason = f"{verdict}: {times} ({ratio:.2f}x)"
        return KernelChoice(sparse, reason, backend, dense_ms, sparse_ms)


def _device_ctx(device: torch.device) -> contextlib.AbstractContextManager:
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@dataclass(frozen=True)
class LayerExport:
    """One Linear layer of :func:`export_semi_structured`."""

    name: str
    shape: tuple[int, int]
    rows: int | None
    converted: bool
    reason: str


@dataclass(frozen=True)
class ExportReport:
    """Per-layer outcome of :func:`export_semi_structured`; ``str()`` is a table."""

    layers: tuple[LayerExport, ...]

    @property
    def converted(self) -> list[str]:
        return [layer.name for layer in self.layers if layer.converted]

    def __str__(self) -> str:
        lines = [f"{len(self.converted)}/{len(self.layers)} Linear layers on 2:4 kernels"]
        for layer in self.layers:
            mark = "2:4  " if layer.converted else "dense"
            shape = "x".join(map(str, layer.shape))
            lines.append(f"  {mark} {layer.name:<40} {shape:>10} rows={layer.rows}: {layer.reason}")
        return "\n".join(lines)


def _out_in(module: nn.Module) -> Tensor:
    """The ``[out, in]`` weight of a Linear, or the transposed view of a Hugging Face
    ``Conv1D``'s ``[in, out]`` weight (2:4 along the input dimension is 2:4 along its rows)."""
    return module.weight.t() if is_hf_conv1d(module) else module.weight


def _call(model: nn.Module, inputs: Tensor | tuple[Any, ...]) -> Any:
    return model(*inputs) if isinstance(inputs, tuple) else model(inputs)


def export_semi_structured(
    model: nn.Module, example_inputs: Tensor | tuple[Any, ...], chooser: KernelChooser | None = None
) -> ExportReport:
    """Replace the weights of a trained 2:4 model's ``nn.Linear`` layers (and Hugging Face
    ``Conv1D`` layers, GPT-2's, whose ``[in, out]`` weight becomes the transposed view of a
    packed ``[out, in]`` one) by packed ``SparseSemiStructuredTensor`` parameters, where this is
    supported and measured faster.

    One forward pass on ``example_inputs`` (no grad) records the rows each Linear sees; then per
    layer: skipped if not called through its own ``forward``, if the device, dtype or shape is
    unsupported (:meth:`KernelChooser.support`), if its weight is not 2:4 along the input
    dimension, or if ``chooser`` measures dense faster. ``F.linear`` then dispatches to the 2:4
    kernel for converted layers. Modifies ``model`` in place.

    .. note::
        Layers whose weight is read by their parent (``nn.MultiheadAttention.out_proj``) are not
        converted: the parent's fast path cannot take a packed tensor. Packed parameters have
        no ``state_dict`` round trip or ``deepcopy``: copy the dense model first (the
        reference for :func:`check_export`).
    """
    chooser = chooser or KernelChooser()
    linears = [(n, mod) for n, mod in model.named_modules()
               if isinstance(mod, nn.Linear) or is_hf_conv1d(mod)]
    rows: dict[str, int] = {}

    def recorder(name: str):
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            inputs = _out_in(module).shape[1]
            rows[name] = max(rows.get(name, 0), args[0].numel() // inputs)

        return hook

    handles = [mod.register_forward_pre_hook(recorder(n)) for n, mod in linears]
    try:
        with torch.no_grad():
            _call(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()

    layers = []
    for name, module in linears:
        weight = _out_in(module)
        shape = (int(weight.shape[0]), int(weight.shape[1]))
        backend, reason = chooser.support(shape, weight.dtype, weight.device)
        converted = False
        if isinstance(weight, torch.sparse.SparseSemiStructuredTensor):
            reason = "already packed"
        elif name not in rows:
            reason = "not called through its own forward by the example inputs"
        elif backend is not None and not is_nm_sparse(weight, 2, 4):
            reason = "weight is not 2:4 along the input dimension"
        elif backend is not None:
            choice = chooser.choose(rows[name], shape, weight.dtype, weight.device)
            reason, converted = choice.reason, choice.sparse
            if converted:
                packed = pack_semi_structured(weight.detach(), choice.backend)
                if is_hf_conv1d(module):  # x @ W with W = packed.t(): addmm of a transposed
                    packed = packed.t()  # 2:4 operand, as F.linear dispatches it
                module.weight = nn.Parameter(packed, requires_grad=False)
        layers.append(LayerExport(name, shape, rows.get(name), converted, str(reason)))
    return ExportReport(tuple(layers))


@dataclass(frozen=True)
class CheckResult:
    """Outcome of :func:`check_export`: ``worst`` is the largest ``|out - ref| / allowed``."""

    ok: bool
    max_abs_error: float
    worst: float


def check_export(
    model: nn.Module,
    reference: nn.Module,
    example_inputs: Tensor | tuple[Any, ...],
    rtol: float | None = None,
    atol: float | None = None,
) -> CheckResult:
    """Compare ``model`` (exported) with ``reference`` (the dense masked model) on
    ``example_inputs``: every output entry must satisfy
    ``|out - ref| <= atol * max|ref| + rtol * |ref|`` (defaults :data:`CHECK_TOLERANCES` by
    the reference output's dtype)."""
    with torch.no_grad():
        outputs, expected = _call(model, example_inputs), _call(reference, example_inputs)
    outputs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
    expected = list(expected) if isinstance(expected, (tuple, list)) else [expected]
    if len(outputs) != len(expected):
        raise ValueError(f"Invalid reference value: {len(expected)} outputs vs {len(outputs)}")
    ok, max_abs, worst = True, 0.0, 0.0
    for out, ref in zip(outputs, expected, strict=True):
        default_rtol, default_atol = CHECK_TOLERANCES.get(ref.dtype, (1e-2, 1e-2))
        rtol_ = default_rtol if rtol is None else rtol
        atol_ = default_atol if atol is None else atol
        error = (out.double() - ref.double()).abs()
        allowed = atol_ * ref.double().abs().max() + rtol_ * ref.double().abs()
        max_abs = max(max_abs, float(error.max()) if error.numel() else 0.0)
        ratio = error / allowed.clamp_min(torch.finfo(torch.float64).tiny)
        worst = max(worst, float(ratio.max()) if ratio.numel() else 0.0)
        ok = ok and bool((error <= allowed).all())
    return CheckResult(ok, max_abs, worst)
