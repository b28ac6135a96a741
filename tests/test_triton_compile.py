"""Every Triton kernel, compiled for an H100 (``sm_90``) without a GPU, and none spilling.

The interpreter tests (tests/test_triton_kept.py, tests/test_triton_evolve.py) check what the
kernels compute, but the interpreter runs them as NumPy and accepts programs the compiler
rejects (a scalar where a block is needed, a constexpr misused, a loop-carried value that
changes type). Here the host functions run as on CUDA, with the kernels replaced by a recorder
that takes each launch's arguments instead of running it; every distinct launch is then
compiled by Triton's own compiler down to a cubin (``ptxas`` ships with Triton), with the
signature the JIT would give it, and its per-thread stack read back from the cubin: registers
spilled to local memory would make a bandwidth-bound kernel slow. What still needs a GPU: the
results on the device, the launch itself and the timings (tools/gpu_check.py).
"""

from __future__ import annotations

import re
import subprocess

import pytest
import torch

from bame_optim.kernels import triton_evolve, triton_kept

from .test_triton_evolve import CASES as EVOLVE_CASES
from .test_triton_evolve import _problem as evolve_problem
from .test_triton_kept import MANY, _kernel_sgd, _many

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(
    triton_kept.interpreting(), reason="compiles for a GPU: not under the interpreter"
)

H100 = (90, 32)
"""Compute capability and warp size of the target (H100 and H200 alike)."""
MAX_STACK_BYTES = 16
"""A frame of a few words is ptxas's own; more is registers spilled to local memory (the apply
kernel's programs of 256 blocks of 16 or more entries took 1.3 to 12 KB a thread)."""


class _Recorder:
    """Stands in for a kernel: keeps each launch's arguments, runs nothing."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((args, kwargs))


@pytest.fixture
def recorded(monkeypatch, tmp_path):
    """The host functions as on CUDA (CPU tensors pass their device checks), each kernel of
    both modules replaced by a :class:`_Recorder`; yields ``{name: recorder}``. Compiled
    kernels go to a cache of the test's own (not the user's ``~/.triton``)."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(triton_kept, "interpreting", lambda: True)
    recorders = {}
    for module in (triton_kept._kernels(), triton_evolve._kernels()):
        for name in ("kept_sgd_kernel", "kept_adamw_kernel", "evolve_kernel", "apply_kernel"):
            if hasattr(module, name):
                recorders[name] = _Recorder(getattr(module, name))
                monkeypatch.setattr(module, name, recorders[name])
    return recorders


def _signature(kernel, args, kwargs):
    """What the JIT would compile ``kernel(*args, **kwargs)`` as: Triton's
    ``ASTSource`` and the launch options."""
    from triton.compiler import ASTSource
    from triton.runtime.jit import mangle_type

    signature, constants = {}, {}
    for index, param in enumerate(kernel.params):
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constants[(index,)] = kwargs[param.name]
        else:
            value = args[index]
            signature[param.name] = param.annotation_type or mangle_type(value)
    options = {k: v for k, v in kwargs.items() if k not in signature}
    return ASTSource(kernel, signature, constants), options


def _distinct(recorders):
    """``(name, source, options)`` per distinct launch signature recorded."""
    seen = {}
    for name, recorder in recorders.items():
        for args, kwargs in recorder.launches:
            source, options = _signature(recorder.kernel, args, kwargs)
            key = (name, repr(sorted(source.signature.items())),
                   repr(sorted(source.constants.items())), repr(sorted(options.items())))
            seen.setdefault(key, (name, source, options))
    return list(seen.values())


def _stack_bytes(cubin: bytes, tmp_path) -> int:
    """The largest per-thread stack frame of the kernels in ``cubin`` (spilled registers live
    there), from ``cuobjdump -res-usage`` (shipped with Triton)."""
    path = tmp_path / "kernel.cubin"
    path.write_bytes(cubin)
    usage = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "-res-usage", str(path)],
                           capture_output=True, text=True, check=True).stdout
    frames = [int(size) for size in re.findall(r"STACK:(\d+)", usage)]
    assert frames, usage
    return max(frames)


