"""The Triton evolve kernels (bame_optim.kernels.triton_evolve) against the eager core
functions, bit for bit, as the CPU passes are (tests/test_evolve_cpu.py).

Kernel tests (``test_kernel_*``) take the ``device`` fixture: CUDA where there is a GPU, the
CPU where ``TRITON_INTERPRET=1`` was set before Triton was imported. A normal run has neither
on a CPU machine, so ``test_kernels_under_the_triton_interpreter`` reruns them in a child
pytest with ``TRITON_INTERPRET=1`` (as tests/test_triton_kept.py does, for the same reason).
No tolerance: the kernels round every operation as the eager kernels do (hyper-parameters cast
on the host, no fused multiply-adds), and the selections and codes are exact."""

from __future__ import annotations

import pytest
import torch

from bame_optim.core.evolution import obf_freeze
from bame_optim.core.kept import encode_kept
from bame_optim.kernels import evolve_cpu, evolve_reference, triton_evolve, triton_kept

from .bitwise import assert_apply_equals_eager, assert_bits
from .strategies import block_mask, exact_nm_mask

# (shape, n, m, count, layout): ranks in uint8 (2:4, 1:16, 4:8) and int16 (8:16), stored
# positions (16:32), the largest block (3:64), a block size without a power of two (1:6), a
# count that is not n, transposed and channels_last weights.
CASES = [
    ((6, 16), 2, 4, 2, "contiguous"),
    ((3, 32, 3, 3), 1, 16, 1, "contiguous"),
    ((4, 16), 4, 8, 4, "transposed"),
    ((2, 32), 8, 16, 8, "contiguous"),
    ((3, 32), 16, 32, 16, "contiguous"),
    ((2, 64), 3, 64, 3, "contiguous"),
    ((4, 24), 1, 6, 1, "contiguous"),
    ((5, 8), 1, 4, 2, "contiguous"),
    ((3, 8, 2, 2), 2, 4, 2, "channels_last"),
]
CASE_IDS = [f"{'x'.join(map(str, s))}-{n}:{m}-c{c}-{layout}" for s, n, m, c, layout in CASES]
SPECIALS = (float("nan"), float("inf"), -0.0)


@pytest.fixture
def device() -> torch.device:
    if triton_kept.interpreting():
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    pytest.skip("needs a CUDA device or TRITON_INTERPRET=1 (the interpreter test runs these)")


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "transposed":
        return t.t().contiguous().t()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    return t.contiguous()


