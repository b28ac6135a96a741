"""Every Triton kernel, compiled for an H100 (``sm_90``) without a GPU, and none spilling.

The interpreter tests (tests/test_triton_kept.py, tests/test_triton_evolve.py) check what the
kernels compute, but the interpreter runs them as NumPy and accepts programs the compiler
rejects (a plain module global read in a kernel, a constexpr misused). Here the host functions
run as on CUDA with the kernels recording instead of running (:mod:`tools.triton_static`);
every distinct launch is compiled by Triton's own compiler down to a cubin with the signature
the JIT would give it, and its per-thread stack is read back from the cubin: registers spilled
to local memory would make a bandwidth-bound kernel slow. What still needs a GPU: the results
on the device, the launch itself and the timings (tools/gpu_check.py). The last test runs
``python -m tools.triton_static``, which prints the cubins' figures.
"""

from __future__ import annotations

import pytest
import torch

from bame_optim.kernels import triton_evolve, triton_kept
from tools import triton_static

from .test_triton_evolve import CASES as EVOLVE_CASES
from .test_triton_evolve import _problem as evolve_problem
from .test_triton_kept import MANY, _kernel_sgd, _many

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(
    triton_kept.interpreting(), reason="compiles for a GPU: not under the interpreter"
)

H100 = 90
"""The compute capability compiled for (H100 and H200 alike)."""
MAX_STACK_BYTES = 16
"""A frame of a few words is ptxas's own; more is registers spilled to local memory (the apply
kernel's programs of 256 blocks of 16 or more entries took 1.3 to 12 KB a thread)."""


@pytest.fixture
def recorded(monkeypatch, tmp_path):
    """:func:`tools.triton_static.recorded_launches` for the test's duration, compiled kernels
    cached in the test's own folder (not the user's ``~/.triton``)."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    with triton_static.recorded_launches() as recorders:
        yield recorders


def _compile_all(recorders):
    launches = triton_static.distinct_launches(recorders)
    assert launches
    for launch in launches:
        compiled = triton_static.compile_launch(launch, H100)
        stack = triton_static.resources(compiled.asm["cubin"])["stack"]
        assert stack <= MAX_STACK_BYTES, (
            f"{launch.name} {launch.constants()} spills: a {stack}-byte stack")
    return launches


@pytest.mark.parametrize("wide", [False, True], ids=["int32-blocks", "int64-blocks"])
def test_the_kept_kernels_compile_for_an_h100(recorded, monkeypatch, wide):
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
    launches = _compile_all(recorded)
    dtypes = {str(launch.constants()) for launch in launches if launch.name == "kept_sgd_kernel"}
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
def test_the_evolve_kernels_compile_for_an_h100(recorded, dtype):
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
    launches = _compile_all(recorded)
    assert {launch.name for launch in launches} == {"evolve_kernel", "apply_kernel"}


def test_the_static_report_prints_every_kernel(capsys):
    rows = triton_static.main([])
    assert {row["kernel"] for row in rows} == set(triton_static.KERNELS)
    assert all(row["stack"] <= MAX_STACK_BYTES and row["instructions"] > 0 for row in rows)
    assert all(0 < row["warps"] <= triton_static.MAX_WARPS_PER_SM for row in rows)
    assert "| kept_sgd_kernel | conv 64x64x3x3 + Linear 256x256 | 4 | 2 |" in (
        capsys.readouterr().out)
    with pytest.raises(SystemExit):
        triton_static.main(["--capability", "60"])


def test_resident_warps_follow_the_register_file():
    assert triton_static.resident_warps(64, 4) == 32  # 65536 / (64 * 128) = 8 programs
    assert triton_static.resident_warps(255, 4) == 8
    assert triton_static.resident_warps(16, 4) == triton_static.MAX_WARPS_PER_SM