def _compile_all(recorders, tmp_path):
    from triton.backends.compiler import GPUTarget

    launches = _distinct(recorders)
    assert launches
    target = GPUTarget("cuda", *H100)
    for name, source, options in launches:
        compiled = triton.compile(source, target=target, options=options)
        stack = _stack_bytes(compiled.asm["cubin"], tmp_path)
        names = source.fn.arg_names
        constants = {names[i]: value for (i,), value in source.constants.items()}
        assert stack <= MAX_STACK_BYTES, f"{name} {constants} spills: a {stack}-byte stack"
    return launches


@pytest.mark.parametrize("wide", [False, True], ids=["int32-blocks", "int64-blocks"])
def test_the_kept_kernels_compile_for_an_h100(recorded, tmp_path, monkeypatch, wide):
    monkeypatch.setattr(triton_kept, "_INT32_SPAN", 1 if wide else triton_kept._INT32_SPAN)
    problems = _many(torch.device("cpu"), seed=0)
    dyadic = dict(momentum=0.875, dampening=0.0, weight_decay=0.0, nesterov=False,
                  maximize=True)
    by_m = {}
    for index, (*_, m) in enumerate(problems):
        by_m.setdefault(m, []).append(index)
    for m, chosen in by_m.items():
        params = [problems[i][0] for i in chosen]
        grads = [problems[i][1][0] for i in chosen]
        codes = [problems[i][2] for i in chosen]
        counts = [problems[i][4] for i in chosen]
        for config in (dyadic, dict(dyadic, momentum=0.0, weight_decay=0.5, nesterov=False)):
            _kernel_sgd(params, grads, [None] * len(params), codes, counts, m=m, lr=0.5,
                        **config)
        for amsgrad in (False, True):
            k = [p.numel() // m for p in params]
            moments = [[torch.zeros(kk, n, dtype=p.dtype)
                        for kk, n, p in zip(k, counts, params, strict=True)] for _ in range(3)]
            triton_kept.kept_adamw_(
                params, grads, *moments[:2], moments[2] if amsgrad else [],
                [torch.tensor(0.0) for _ in params], codes, counts, m=m, amsgrad=amsgrad,
                beta1=0.9, beta2=0.999, lr=1e-3, weight_decay=0.01, eps=1e-8, maximize=False)
    launches = _compile_all(recorded, tmp_path)
    dtypes = {str(s.constants) for name, s, _ in launches if name == "kept_sgd_kernel"}
    assert len(dtypes) >= len({dtype for _, dtype in MANY}) + 2  # every signature compiled


# A cover of the evolve kernels' code paths (a compile takes one to three seconds): ranks
# decoded by bits with a channels_last weight, stored positions, the largest block (ranks
# beyond the bit table), a count that is not n; each with and without oscillation, SGD and
# Adam revival.
EVOLVE_COVER = [
    ((3, 8, 2, 2), 2, 4, 2, "channels_last"),
    ((3, 32), 16, 32, 16, "contiguous"),
    ((2, 64), 3, 64, 3, "contiguous"),
    ((5, 8), 1, 4, 2, "contiguous"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_evolve_kernels_compile_for_an_h100(recorded, dtype, tmp_path):
    assert all(case in EVOLVE_CASES for case in EVOLVE_COVER)
    for case in EVOLVE_COVER:
        _, n, m, count, _ = case
        weight, grad, kept, osc = evolve_problem(case, dtype, torch.device("cpu"), seed=m)
        for revive, zero, oscillation in (("sgd", True, osc), ("adam", False, None)):
            triton_evolve.evolve_blocks(weight, grad, kept, count, oscillation, n=n, m=m,
                                        lr=0.1, gamma=0.9, revive=revive, zero_pruned=zero)
        k = weight.numel() // m
        buffers = [torch.zeros(k, count, dtype=dtype) for _ in range(2)]
        triton_evolve.apply_evolved_(weight, buffers, kept, count, kept.clone(),
                                     torch.zeros(k, dtype=torch.bool), m)
    launches = _compile_all(recorded, tmp_path)
    assert {name for name, _, _ in launches} == {"evolve_kernel", "apply_kernel"}