def _problem(case, dtype, device, seed, kind="normal"):
    shape, _, m, count, layout = case
    gen = torch.Generator().manual_seed(seed)
    k = torch.Size(shape).numel() // m
    if kind == "normal":
        weight = torch.randn(shape, generator=gen, dtype=torch.float64)
        grad = torch.randn(shape, generator=gen, dtype=torch.float64)
    else:  # small integers: tied scores everywhere
        weight = torch.randint(-2, 3, shape, generator=gen).double()
        grad = torch.randint(-2, 3, shape, generator=gen).double()
    weight.view(-1)[:3] = torch.tensor(SPECIALS, dtype=torch.float64)
    grad.view(-1)[-2] = float("nan")
    kept = encode_kept(exact_nm_mask(k, count, m, seed), count)
    osc = (torch.randint(0, 4, (k,), generator=gen) / 4).to(dtype)
    move = lambda t: _layout(t.to(device=device, dtype=dtype), layout)  # noqa: E731
    return move(weight), move(grad), kept.to(device), osc.to(device)


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["normal", "integers"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_kernel_evolve_blocks_matches_the_core_functions(case, dtype, kind, device):
    _, n, m, count, _ = case
    weight, grad, kept, osc = _problem(case, dtype, device, seed=len(kind) + m, kind=kind)
    for revive, zero, oscillation, lr in (("sgd", True, osc, 0.1), ("adam", False, None, 0.03),
                                          ("sgd", False, osc, 0.0)):
        if not evolve_cpu.supports_on(device, weight, grad, kept, count, m, oscillation, n=n):
            continue  # a count whose codes differ in form from n's (the op's eager fallback)
        w_kernel, w_eager = weight.clone(), weight.clone()
        w_kernel.as_strided_(weight.shape, weight.stride())
        w_eager.as_strided_(weight.shape, weight.stride())
        hyper = dict(n=n, m=m, lr=lr, gamma=0.9, revive=revive, zero_pruned=zero)
        fused = triton_evolve.evolve_blocks(w_kernel, grad, kept, count, oscillation, **hyper)
        eager = evolve_reference.evolve_blocks_eager(w_eager, grad, kept, count, oscillation,
                                                     **hyper)
        for name, a, b in zip(("proposed", "oscillation", "norms"), fused, eager, strict=True):
            assert_bits(a, b, f"{name} ({revive}, lr {lr})")
        assert_bits(w_kernel, w_eager, "weight")


@pytest.mark.cuda
@pytest.mark.parametrize("buffers", [0, 1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_kernel_apply_evolved_matches_apply_mask(case, dtype, buffers, device):
    _, _, m, count, _ = case
    weight, _, kept, _ = _problem(case, dtype, device, seed=m + buffers)
    k = weight.numel() // m
    proposal = encode_kept(block_mask(k, m, 7, count), count).to(device)
    frozen = (torch.arange(k) % 3 == 0).to(device)
    gen = torch.Generator().manual_seed(3)
    values = [torch.randn(k, count, generator=gen, dtype=torch.float64).to(device, dtype)
              for _ in range(buffers)]
    assert_apply_equals_eager(triton_evolve.apply_evolved_, weight, values, kept, count,
                              proposal, frozen, m)


@pytest.mark.cuda
def test_kernel_full_update_matches_evolve_mask(device):
    # The three steps in a row, as the optimizers run them, against the core functions.
    case = ((8, 32), 2, 4, 2, "contiguous")
    weight, grad, kept, osc = _problem(case, torch.float32, device, seed=11)
    eager = evolve_reference.evolve_blocks_eager(weight.clone(), grad, kept, 2, osc, n=2, m=4,
                                                 lr=0.5, gamma=0.75)
    expected_frozen = obf_freeze(eager[1], eager[2], 0.5, 0.5)
    proposed, oscillation, norms = triton_evolve.evolve_blocks(
        weight, grad, kept, 2, osc, n=2, m=4, lr=0.5, gamma=0.75)
    frozen = obf_freeze(oscillation, norms, 0.5, 0.5)
    new_kept, _ = triton_evolve.apply_evolved_(weight, [], kept, 2, proposed, frozen, 4)
    assert torch.equal(frozen.cpu(), expected_frozen.cpu())
    assert frozen.any() and not frozen.all()
    assert not torch.equal(new_kept.cpu(), kept.cpu())


@pytest.mark.cuda
def test_kernel_rejects_tensors_it_cannot_take(device):
    weight = torch.randn(2, 128, device=device)  # M = 128: above the kernels' 64
    kept = encode_kept(exact_nm_mask(2, 1, 128, 0), 1).to(device)
    assert not triton_evolve.supports(weight, weight, kept, 1, 128)
    with pytest.raises(ValueError, match="Triton evolve kernels"):
        triton_evolve.evolve_blocks(weight, weight, kept, 1, None, n=1, m=128, lr=0.1, gamma=0.9)
    assert not triton_evolve.supports(weight.half(), weight.half(), kept, 1, 128)


@pytest.mark.skipif(triton_kept.interpreting(), reason="this is the parent of the child run")
def test_kernels_under_the_triton_interpreter(run_interpreted):
    """The kernel tests, run on CPU tensors by Triton's interpreter in a child pytest."""
    run_interpreted(__file__, len(CASES) * 2 * 2 + len(CASES) * 2 * 3 + 2, timeout=900)
