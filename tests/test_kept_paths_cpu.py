"""Every path of the fused CPU kept kernels against the eager composition, bit for bit.

The kernels pick a path per parameter (bame_optim/kernels/csrc/kept_streams.h): the AVX-512
tiles of 3x3 convolutions (kept_tiles512.h: float, M = 4, count 1, 2 or 4, whole output
channels whose input channels divide by 16; strips of 2 tiles at 2:4 and 4 at 1:4, so
conv3x3_strips ends a row on a single tile at 2:4 and on a strip of 3 at 1:4), taken where
the CPU has AVX-512 and the call allows it (the ``simd`` fixture runs every test both ways),
else the paired AVX2 stream (float, S = 1, M = 4 or 8, count 1, 2 or 4), its transposed 8x8
tiles for 8 <= S <= 16 (float, M = 4, count 1, 2 or 4, whole output channels of a thread's
range whose block count per row the group divides: conv3x3 at 4:4, conv3x3_threads, conv5x3,
conv4x4; S mod 8 spatial positions left over but at S = 16), the scalar stream (S = 1, other
M, or float64; count dividing 8), tiles in memory order (S > 1: whole output
channels for S <= 16, 16 spatial positions of one channel beyond, as for a transposed Conv1D
view), and chunks for everything else (count 3, sorted positions) and for the blocks a stream
leaves at the end of a thread's range. The layouts below reach each of them with block
counts that leave tails, on one and two threads (ranges that split groups and tiles),
float32 and float64; SGD must equal the eager path (kept_indices, gather_kept,
torch.optim.sgd.sgd, scatter_kept_), AdamW the same chain with an IEEE square root
(test_kept_adamw_cpu)."""

from __future__ import annotations

import re

import pytest
import torch

from bame_optim.core.kept import encode_kept
from bame_optim.core.nm import random_nm_mask
from bame_optim.kernels import kept_adamw_cpu, kept_sgd_cpu, native

from .test_kept_adamw_cpu import HYPERS as ADAMW_HYPERS
from .test_kept_adamw_cpu import assert_state_equal, clone_case, fused_step, ieee_step
from .test_kept_sgd_cpu import HYPERS as SGD_HYPERS
from .test_kept_sgd_cpu import (
    assert_same,
    channels_last,
    clone_all,
    eager_step,
    require_kernel,
)

# (name, stored shape, view): the parameter is the stored tensor (view ""), its .t() view ("t"),
# or a channels-last copy ("channels_last": dim 1 innermost, read as rows of a Linear weight).
LAYOUTS = [
    ("linear", (13, 36), ""),  # S = 1: paired / scalar streams, odd block counts
    ("linear_m8", (7, 40), ""),  # 35 blocks of 8: one block per paired vector, tails
    ("conv1x1", (6, 20, 1, 1), ""),
    ("linear_threads", (129, 272), ""),  # > 4096 blocks: two threads split mid-group
    ("conv3x3", (7, 8, 3, 3), ""),  # S = 9: tiles of whole output channels
    ("conv3x3_threads", (41, 64, 3, 3), ""),  # two threads split a tile mid-row
    ("conv3x3_strips", (5, 48, 3, 3), ""),  # 3 tiles of 16 channels per row
    ("conv5x3", (5, 16, 5, 3), ""),  # S = 15
    ("conv4x4", (3, 16, 4, 4), ""),  # S = 16: rows a cache line apart, whole channels
    ("conv5x5", (3, 16, 5, 5), ""),  # S = 25: tiles of 16 + 9 spatial positions
    ("conv1d", (4, 32, 3), ""),
    ("transposed_small", (48, 7), "t"),  # w.t() of [in, out]: S = out = 7
    ("transposed_wide", (32, 300), "t"),  # S = 300: partial last tile
    ("conv3x3_channels_last", (41, 64, 3, 3), "channels_last"),  # 369 rows: threads split
    ("conv1d_channels_last", (4, 32, 3), "channels_last"),
]
PATTERNS = [(1, 4), (2, 4), (3, 4), (4, 4), (1, 8), (4, 8), (1, 16), (3, 16)]  # 4:4: all kept


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.fixture(params=[False, True], ids=["avx2", "avx512"])
def simd(request):
    """The kernels' ``avx512`` argument: False keeps the AVX2 paths; True takes the AVX-512
    ones (skipped where this CPU lacks them). Both must give the eager bits."""
    if request.param:
        require_kernel(kept_sgd_cpu)
        if not kept_sgd_cpu.cpu_has_avx512():
            pytest.skip("this CPU lacks AVX-512 (F, BW, DQ, VL)")
    return request.param


