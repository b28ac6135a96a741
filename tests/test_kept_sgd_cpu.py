"""The fused CPU kept-SGD kernel (bame_optim.kernels.kept_sgd_cpu) against the eager
composition it replaces: kept_indices, gather_kept, torch.optim.sgd.sgd, scatter_kept_.

float32/float64 must be bit-identical (torch.equal on parameters and momentum buffers). The
tests skip, with the reason, where the kernel cannot be built here (no compiler or ninja),
and fail instead with BAME_OPTIM_REQUIRE_NATIVE=1 (make test)."""

from __future__ import annotations

import math
import random

import pytest
import torch
from torch.optim.sgd import sgd

from bame_optim.core.kept import MAX_RANKED, encode_kept, gather_kept, kept_indices, scatter_kept_
from bame_optim.core.nm import random_nm_mask
from bame_optim.kernels import kept_sgd_cpu, native

SHAPES = [
    (5, 16),  # Linear
    (7, 48),
    (33, 80),
    (3, 32, 3, 3),  # Conv2d
    (4, 16, 1, 1),
    (6, 48, 5, 3),
    (2, 16, 5),  # Conv1d
    (3, 32, 2, 3, 1),  # Conv3d
    (300, 272),  # large enough to cross ATen's vector chunks and the kernel's chunks
    (40, 64, 3, 3),
]
PATTERNS = [(2, 4), (1, 4), (1, 16), (2, 8), (3, 4), (16, 32)]
HYPERS = [
    dict(lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False),
    dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=5e-4, nesterov=False, maximize=False),
    dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=1e-4, nesterov=True, maximize=False),
    dict(lr=0.37, momentum=0.5, dampening=0.1, weight_decay=0.0, nesterov=False, maximize=True),
    dict(lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.1, nesterov=False, maximize=True),
    dict(lr=0.2, momentum=0.99, dampening=0.5, weight_decay=0.03, nesterov=False, maximize=False),
    dict(lr=0.01, momentum=0.8, dampening=0.0, weight_decay=0.0, nesterov=True, maximize=True),
]


@pytest.fixture(scope="module", autouse=True)
def _kernel():
    require_kernel(kept_sgd_cpu)


def require_kernel(kernel):
    """Skip where the kernel cannot run here, with the reason; with
    BAME_OPTIM_REQUIRE_NATIVE set (make test, CI) fail instead."""
    if native.required():
        assert kernel.available(), f"unavailable with {native.REQUIRE_ENV} set: {kernel.error()}"
        return
    if kernel.disabled():
        pytest.skip(f"native kernels disabled by {native.DISABLE_ENV}")
    if not kernel.available():  # builds on first use; warns with the reason if it fails
        pytest.skip(f"fused CPU kernel unavailable: {kernel.error()}")


def eager_step(params, grads, buffers, kept, counts, m, *, foreach, **hyper):
    """The composition the kernel replaces (what the optimizer runs without it)."""
    positions = [kept_indices(k, c, m) for k, c in zip(kept, counts, strict=True)]
    weights = [gather_kept(p, i, m) for p, i in zip(params, positions, strict=True)]
    kept_grads = [gather_kept(g, i, m) for g, i in zip(grads, positions, strict=True)]
    sgd(weights, kept_grads, buffers, foreach=foreach, **hyper)
    for p, i, w in zip(params, positions, weights, strict=True):
        scatter_kept_(p, i, w, m)


