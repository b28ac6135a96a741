"""The evolve ops of bame_optim.kernels.ops (``bame_optim::evolve_blocks``, ``obf_freeze``,
``apply_evolved_``): schemas, the CPU implementation (the native passes, else the eager
composition, bit for bit either way), ``opcheck`` (schema, fake implementation, autograd
registration), a compiled update without graph breaks, and on CUDA the Triton path against the
CPU."""

from __future__ import annotations

import warnings

import pytest
import torch

from bame_optim.core.evolution import obf_freeze
from bame_optim.core.kept import encode_kept
from bame_optim.kernels import evolve_cpu, evolve_reference, native, ops

from .strategies import block_mask, exact_nm_mask


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous().cpu()
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def _problem(seed: int = 0, n: int = 2, m: int = 4, shape=(6, 16, 3)):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=gen)
    grad = torch.randn(shape, generator=gen)
    k = weight.numel() // m
    kept = encode_kept(exact_nm_mask(k, n, m, seed), n)
    osc = torch.randint(0, 3, (k,), generator=gen) / 4
    return weight, grad, kept, osc


def _evolve_args(seed: int = 0):
    weight, grad, kept, osc = _problem(seed)
    return (weight, grad, kept, osc, 2, 2, 4, 0.1, 0.9, "sgd", True)


def _apply_args(seed: int = 0):
    weight, _, kept, _ = _problem(seed)
    k = weight.numel() // 4
    proposal = encode_kept(block_mask(k, 4, seed + 1, 2), 2)
    frozen = torch.arange(k) % 4 == 0
    buffers = [torch.randn(k, 2), torch.rand(k, 2)]
    return (weight, buffers, kept, 2, proposal, frozen, 4)


def test_op_schemas():
    assert str(torch.ops.bame_optim.evolve_blocks.default._schema) == (
        "bame_optim::evolve_blocks(Tensor(a0!) weight, Tensor grad, Tensor kept, "
        "Tensor? oscillation, SymInt count, SymInt n, SymInt m, float lr, float gamma, "
        "str revive, bool zero_pruned) -> (Tensor, Tensor, Tensor)"
    )
    assert str(torch.ops.bame_optim.obf_freeze.default._schema) == (
        "bame_optim::obf_freeze(Tensor oscillation, Tensor norms, float alpha, float beta) "
        "-> Tensor"
    )
    assert str(torch.ops.bame_optim.apply_evolved_.default._schema) == (
        "bame_optim::apply_evolved_(Tensor(a0!) weight, Tensor(a1!)[] buffers, Tensor kept, "
        "SymInt count, Tensor proposed, Tensor frozen, SymInt m) -> (Tensor, Tensor)"
    )


@pytest.mark.parametrize("native_on", [True, False])
def test_cpu_ops_are_the_eager_update_bit_for_bit(native_on, monkeypatch):
    if not native_on:
        monkeypatch.setenv(native.DISABLE_ENV, "1")  # the eager composition
    elif not evolve_cpu.available():
        pytest.skip(f"fused evolve passes unavailable: {evolve_cpu.error()}")
    args = _evolve_args(seed=3)
    expected_weight = args[0].clone()
    expected = evolve_reference.evolve_blocks_eager(
        expected_weight, *args[1:3], 2, args[3], n=2, m=4, lr=0.1, gamma=0.9, revive="sgd",
        zero_pruned=True)
    result = ops.evolve_blocks(*args)
    for a, b in zip(result, expected, strict=True):
        assert a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))
    assert torch.equal(_bits(args[0]), _bits(expected_weight))
    frozen = ops.obf_freeze(result[1], result[2], 0.5, 0.5)
    assert torch.equal(frozen, obf_freeze(expected[1], expected[2], 0.5, 0.5))
    weight, buffers, kept, count, proposal, frozen, m = _apply_args(seed=4)
    twin_weight, twin_buffers = weight.clone(), [b.clone() for b in buffers]
    new_kept, flips = ops.apply_evolved_(weight, buffers, kept, count, proposal, frozen, m)
    want_kept, want_flips = evolve_reference.apply_evolved_eager(
        twin_weight, twin_buffers, kept, count, proposal, frozen, m)
    assert torch.equal(new_kept, want_kept) and int(flips) == int(want_flips) > 0
    assert torch.equal(_bits(weight), _bits(twin_weight))
    for a, b in zip(buffers, twin_buffers, strict=True):
        assert torch.equal(_bits(a), _bits(b))


def test_opcheck_evolve_ops():
    torch.library.opcheck(torch.ops.bame_optim.evolve_blocks.default, _evolve_args(seed=5))
    _, osc, norms = ops.evolve_blocks(*_evolve_args(seed=6))
    torch.library.opcheck(torch.ops.bame_optim.obf_freeze.default, (osc, norms, 0.5, 0.3))
    torch.library.opcheck(torch.ops.bame_optim.apply_evolved_.default, _apply_args(seed=7))