def layout_case(name, shape, view, n, m, dtype, seed):
    """Parameters (as the kernel sees them), gradients and kept sets of one layout, or None
    where the pattern does not divide the blocked dimension."""
    stored = torch.Size(shape)
    view_shape = stored[::-1] if view == "t" else stored
    if view_shape[1] % m:
        return None
    gen = torch.Generator().manual_seed(seed)

    def make():
        t = torch.randn(stored, generator=gen, dtype=torch.float64).to(dtype)
        return t.t() if view == "t" else channels_last(t) if view else t

    params, grads = [make(), make()], [make(), make()]
    kept = [encode_kept(torch.ones(p.numel() // m, m, dtype=torch.bool) if n == m
                        else random_nm_mask(p.numel() // m, n, m, gen), n) for p in params]
    return params, grads, kept, gen


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("name", "shape", "view"), LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_sgd_paths_bit_identical(threads, simd, dtype, name, shape, view):
    require_kernel(kept_sgd_cpu)
    if simd and dtype != torch.float32:
        pytest.skip("the AVX-512 paths are float32 only")
    for index, (n, m) in enumerate(PATTERNS):
        case = layout_case(name, shape, view, n, m, dtype, seed=index)
        if case is None:
            continue
        params, grads, kept, gen = case
        hyper = SGD_HYPERS[index % len(SGD_HYPERS)]
        buffers = [None, torch.randn(params[1].numel() // m, n, generator=gen,
                                     dtype=torch.float64).to(dtype)]  # first step; later step
        eager_params, eager_buffers = [p.clone() for p in params], clone_all(buffers)
        fused_buffers = clone_all(buffers)
        for _ in range(2):
            eager_step(eager_params, grads, eager_buffers, kept, [n, n], m, foreach=False,
                       **hyper)
            kept_sgd_cpu.fused_kept_sgd_(params, grads, fused_buffers, kept, [n, n], m=m,
                                         avx512=simd, **hyper)
            assert_same([p.contiguous() for p in eager_params],
                        [p.contiguous() for p in params])
            assert_same(eager_buffers, fused_buffers)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("name", "shape", "view"), LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_adamw_paths_bit_identical(threads, simd, dtype, name, shape, view):
    require_kernel(kept_adamw_cpu)
    if simd and dtype != torch.float32:
        pytest.skip("the AVX-512 paths are float32 only")
    for index, (n, m) in enumerate(PATTERNS):
        case = layout_case(name, shape, view, n, m, dtype, seed=index)
        if case is None:
            continue
        params, grads, kept, gen = case
        rows = params[0].numel() // m

        def state(rows=rows, n=n, gen=gen):
            return torch.randn(rows, n, generator=gen, dtype=torch.float64).to(dtype)

        exp_avg_sqs = [state().square() for _ in params]
        adamw_case = dict(
            params=params, grads=grads, exp_avgs=[state() * 0.1 for _ in params],
            exp_avg_sqs=exp_avg_sqs, max_exp_avg_sqs=[v + state().abs() for v in exp_avg_sqs],
            state_steps=[torch.tensor(0.0), torch.tensor(7.0)], kept=kept, counts=[n, n])
        hyper = ADAMW_HYPERS[index % len(ADAMW_HYPERS)]
        expected = clone_case(adamw_case)
        expected["params"] = [p.clone() for p in params]
        for _ in range(2):
            ieee_step(expected, m, **hyper)
            fused_step(adamw_case, m, avx512=simd, **hyper)
            assert_state_equal(expected, adamw_case, hyper["amsgrad"])
            for a, b in zip(expected["params"], adamw_case["params"], strict=True):
                assert torch.equal(a, b), f"{(a != b).sum().item()} of {a.numel()} differ"


# 3x3 weights the AVX-512 tiles take whole (16, 48 and 64 input channels: one tile, a strip
# and a single tile, strips only); with two threads the first splits a row.
WIDE_SHAPES = [(41, 64, 3, 3), (5, 48, 3, 3), (3, 16, 3, 3)]


@pytest.mark.parametrize("n", [2, 4])
def test_avx512_equals_avx2(threads, n):
    """The AVX-512 and AVX2 paths on the same inputs give the same bits: SGD with every
    hyper-parameter set (momentum, nesterov, dampening, weight decay, maximize; first step
    included), AdamW with amsgrad, maximize, weight decay and a Tensor lr."""
    require_kernel(kept_sgd_cpu)
    if not kept_sgd_cpu.cpu_has_avx512():
        pytest.skip("this CPU lacks AVX-512 (F, BW, DQ, VL)")
    m = 4
    for index, shape in enumerate(WIDE_SHAPES):
        gen = torch.Generator().manual_seed(10 + index)
        params = [torch.randn(shape, generator=gen) for _ in range(2)]
        grads = [torch.randn(shape, generator=gen) for _ in range(2)]
        rows = params[0].numel() // m
        kept = [encode_kept(random_nm_mask(rows, n, m, gen) if n < m
                            else torch.ones(rows, m, dtype=torch.bool), n) for _ in params]
        for hyper in SGD_HYPERS:
            runs = []
            for avx512 in (True, False):
                weights = [p.clone() for p in params]
                buffers = [None, torch.randn(rows, n, generator=torch.Generator().manual_seed(1))]
                for _ in range(2):
                    kept_sgd_cpu.fused_kept_sgd_(weights, grads, buffers, kept, [n, n], m=m,
                                                 avx512=avx512, **hyper)
                runs.append(weights + buffers)
            assert_same(*runs)
        for hyper in [*ADAMW_HYPERS, dict(ADAMW_HYPERS[1], lr=torch.tensor(3e-3))]:
            runs = []
            for avx512 in (True, False):
                state = torch.Generator().manual_seed(2)
                exp_avg_sqs = [torch.rand(rows, n, generator=state) for _ in params]
                case = dict(
                    params=[p.clone() for p in params], grads=grads,
                    exp_avgs=[torch.randn(rows, n, generator=state) for _ in params],
                    exp_avg_sqs=exp_avg_sqs,
                    max_exp_avg_sqs=[v + torch.rand(rows, n, generator=state)
                                     for v in exp_avg_sqs],
                    state_steps=[torch.tensor(0.0), torch.tensor(4.0)], kept=kept,
                    counts=[n, n])
                for _ in range(2):
                    fused_step(case, m, avx512=avx512, **hyper)
                runs.append(case)
            assert_state_equal(runs[1], runs[0], hyper["amsgrad"])
            assert_same(runs[1]["params"], runs[0]["params"])


def _choose_simd(monkeypatch, avx512):
    """What the optimizers' kernel calls take: AVX-512 paths or not (native.NO_AVX512_ENV)."""
    if avx512:
        monkeypatch.delenv(native.NO_AVX512_ENV, raising=False)
    else:
        monkeypatch.setenv(native.NO_AVX512_ENV, "1")


def _train(optimizer_class, fused, dtype, **hyper):
    """A few ordinary steps (fixed mask) on Linear weights stepped along dim 1 and along dim
    0 (an ``[in, out]`` weight, ``nm_dim=0``), 3x3 and 5x5 convolutions (a channels_last one
    too, its gradients in its layout as autograd gives them) and biases."""
    gen = torch.Generator().manual_seed(3)

    def randn(*shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)

    sparse = [randn(24, 32), randn(8, 16, 3, 3), randn(4, 8, 5, 5),
              channels_last(randn(8, 16, 3, 3))]
    in_out = [randn(48, 20)]  # [in, out]: blocks along dim 0
    dense = [randn(24), randn(8)]
    params = [torch.nn.Parameter(t) for t in sparse + in_out + dense]
    groups = [{"params": params[:4], "sparse": True},
              {"params": params[4:5], "sparse": True, "nm_dim": 0},
              {"params": params[5:], "sparse": False}]
    optimizer = optimizer_class(groups, n=2, m=4, t_i=0, t_f=0, fused=fused, **hyper)
    for _ in range(4):
        for p in params:
            p.grad = torch.empty_like(p).copy_(randn(*p.shape))
        optimizer.step()
    return params, optimizer


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("hyper", [
    dict(lr=0.1, momentum=0.9, weight_decay=5e-4),
    dict(lr=torch.tensor(0.05), momentum=0.9, nesterov=True, maximize=True),
    dict(lr=0.2, momentum=0.0, weight_decay=0.01),
])
def test_bamesgd_fused_equals_eager(simd, monkeypatch, dtype, hyper):
    """BAMESGD with the fused kernels (fused=True) is BAMESGD without them (fused=False), bit
    for bit, weights and momentum, nm_dim 0 included; AVX2 paths kept by the environment."""
    require_kernel(kept_sgd_cpu)
    _choose_simd(monkeypatch, simd)
    from bame_optim import BAMESGD

    fused, fused_opt = _train(BAMESGD, True, dtype, **hyper)
    eager, eager_opt = _train(BAMESGD, False, dtype, **hyper)
    for a, b in zip(eager, fused, strict=True):
        assert torch.equal(a, b)
    for p, q in zip(eager[:5], fused[:5], strict=True):
        a, b = eager_opt.momentum_buffer(p), fused_opt.momentum_buffer(q)
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("hyper", [
    dict(lr=1e-2, weight_decay=0.05),
    dict(lr=torch.tensor(3e-3), amsgrad=True, maximize=True, weight_decay=0.0),
])
def test_bameadamw_fused_equals_eager(simd, monkeypatch, dtype, hyper):
    """BAMEAdamW fused and eager: moments bit for bit, weights within torch's own
    fused-vs-forloop AdamW tolerance (assert_close's defaults; see test_kept_adamw_cpu)."""
    require_kernel(kept_adamw_cpu)
    _choose_simd(monkeypatch, simd)
    from bame_optim import BAMEAdamW

    fused, fused_opt = _train(BAMEAdamW, True, dtype, **hyper)
    eager, eager_opt = _train(BAMEAdamW, False, dtype, **hyper)
    for a, b in zip(eager, fused, strict=True):
        torch.testing.assert_close(b, a)
    for p, q in zip(eager[:5], fused[:5], strict=True):
        assert torch.equal(eager_opt.exp_avg(p), fused_opt.exp_avg(q))
        assert torch.equal(eager_opt.exp_avg_sq(p), fused_opt.exp_avg_sq(q))


# What changes between two steps, behind the optimizer's back: (name, change(params), whether
# the fused kernel still takes every tensor afterwards).
CHANGES = [
    ("grad strides", lambda ps: setattr(ps[1], "grad", channels_last(ps[1].grad)), False),
    ("grad None", lambda ps: setattr(ps[0], "grad", None), True),
    ("data replaced", lambda ps: setattr(ps[0], "data", ps[0].detach() * 0.5), True),
    ("data strides", lambda ps: setattr(ps[1], "data", channels_last(ps[1].detach())), False),
    ("data dtype", lambda ps: (setattr(ps[0], "data", ps[0].detach().half()),
                               setattr(ps[0], "grad", ps[0].grad.half())), False),
]


def _train_with_change(optimizer_class, fused, change, **hyper):
    """Two ordinary steps, ``change`` (each step's new gradients drawn first), two more."""
    gen = torch.Generator().manual_seed(5)
    shapes = [(24, 32), (8, 16, 3, 3), (24,)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    groups = [{"params": params[:2], "sparse": True}, {"params": params[2:], "sparse": False}]
    optimizer = optimizer_class(groups, n=2, m=4, t_i=0, t_f=0, fused=fused, **hyper)
    for step in range(4):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        if step == 2:
            change(params)
        optimizer.step()
    return params, optimizer


@pytest.mark.parametrize(("name", "change", "taken"), CHANGES, ids=[c[0] for c in CHANGES])
@pytest.mark.parametrize("optimizer_name", ["BAMESGD", "BAMEAdamW"])
def test_each_step_checks_the_tensors_it_gets(optimizer_name, name, change, taken):
    """Gradients and weights changed between steps (new strides, None, new data, new dtype)
    are checked at the step that gets them: fused=None steps as fused=False (falling back to
    the eager path where the kernel no longer takes a tensor), fused=True raises the clear
    ValueError there."""
    import bame_optim

    kernel = kept_sgd_cpu if optimizer_name == "BAMESGD" else kept_adamw_cpu
    require_kernel(kernel)
    optimizer_class = getattr(bame_optim, optimizer_name)
    hyper = (dict(lr=0.1, momentum=0.9, weight_decay=5e-4) if optimizer_name == "BAMESGD"
             else dict(lr=1e-2, weight_decay=0.05))
    try:
        eager, eager_opt = _train_with_change(optimizer_class, False, change, **hyper)
    except RuntimeError as failure:  # AdamW's moments stay float32 under a float16 weight
        with pytest.raises(RuntimeError, match=re.escape(str(failure))):
            _train_with_change(optimizer_class, None, change, **hyper)
        return
    chosen, chosen_opt = _train_with_change(optimizer_class, None, change, **hyper)
    for a, b in zip(eager, chosen, strict=True):
        assert a.dtype == b.dtype and a.stride() == b.stride()
        if optimizer_name == "BAMESGD" or a.dtype == torch.float16:
            assert torch.equal(a, b)
        else:  # the kernel's IEEE square root (see test_bameadamw_fused_equals_eager)
            torch.testing.assert_close(b, a)
    for p, q in zip(eager, chosen, strict=True):
        for key, value in eager_opt.state[p].items():
            other = chosen_opt.state[q][key]
            assert not isinstance(value, torch.Tensor) or torch.equal(value, other), key
    if taken:
        _train_with_change(optimizer_class, True, change, **hyper)
    else:
        with pytest.raises(ValueError, match="Invalid fused value: True"):
            _train_with_change(optimizer_class, True, change, **hyper)