def make_case(n, m, dtype, seed, shapes=SHAPES, first=False):
    gen = torch.Generator().manual_seed(seed)
    shapes = [s for s in shapes if s[1] % m == 0]
    params = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
    grads = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
    kept = [encode_kept(random_nm_mask(p.numel() // m, n, m, gen), n) for p in params]
    buffers = [
        None
        if first
        else torch.randn(p.numel() // m, n, generator=gen, dtype=torch.float64).to(dtype)
        for p in params
    ]
    return params, grads, buffers, kept, [n] * len(params)


def clone_all(tensors):
    return [None if t is None else t.clone() for t in tensors]


def assert_same(eager, fused):
    for i, (a, b) in enumerate(zip(eager, fused, strict=True)):
        if a is None or b is None:
            assert a is None and b is None, i
            continue
        assert a.shape == b.shape and a.dtype == b.dtype and b.is_contiguous(), i
        assert torch.equal(a, b), f"[{i}] {(a != b).sum().item()} of {a.numel()} entries differ"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("n", "m"), PATTERNS)
@pytest.mark.parametrize("hyper", range(len(HYPERS)))
def test_bit_identical_to_eager(dtype, n, m, hyper):
    hyper = HYPERS[hyper]
    for seed, first in ((1, True), (7, False)):
        params, grads, buffers, kept, counts = make_case(n, m, dtype, seed, first=first)
        fused_params, fused_buffers = clone_all(params), clone_all(buffers)
        eager_params, eager_buffers = clone_all(params), clone_all(buffers)
        for step in range(2):  # the first step may create the buffers; the next uses them
            foreach = (step + n) % 2 == 0
            eager_step(
                eager_params, grads, eager_buffers, kept, counts, m, foreach=foreach, **hyper
            )
            kept_sgd_cpu.fused_kept_sgd_(
                fused_params, grads, fused_buffers, kept, counts, m=m, **hyper
            )
            assert_same(eager_params, fused_params)
            assert_same(eager_buffers, fused_buffers)
        if hyper["momentum"] == 0 and first:
            assert all(b is None for b in fused_buffers)


def test_random_configs_bit_identical():
    """Random hyper-parameters (including odd learning rates) and shapes, mixed dtypes."""
    rng = random.Random(0)
    for case in range(60):
        n, m = rng.choice(PATTERNS)
        dtype = rng.choice([torch.float32, torch.float64])
        hyper = dict(
            lr=rng.uniform(1e-4, 1.0),
            momentum=rng.choice([0.0, rng.uniform(0, 1)]),
            dampening=rng.choice([0.0, rng.uniform(0, 1)]),
            weight_decay=rng.choice([0.0, rng.uniform(0, 0.1)]),
            maximize=rng.random() < 0.3,
        )
        hyper["nesterov"] = hyper["momentum"] > 0 and hyper["dampening"] == 0 and rng.random() < 0.5
        shapes = [
            (rng.randint(1, 40), m * rng.randint(1, 9), *[rng.randint(1, 4)] * rng.randint(0, 2))
            for _ in range(rng.randint(1, 5))
        ]
        params, grads, buffers, kept, counts = make_case(
            n, m, dtype, case, shapes=shapes, first=rng.random() < 0.3
        )
        eager_params, eager_buffers = clone_all(params), clone_all(buffers)
        eager_step(eager_params, grads, eager_buffers, kept, counts, m, foreach=True, **hyper)
        kept_sgd_cpu.fused_kept_sgd_(params, grads, buffers, kept, counts, m=m, **hyper)
        assert_same(eager_params, params)
        assert_same(eager_buffers, buffers)


@pytest.mark.parametrize("positions_dtype", [torch.uint8, torch.int16, torch.int64])
def test_positions_form(positions_dtype):
    """Sorted positions [K, count] (the stored form when binom(M, count) > MAX_RANKED, or
    kept_indices' int64 output) give the same result as ranks."""
    n, m = 2, 8
    params, grads, buffers, kept, counts = make_case(n, m, torch.float32, 3)
    positions = [kept_indices(k, n, m).to(positions_dtype) for k in kept]
    hyper = HYPERS[2]
    ranked_params, ranked_buffers = clone_all(params), clone_all(buffers)
    kept_sgd_cpu.fused_kept_sgd_(ranked_params, grads, ranked_buffers, kept, counts, m=m, **hyper)
    kept_sgd_cpu.fused_kept_sgd_(params, grads, buffers, positions, counts, m=m, **hyper)
    assert_same(ranked_params, params)
    assert_same(ranked_buffers, buffers)
    assert math.comb(32, 16) > MAX_RANKED  # (16, 32) in PATTERNS exercises the stored form


def test_first_step_puts_new_buffers_in_the_list():
    params, grads, buffers, kept, counts = make_case(2, 4, torch.float32, 0, first=True)
    buffers[1] = torch.zeros(params[1].numel() // 4, 2)  # mixed: one buffer already there
    existing = buffers[1]
    kept_sgd_cpu.fused_kept_sgd_(params, grads, buffers, kept, counts, m=4, **HYPERS[1])
    assert buffers[1] is existing
    assert all(
        b is not None and b.shape == (p.numel() // 4, 2)
        for p, b in zip(params, buffers, strict=True)
    )


def test_no_momentum_leaves_buffers_alone():
    params, grads, buffers, kept, counts = make_case(1, 4, torch.float32, 0, first=True)
    kept_sgd_cpu.fused_kept_sgd_(params, grads, buffers, kept, counts, m=4, **HYPERS[0])
    assert all(b is None for b in buffers)


def test_pruned_entries_untouched_and_version_bumped():
    params, grads, buffers, kept, counts = make_case(1, 16, torch.float32, 1)
    before = clone_all(params)
    versions = [p._version for p in params]
    grads = [g.clone() for g in grads]
    kept_sgd_cpu.fused_kept_sgd_(params, grads, buffers, kept, counts, m=16, **HYPERS[1])
    for p, old, k, version in zip(params, before, kept, versions, strict=True):
        positions = kept_indices(k, 1, 16)
        moved = (p != old).float()
        assert gather_kept(moved, positions, 16).sum() <= positions.numel()
        assert moved.sum() == gather_kept(moved, positions, 16).sum()  # nothing else moved
        assert p._version > version


def test_close_to_float64_reference():
    """float32 results within float32 rounding of the same step computed in float64."""
    params, grads, buffers, kept, counts = make_case(2, 4, torch.float32, 5)
    reference = [p.double() for p in params]
    ref_buffers = [b.double() for b in buffers]
    eager_step(
        reference,
        [g.double() for g in grads],
        ref_buffers,
        kept,
        counts,
        4,
        foreach=True,
        **HYPERS[2],
    )
    kept_sgd_cpu.fused_kept_sgd_(params, grads, buffers, kept, counts, m=4, **HYPERS[2])
    for p, r in zip(params + buffers, reference + ref_buffers, strict=True):
        torch.testing.assert_close(p.double(), r, rtol=1e-6, atol=1e-6)  # ~8 ulps at 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision(dtype):
    """float16/bfloat16 (exact=False): bit-identical where ATen's loop has no scalar tail
    (gathered size a multiple of 64, one chunk), else within an ulp of each rounding."""
    hyper = HYPERS[1]
    exact_shapes = [(8, 64), (4, 32, 2, 2)]  # K * count = 256, 256 at 2:4
    params, grads, buffers, kept, counts = make_case(2, 4, dtype, 2, shapes=exact_shapes)
    eager_params, eager_buffers = clone_all(params), clone_all(buffers)
    eager_step(eager_params, grads, eager_buffers, kept, counts, 4, foreach=False, **hyper)
    kept_sgd_cpu.fused_kept_sgd_(params, grads, buffers, kept, counts, m=4, **hyper)
    assert kept_sgd_cpu.supports(params[0], grads[0], exact=False)
    assert not kept_sgd_cpu.supports(params[0], grads[0])
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        assert_same(eager_params, params)
        assert_same(eager_buffers, buffers)
    params, grads, buffers, kept, counts = make_case(1, 16, dtype, 3)
    eager_params, eager_buffers = clone_all(params), clone_all(buffers)
    eager_step(eager_params, grads, eager_buffers, kept, counts, 16, foreach=False, **hyper)
    kept_sgd_cpu.fused_kept_sgd_(params, grads, buffers, kept, counts, m=16, **hyper)
    for a, b in zip(eager_params + eager_buffers, params + buffers, strict=True):
        torch.testing.assert_close(a, b, rtol=0.02, atol=0.02)


@pytest.mark.parametrize("hyper", range(len(HYPERS)))
def test_dense_parameters_in_the_same_call(hyper):
    """kept None: a dense parameter of any shape, exactly as torch.optim.sgd.sgd steps it."""
    hyper = HYPERS[hyper]
    gen = torch.Generator().manual_seed(11)
    dense_shapes = [(), (7,), (64,), (3000,), (5, 9), (4, 3, 3, 3)]
    params, grads, buffers, kept, counts = make_case(2, 4, torch.float32, 4, first=True)
    dense = [torch.randn(s, generator=gen) for s in dense_shapes]
    dense_grads = [torch.randn(s, generator=gen) for s in dense_shapes]
    all_params = params + dense
    all_grads = grads + dense_grads
    all_buffers = buffers + [None] * len(dense)
    all_kept = kept + [None] * len(dense)
    all_counts = counts + [None] * len(dense)
    eager_params, eager_buffers = clone_all(params), clone_all(buffers)
    eager_dense, eager_dense_buffers = clone_all(dense), [None] * len(dense)
    for _ in range(2):
        eager_step(eager_params, grads, eager_buffers, kept, counts, 4, foreach=True, **hyper)
        sgd(eager_dense, dense_grads, eager_dense_buffers, foreach=False, **hyper)
        kept_sgd_cpu.fused_kept_sgd_(
            all_params, all_grads, all_buffers, all_kept, all_counts, m=4, **hyper
        )
        assert_same(eager_params + eager_dense, all_params)
        assert_same(eager_buffers + eager_dense_buffers, all_buffers)


def test_supports():
    p, g = torch.randn(8, 16), torch.randn(8, 16)
    assert kept_sgd_cpu.supports(p, g)
    assert kept_sgd_cpu.supports(torch.nn.Parameter(p), g)
    assert not kept_sgd_cpu.supports(p, None)
    assert kept_sgd_cpu.supports(p.t(), g.t())  # the transposed view of a contiguous [in, out]
    assert not kept_sgd_cpu.supports(p.t(), g.t().contiguous())  # strides differ
    assert not kept_sgd_cpu.supports(p[:, ::2], g[:, ::2])  # other strides
    assert not kept_sgd_cpu.supports(p[:, 1:].t(), g[:, 1:].t())  # transposed slice: 16 != 15
    assert not kept_sgd_cpu.supports(p, g[:, :8])
    assert not kept_sgd_cpu.supports(p, g.double())
    assert not kept_sgd_cpu.supports(p.long(), g.long())
    assert kept_sgd_cpu.supports(torch.randn(16), torch.randn(16))  # dense (kept None)
    conv = torch.randn(4, 8, 3, 3).to(memory_format=torch.channels_last)
    assert kept_sgd_cpu.supports(conv, conv.clone())  # blocks are contiguous rows
    assert not kept_sgd_cpu.supports(conv, conv.contiguous())  # strides differ
    assert not kept_sgd_cpu.supports(conv[:, :, :, :2], conv.clone()[:, :, :, :2])  # a slice
    volume = torch.randn(4, 8, 2, 3, 3).to(memory_format=torch.channels_last_3d)
    assert kept_sgd_cpu.supports(volume, volume.clone())
    assert not kept_sgd_cpu.supports(conv.transpose(2, 3), conv.clone().transpose(2, 3))
    meta = torch.empty(8, 16, device="meta")
    assert not kept_sgd_cpu.supports(meta, meta)


def test_dispatch_subclass_rejected():
    """A __torch_dispatch__ subclass (DTensor-like wrapper) is not supported and raises."""
    two_tensor = pytest.importorskip("torch.testing._internal.two_tensor")
    p = two_tensor.TwoTensor(torch.randn(4, 8), torch.randn(4, 8))
    g = two_tensor.TwoTensor(torch.randn(4, 8), torch.randn(4, 8))
    assert not kept_sgd_cpu.supports(p, g)
    kept = [torch.zeros(8, dtype=torch.uint8)]
    with pytest.raises(ValueError, match="__torch_dispatch__"):
        _call([p], [g], [None], kept, [2])


def _call(params, grads, buffers, kept, counts, m=4, **overrides):
    hyper = dict(HYPERS[1])
    hyper.update(overrides)
    kept_sgd_cpu.fused_kept_sgd_(params, grads, buffers, kept, counts, m=m, **hyper)


def test_bad_input_raises_value_error_before_writing():
    params, grads, buffers, kept, counts = make_case(2, 4, torch.float32, 0, shapes=[(4, 8)])
    p0, b0 = params[0].clone(), buffers[0].clone()
    k = kept[0]
    cases = [
        ([params[0]], [grads[0]], buffers, kept, []),  # lengths
        ([torch.randn(4, 16)[:, ::2]], [grads[0]], buffers, kept, counts),  # strided
        (params, [grads[0][:, :4].contiguous()], buffers, kept, counts),  # grad shape
        ([params[0].long()], [grads[0].long()], buffers, kept, counts),  # dtype
        (params, grads, buffers, [k[:-1]], counts),  # kept length
        (params, grads, buffers, [torch.full_like(k, 6)], counts),  # rank >= binom(4, 2)
        (params, grads, buffers, [torch.full((8, 2), 4, dtype=torch.uint8)], counts),  # pos >= m
        (params, grads, buffers, [k.float()], counts),  # code dtype
        (params, grads, buffers, kept, [5]),  # count > m
        (params, grads, buffers, kept, [2.0]),  # count type
        (params, grads, [torch.zeros(8, 3)], kept, counts),  # buffer shape
        (params, grads, [torch.zeros(8, 2).double()], kept, counts),  # buffer dtype
        (params, grads, [torch.zeros(2, 8).t()], kept, counts),  # buffer layout
    ]
    for args in cases:
        with pytest.raises(ValueError):
            _call(*args)
    with pytest.raises(ValueError):
        _call(params, grads, buffers, kept, counts, m=3)  # 8 % 3 != 0
    with pytest.raises(ValueError):
        _call(params, grads, buffers, kept, counts, lr=torch.tensor(0.1))
    assert torch.equal(params[0], p0) and torch.equal(buffers[0], b0)
    with pytest.raises(ValueError):  # 1-D ranks for a pattern stored as positions
        _call(
            [torch.randn(2, 32)],
            [torch.randn(2, 32)],
            [None],
            [torch.zeros(2, dtype=torch.int16)],
            [16],
            m=32,
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_transposed_view_bit_identical(dtype):
    """A parameter stepped through ``w.t()`` of a contiguous ``[in, out]`` ``w`` (HF Conv1D)."""
    gen = torch.Generator().manual_seed(3)
    for n, m, (d_in, d_out) in [(2, 4, (48, 7)), (1, 16, (64, 5)), (2, 8, (16, 300))]:
        weights = [torch.randn(d_in, d_out, generator=gen, dtype=dtype) for _ in range(2)]
        grads = [torch.randn(d_in, d_out, generator=gen, dtype=dtype) for _ in range(2)]
        params = [w.t() for w in weights]
        kept = [encode_kept(random_nm_mask(p.numel() // m, n, m, gen), n) for p in params]
        buffers = [torch.randn(p.numel() // m, n, generator=gen, dtype=dtype) for p in params]
        assert all(kept_sgd_cpu.supports(p, g.t()) for p, g in zip(params, grads, strict=True))
        expected = [w.clone() for w in weights]
        expected_buffers = clone_all(buffers)
        eager_step([w.t() for w in expected], [g.t() for g in grads], expected_buffers, kept,
                   [n, n], m, foreach=False, **HYPERS[2])
        kept_sgd_cpu.fused_kept_sgd_(params, [g.t() for g in grads], buffers, kept, [n, n],
                                     m=m, **HYPERS[2])
        assert_same(expected, weights)
        assert_same(expected_buffers, buffers)


def channels_last(t):
    """A copy of ``t`` with dim 1 innermost and the others in order outside it:
    ``channels_last`` for a 4-D tensor, ``channels_last_3d`` for a 5-D one, the same order for a
    3-D one (a copy also where ``t`` already has that layout, as a 1x1 convolution does)."""
    return t.movedim(1, -1).clone(memory_format=torch.contiguous_format).movedim(-1, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("n", "m"), PATTERNS)
@pytest.mark.parametrize("avx512", [False, True])
def test_channels_last_bit_identical(dtype, n, m, avx512):
    """Channels-last convolution weights (their blocks contiguous rows, read as those of an
    ``[out * prod(k), in]`` weight) are stepped in place, keeping their strides, bit for bit as
    the eager path steps them and as the kernel steps contiguous copies."""
    shapes = [s for s in SHAPES if len(s) > 2 and s[1] % m == 0]
    for hyper in HYPERS:
        params, grads, buffers, kept, counts = make_case(n, m, dtype, 5, shapes=shapes)
        last = [channels_last(p) for p in params]
        last_grads = [channels_last(g) for g in grads]
        strides = [p.stride() for p in last]
        assert any(not p.is_contiguous() for p in last)
        assert all(kept_sgd_cpu.supports(p, g) for p, g in zip(last, last_grads, strict=True))
        eager, eager_buffers = clone_all(last), clone_all(buffers)
        last_buffers, contiguous_buffers = clone_all(buffers), clone_all(buffers)
        for _ in range(2):
            eager_step(eager, last_grads, eager_buffers, kept, counts, m, foreach=False, **hyper)
            kept_sgd_cpu.fused_kept_sgd_(last, last_grads, last_buffers, kept, counts, m=m,
                                         avx512=avx512, **hyper)
            kept_sgd_cpu.fused_kept_sgd_(params, grads, contiguous_buffers, kept, counts, m=m,
                                         avx512=avx512, **hyper)
        assert [p.stride() for p in last] == strides
        assert_same([p.contiguous() for p in eager], [p.contiguous() for p in last])
        assert_same(params, [p.contiguous() for p in last])
        assert_same(eager_buffers, last_buffers)
        assert_same(contiguous_buffers, last_buffers)


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv(kept_sgd_cpu.DISABLE_ENV, "1")
    assert not kept_sgd_cpu.available()
    params, grads, buffers, kept, counts = make_case(2, 4, torch.float32, 0)
    with pytest.raises(RuntimeError, match=kept_sgd_cpu.DISABLE_ENV):
        _call(params, grads, buffers, kept, counts)
    monkeypatch.setenv(kept_sgd_cpu.DISABLE_ENV, "0")
    assert kept_sgd_cpu.available()


def test_empty_inputs():
    _call([], [], [], [], [])
    p, g = torch.empty(0, 8), torch.empty(0, 8)
    buffers = [None]
    _call([p], [g], buffers, [torch.empty(0, dtype=torch.uint8)], [2])
    assert buffers[0].shape == (0, 2)


def test_bamesgd_fused_true_steps_dense_parameters_with_torch_fused_sgd(monkeypatch):
    """BAMESGD(fused=True): sparse weights through the kernel, dense ones (biases, layers left
    dense) through torch's fused SGD, equal to torch.optim.SGD(fused=True) bit for bit."""
    from bame_optim import BAMESGD
    from bame_optim.optim import sgd as sgd_module

    calls = []

    def spy(*args, **kwargs):
        calls.append((kwargs.get("fused"), kwargs.get("foreach")))
        return sgd(*args, **kwargs)

    monkeypatch.setattr(sgd_module, "sgd", spy)

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 3))
    reference = [p.detach().clone().requires_grad_() for p in model.parameters()]
    hyper = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
    groups = [{"params": [model[0].weight], "sparse": True},
              {"params": [model[0].bias, model[1].weight, model[1].bias], "sparse": False}]
    bame = BAMESGD(groups, fused=True, t_i=0, t_f=0, total_steps=10, **hyper)
    torch_sgd = torch.optim.SGD(reference[1:], fused=True, **hyper)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        for p, r in zip(model.parameters(), reference, strict=True):
            p.grad = torch.randn(p.shape, generator=gen)
            r.grad = p.grad.clone()
        bame.step()
        torch_sgd.step()
    assert calls == [(True, False)] * 3
    for p, r in zip(list(model.parameters())[1:], reference[1:], strict=True):
        assert torch.equal(p, r)