def test_fake_impls_give_the_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    positions = _problem(n=16, m=32, shape=(3, 64))
    with FakeTensorMode() as mode:
        weight, grad = (mode.from_tensor(t) for t in positions[:2])
        kept = mode.from_tensor(encode_kept(exact_nm_mask(6, 16, 32, 0), 16))
        proposed, osc, norms = ops.evolve_blocks(weight, grad, kept, None, 16, 16, 32, 0.1, 0.9,
                                                 "adam", False)
        assert proposed.shape == (6, 16) and proposed.dtype == torch.uint8
        assert osc.shape == norms.shape == (6,) and osc.dtype == torch.float32
        assert ops.obf_freeze(osc, norms, 0.5, 0.5).dtype == torch.bool
        new_kept, flips = ops.apply_evolved_(weight, [], kept, 16, kept, mode.from_tensor(
            torch.zeros(6, dtype=torch.bool)), 32)
        assert new_kept.shape == kept.shape and flips.shape == ()


def test_the_support_checks_trace_without_a_graph_break(monkeypatch):
    # What torch.compile traces before the evolve ops (the fused evolve path's checks: the
    # CPU passes', and the Triton kernels' with CPU tensors passing as CUDA ones would):
    # fullgraph=True fails on a graph break (is_neg() was one), and no warning is allowed (an
    # lru_cache wrapper draws one).
    import torch._dynamo

    from bame_optim.kernels import triton_evolve, triton_kept

    monkeypatch.setattr(triton_kept, "interpreting", lambda: True)
    weight, grad, kept, osc = _problem(seed=9, shape=(4, 8, 3, 3))
    weight = weight.contiguous(memory_format=torch.channels_last)

    def checks(weight, grad, kept, osc):
        args = (weight, grad, kept, 2, 4, osc, [])
        return weight * 1, evolve_cpu.supports(*args), triton_evolve.supports(*args)

    torch._dynamo.reset()
    compiled = torch.compile(checks, fullgraph=True, backend="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert compiled(weight, grad, kept, osc)[1:] == (True, True)
        assert compiled(weight, grad, kept, osc.double())[1:] == (False, False)


def test_compiled_update_calls_the_ops_without_graph_break():
    import torch._dynamo

    def update(weight, grad, kept, osc, buffers):
        proposed, new_osc, norms = ops.evolve_blocks(weight, grad, kept, osc, 2, 2, 4, 0.1, 0.9,
                                                     "sgd", True)
        frozen = ops.obf_freeze(new_osc, norms, 0.5, 0.5)
        new_kept, flips = ops.apply_evolved_(weight, buffers, kept, 2, proposed, frozen, 4)
        return new_kept, new_osc, flips

    weight, grad, kept, osc = _problem(seed=8)
    buffers = [torch.randn(weight.numel() // 4, 2)]
    torch._dynamo.reset()
    explained = torch._dynamo.explain(update)(weight.clone(), grad, kept, osc,
                                              [b.clone() for b in buffers])
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    eager_w, eager_b = weight.clone(), [b.clone() for b in buffers]
    expected = update(eager_w, grad, kept, osc, eager_b)
    compiled = torch.compile(update, fullgraph=True, backend="aot_eager")
    comp_w, comp_b = weight.clone(), [b.clone() for b in buffers]
    result = compiled(comp_w, grad, kept, osc, comp_b)
    for a, b in zip(result, expected, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(comp_w, eager_w) and torch.equal(comp_b[0], eager_b[0])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_ops_match_the_cpu():
    cpu = _evolve_args(seed=9)
    cuda = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in cpu)
    cpu_result, cuda_result = ops.evolve_blocks(*cpu), ops.evolve_blocks(*cuda)
    for a, b in zip(cuda_result[:2], cpu_result[:2], strict=True):
        assert torch.equal(_bits(a), _bits(b))  # scores and EMA round alike on both devices
    weight, buffers, kept, count, proposal, frozen, m = _apply_args(seed=10)
    on_cuda = [weight.cuda(), [b.cuda() for b in buffers], kept.cuda(), count, proposal.cuda(),
               frozen.cuda(), m]
    new_kept, flips = ops.apply_evolved_(*on_cuda)
    want_kept, want_flips = ops.apply_evolved_(weight, buffers, kept, count, proposal, frozen, m)
    assert torch.equal(new_kept.cpu(), want_kept) and int(flips) == int(want_flips)
    assert torch.equal(on_cuda[0].cpu(), weight)
    for a, b in zip(on_cuda[1], buffers, strict=True):
        assert torch.equal(a.cpu(), b)
