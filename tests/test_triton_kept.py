"""The Triton kept-SGD / kept-AdamW kernels against the eager path (the ops: test_kernel_ops.py).

Kernel tests (``test_kernel_*``) take the ``device`` fixture: CUDA where there is a GPU, the CPU
where ``TRITON_INTERPRET=1`` was set before Triton was imported. A normal run has neither on a
CPU machine, so ``test_kernels_under_the_triton_interpreter`` reruns them in a child pytest with
``TRITON_INTERPRET=1`` (setting it here could not work: another test in the same xdist worker
may already have imported Triton, which reads the variable once).

Tolerance: the kernels do the eager path's operations in the same order, but the compiler (and
ATen's CPU ``add(alpha)``) may fuse a multiply and an add into one FMA where the other rounds
twice, so the two paths are not bit-identical. Both are compared with a float64 oracle (the
eager path on float64 copies of the same, already rounded, inputs), within ``TOLERANCE_ULPS``
ulps of the compared tensor's scale (its largest magnitude): each stored value is rounded after
a handful of operations per step (half an ulp each, relative to values of that scale) and the
recurrences (``momentum``, ``beta < 1``) are contractions, so three steps stay within a few
ulps (1 suffices under the interpreter; 4 leaves room for FMA contraction on a GPU).
The eager float32 result must meet the same bound, and a wrong formula (a dropped dampening, a
missing bias correction) fails it by orders of magnitude (checked by mutating the kernels).
float16/bfloat16 compute in float32 and round once per stored value: ``HALF_ULPS`` of their
own ulp. Entries outside the kept sets are compared exactly: the kernels must not write them.
"""

from __future__ import annotations

import pytest
import torch

from bame_optim.core.kept import encode_kept
from bame_optim.core.nm import blocks_to_param, random_nm_mask
from bame_optim.kernels import triton_kept
from bame_optim.kernels.block_layout import folded_layouts
from bame_optim.optim.functional import kept_adamw, kept_sgd

TOLERANCE_ULPS = 4
STEPS = 3
HALF_ULPS = 2

# (shape, n, m, layout): Linear and conv, rank codes in uint8 (2:4, 1:16) and int16 (8:16),
# stored positions (16:32), a transposed view and a channels_last conv.
CASES = [
    ((4, 8), 2, 4, "contiguous"),
    ((3, 32, 2, 2), 1, 16, "contiguous"),
    ((2, 32), 8, 16, "contiguous"),
    ((2, 32), 16, 32, "contiguous"),
    ((4, 8), 2, 4, "transposed"),
    ((2, 8, 3, 3), 2, 4, "channels_last"),
]
CASE_IDS = [f"{'x'.join(map(str, s))}-{n}:{m}-{layout}" for s, n, m, layout in CASES]
SGD_CONFIGS = [
    dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False),
    dict(momentum=0.9, dampening=0.1, weight_decay=1e-2, nesterov=False, maximize=True),
    dict(momentum=0.9, dampening=0.0, weight_decay=5e-4, nesterov=True, maximize=False),
]
ADAMW_CONFIGS = [
    dict(amsgrad=False, maximize=False, weight_decay=1e-2),
    dict(amsgrad=True, maximize=True, weight_decay=0.0),
]


@pytest.fixture
def device() -> torch.device:
    if triton_kept.interpreting():
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    pytest.skip(
        "needs a CUDA device or TRITON_INTERPRET=1 (test_kernels_under_the_triton_interpreter "
        "runs these under the interpreter)"
    )


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t`` with the same values in the memory layout ``layout``."""
    if layout == "transposed":  # w.t() of a contiguous [in, out] tensor
        return t.t().contiguous().t()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    return t.contiguous()


def _problem(case, dtype, device, seed=0):
    """A parameter (zero at pruned entries), gradients for every step, the kept mask and code."""
    shape, n, m, layout = case
    gen = torch.Generator().manual_seed(seed)
    mask = random_nm_mask(torch.Size(shape).numel() // m, n, m, gen)
    kept = blocks_to_param(mask, shape)
    param = torch.randn(shape, generator=gen, dtype=torch.float64) * kept
    grads = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(STEPS)]
    code = encode_kept(mask, n)
    as_dtype = lambda t: _layout(t.to(device=device, dtype=dtype), layout)  # noqa: E731
    return as_dtype(param), [as_dtype(g) for g in grads], code.to(device), kept.to(device)


def _assert_near(
    actual: torch.Tensor, oracle: torch.Tensor, dtype: torch.dtype, ulps: int = TOLERANCE_ULPS
) -> None:
    tolerance = ulps * torch.finfo(dtype).eps
    scale = oracle.abs().max().item()
    torch.testing.assert_close(
        actual.double().cpu(), oracle, rtol=tolerance, atol=tolerance * max(scale, 1e-30)
    )


def _kernel_sgd(params, grads, buffers, kept, counts, *, m, lr=0.1, **config):
    # The kernel entry point takes tensors for the buffers and a first-step flag per buffer.
    first = [b is None for b in buffers]
    if config["momentum"] != 0:
        buffers[:] = [
            p.new_empty((p.numel() // m, c)) if b is None else b
            for p, b, c in zip(params, buffers, counts, strict=True)
        ]
    triton_kept.kept_sgd_(params, grads, buffers if config["momentum"] else [], kept, counts,
                          first, m=m, lr=lr, **config)


@pytest.mark.cuda
@pytest.mark.parametrize("config", SGD_CONFIGS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_kernel_sgd_matches_eager(case, config, device):
    _, n, m, _ = case
    param, grads, code, kept = _problem(case, torch.float32, device)
    runs = {
        "kernel": (param.clone(), [None], _kernel_sgd),
        "eager": (param.clone(), [None], lambda *a, **k: kept_sgd(*a, lr=0.1, fused=False, **k)),
        "oracle": (param.double().cpu(), [None],
                   lambda *a, **k: kept_sgd(*a, lr=0.1, fused=False, **k)),
    }
    for grad in grads:
        for name, (p, buffers, step) in runs.items():
            g = grad.double().cpu() if name == "oracle" else grad
            c = code.cpu() if name == "oracle" else code
            step([p], [g], buffers, [c], [n], m=m, **config)
    oracle_param, oracle_buffers, _ = runs["oracle"]
    for name in ("kernel", "eager"):
        p, buffers, _ = runs[name]
        _assert_near(p, oracle_param, torch.float32)
        assert torch.equal(p[kept == 0], param[kept == 0])  # pruned entries untouched
        if config["momentum"]:
            _assert_near(buffers[0], oracle_buffers[0], torch.float32)
        else:
            assert buffers == [None]


@pytest.mark.cuda
@pytest.mark.parametrize("config", ADAMW_CONFIGS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_kernel_adamw_matches_eager(case, config, device):
    _, n, m, _ = case
    param, grads, code, kept = _problem(case, torch.float32, device, seed=1)
    k = param.numel() // m
    hyper = dict(m=m, beta1=0.9, beta2=0.999, lr=1e-2, eps=1e-8, **config)

    def fresh(p, dtype, dev):
        return [p.clone() if dtype == p.dtype else p.double().cpu()] + [
            torch.zeros(k, n, dtype=dtype, device=dev) for _ in range(3)
        ] + [torch.tensor(0.0)]

    runs = {
        "kernel": (fresh(param, torch.float32, device), triton_kept.kept_adamw_),
        "eager": (fresh(param, torch.float32, device), kept_adamw),
        "oracle": (fresh(param, torch.float64, "cpu"), kept_adamw),
    }
    for grad in grads:
        for name, ((p, ma, va, vmax, step), update) in runs.items():
            g = grad.double().cpu() if name == "oracle" else grad
            c = code.cpu() if name == "oracle" else code
            update([p], [g], [ma], [va], [vmax] if config["amsgrad"] else [], [step], [c], [n],
                   **hyper)
    oracle = runs["oracle"][0]
    for name in ("kernel", "eager"):
        state = runs[name][0]
        for value, expected in zip(state[:4], oracle[:4], strict=True):
            _assert_near(value, expected, torch.float32)
        assert state[4].item() == STEPS
        assert torch.equal(state[0][kept == 0], param[kept == 0])
    if not config["amsgrad"]:
        assert not runs["kernel"][0][3].any()  # max_exp_avg_sq untouched without amsgrad


@pytest.mark.cuda
def test_kernel_sgd_float64_computes_in_float64(device):
    # Dyadic hyper-parameters: exact in float32 too, so the interpreter (which passes float
    # scalars as float32) sees the same values as CUDA; the result must then be float64-close.
    case = ((4, 16), 2, 8, "contiguous")
    _, n, m, _ = case
    param, grads, code, kept = _problem(case, torch.float64, device, seed=2)
    config = dict(momentum=0.875, dampening=0.25, weight_decay=2**-6, nesterov=True,
                  maximize=False)
    p_kernel, b_kernel = param.clone(), [None]
    p_eager, b_eager = param.clone(), [None]
    for grad in grads:
        _kernel_sgd([p_kernel], [grad], b_kernel, [code], [n], m=m, lr=0.125, **config)
        kept_sgd([p_eager], [grad], b_eager, [code], [n], m=m, lr=0.125, fused=False, **config)
    _assert_near(p_kernel, p_eager.cpu(), torch.float64)
    assert torch.equal(p_kernel[kept == 0], param[kept == 0])
    _assert_near(b_kernel[0], b_eager[0].cpu(), torch.float64)


@pytest.mark.cuda
@pytest.mark.parametrize("rule", ["sgd", "adamw"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_half_precision_near_oracle(dtype, rule, device):
    # float16/bfloat16 compute in float32 and round once per stored value, so the kernel is
    # within the same ulp bound of the float64 oracle (eager rounds after every operation and
    # is not compared here).
    case = ((2, 8, 3, 3), 2, 4, "channels_last")
    _, n, m, _ = case
    param, grads, code, kept = _problem(case, dtype, device, seed=5)
    p, oracle = param.clone(), param.double().cpu()
    if rule == "sgd":
        config = SGD_CONFIGS[1]
        buffers, oracle_buffers = [None], [None]
        for grad in grads:
            _kernel_sgd([p], [grad], buffers, [code], [n], m=m, **config)
            kept_sgd([oracle], [grad.double().cpu()], oracle_buffers, [code.cpu()], [n], m=m,
                     lr=0.1, fused=False, **config)
        state, oracle_state = buffers, oracle_buffers
    else:  # eps 1e-3: (1 - beta2) g^2 is near float16's subnormals, eps keeps denom normal
        hyper = dict(m=m, amsgrad=True, beta1=0.9, beta2=0.999, lr=1e-2, weight_decay=1e-2,
                     eps=1e-3, maximize=False)
        k = p.numel() // m
        state = [torch.zeros(k, n, dtype=dtype, device=device) for _ in range(3)]
        oracle_state = [torch.zeros(k, n, dtype=torch.float64) for _ in range(3)]
        steps = [torch.tensor(0.0), torch.tensor(0.0)]
        for grad in grads:
            triton_kept.kept_adamw_([p], [grad], *([s] for s in state), [steps[0]], [code],
                                    [n], **hyper)
            kept_adamw([oracle], [grad.double().cpu()], *([s] for s in oracle_state),
                       [steps[1]], [code.cpu()], [n], **hyper)
    _assert_near(p, oracle, dtype, HALF_ULPS)
    for value, expected in zip(state, oracle_state, strict=True):
        _assert_near(value, expected, dtype, HALF_ULPS)
    assert p.dtype == dtype and torch.equal(p[kept == 0], param[kept == 0])


@pytest.mark.cuda
def test_kernel_rejects_state_it_cannot_write(device):
    param, grads, code, _ = _problem(((4, 8), 2, 4, "contiguous"), torch.float32, device)
    strided = torch.zeros(2 * 8, 2, device=device)[::2]  # [8, 2], not contiguous
    with pytest.raises(ValueError, match="contiguous"):
        triton_kept.kept_sgd_([param], [grads[0]], [strided], [code], [2], [False], m=4,
                              lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0,
                              nesterov=False, maximize=False)


@pytest.mark.cuda
def test_kernel_checks_every_parameter_before_writing_any(device):
    param, grads, code, _ = _problem(((4, 8), 2, 4, "contiguous"), torch.float32, device)
    before, step = param.clone(), torch.tensor(0.0)
    moments = [[torch.zeros(8, 2, device=device)] * 2 for _ in range(2)]
    with pytest.raises(ValueError, match="Invalid kept form"):
        triton_kept.kept_adamw_([param, param], [grads[0]] * 2, *moments, [],
                                [step, step.clone()], [code, code[:4]], [2, 2], m=4,
                                amsgrad=False, beta1=0.9, beta2=0.999, lr=1e-2,
                                weight_decay=0.0, eps=1e-8, maximize=False)
    assert torch.equal(param, before) and step.item() == 0


# One call over parameters of several signatures: five float32 2:4 weights of different
# layouts (one launch whose programs must find their row among five), a float64 one, one
# keeping 3 of 4 (another count in the same call, as in the gradual phase), a 1:16 one, a
# 16:32 one (stored positions) and an empty one (no blocks).
MANY = [
    (((4, 8), 2, 4, "contiguous"), torch.float32),
    (((3, 8, 3, 3), 2, 4, "channels_last"), torch.float32),
    (((4, 8), 2, 4, "transposed"), torch.float32),
    (((2, 4, 1, 5), 2, 4, "contiguous"), torch.float32),
    (((5, 12), 2, 4, "contiguous"), torch.float32),
    (((2, 8), 2, 4, "contiguous"), torch.float64),
    (((3, 8), 3, 4, "contiguous"), torch.float32),
    (((3, 32, 2, 2), 1, 16, "contiguous"), torch.float32),
    (((2, 32), 16, 32, "contiguous"), torch.float32),
    (((0, 8), 2, 4, "contiguous"), torch.float32),
]


class _LaunchCounter:
    """Stands in for a kernel: counts its launches and passes them on."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


def _count_launches(monkeypatch, name):
    """Kernel ``name`` of the Triton module replaced by a :class:`_LaunchCounter` of it."""
    kernels = triton_kept._kernels()
    counter = _LaunchCounter(getattr(kernels, name))
    monkeypatch.setattr(kernels, name, counter)
    return counter


def _many(device, seed):
    """``(param, grads, code, kept, n, m)`` of every :data:`MANY` case."""
    return [(*_problem(case, dtype, device, seed=seed + i), case[1], case[2])
            for i, (case, dtype) in enumerate(MANY)]


def _by_block_size(problems):
    """Indices of ``problems`` per block size, as param groups would call the kernels."""
    sizes = sorted({m for *_, m in problems})
    return [(m, [i for i, (*_, mi) in enumerate(problems) if mi == m]) for m in sizes]


# Dyadic, so that the interpreter's float32 scalars are the float64 values (see the float64
# test below).
DYADIC_SGD = dict(momentum=0.875, dampening=0.25, weight_decay=2**-6, nesterov=True,
                  maximize=False)


@pytest.mark.cuda
@pytest.mark.parametrize("wide", [False, True], ids=["int32-blocks", "int64-blocks"])
def test_kernel_sgd_steps_many_parameters_one_launch_per_signature(device, monkeypatch, wide):
    # wide: every launch computes indices in int64, as one for a parameter spanning 2**30
    # elements or more would (too large to test).
    monkeypatch.setattr(triton_kept, "_INT32_SPAN", 1 if wide else triton_kept._INT32_SPAN)
    problems = _many(device, seed=10)
    counter = _count_launches(monkeypatch, "kept_sgd_kernel")
    params = [p.clone() for p, *_ in problems]
    oracle = [p.double().cpu() for p, *_ in problems]
    buffers, oracle_buffers = [None] * len(problems), [[None] for _ in problems]
    for step in range(STEPS):
        if step == 1:  # one buffer starts over: a first step beside later ones
            buffers[2], oracle_buffers[2] = None, [None]
        for p, (_, grads, code, _, n, m), b in zip(oracle, problems, oracle_buffers,
                                                    strict=True):
            kept_sgd([p], [grads[step].double().cpu()], b, [code.cpu()], [n], m=m, lr=0.125,
                     fused=False, **DYADIC_SGD)
        for m, chosen in _by_block_size(problems):
            sub = [buffers[i] for i in chosen]
            _kernel_sgd([params[i] for i in chosen], [problems[i][1][step] for i in chosen],
                        sub, [problems[i][2] for i in chosen], [problems[i][4] for i in chosen],
                        m=m, lr=0.125, **DYADIC_SGD)
            for i, b in zip(chosen, sub, strict=True):
                buffers[i] = b
    # Per step: m = 4 has three signatures (float32 keeping 2 and 3, float64; step 1: the
    # restarted buffer's first step is a fourth); m = 16 and m = 32 one each. The empty
    # weight launches nothing.
    assert len(counter.grids) == (3 + 1 + 1) + (4 + 1 + 1) + (3 + 1 + 1)
    for (param, *_, kept, _, _), p, o, b, ob in zip(problems, params, oracle, buffers,
                                                    oracle_buffers, strict=True):
        if param.numel():
            _assert_near(p, o, param.dtype)
            _assert_near(b, ob[0], param.dtype)
        assert torch.equal(p[kept == 0], param[kept == 0])


@pytest.mark.cuda
@pytest.mark.parametrize("wide", [False, True], ids=["int32-blocks", "int64-blocks"])
def test_kernel_adamw_steps_many_parameters_at_their_own_step_counts(device, monkeypatch,
                                                                     wide):
    # Each parameter's step size and bias correction come from its own step count (one
    # parameter starts at step 5), read from the launch table as float64 bits.
    monkeypatch.setattr(triton_kept, "_INT32_SPAN", 1 if wide else triton_kept._INT32_SPAN)
    problems = _many(device, seed=20)
    counter = _count_launches(monkeypatch, "kept_adamw_kernel")
    hyper = dict(amsgrad=True, beta1=0.875, beta2=0.96875, lr=2**-7, weight_decay=2**-5,
                 eps=2**-20, maximize=False)

    def fresh(param, n, m, dtype, dev):
        k = param.numel() // m
        return [param.clone() if dtype == param.dtype else param.double().cpu()] + [
            torch.zeros(k, n, dtype=dtype, device=dev) for _ in range(3)
        ] + [torch.tensor(0.0)]

    kernel = [fresh(p, n, m, p.dtype, device) for p, _, _, _, n, m in problems]
    oracle = [fresh(p, n, m, torch.float64, "cpu") for p, _, _, _, n, m in problems]
    kernel[3][4].fill_(5.0)
    oracle[3][4].fill_(5.0)
    for step in range(STEPS):
        for state, (_, grads, code, _, n, m) in zip(oracle, problems, strict=True):
            kept_adamw([state[0]], [grads[step].double().cpu()], *([s] for s in state[1:]),
                       [code.cpu()], [n], m=m, **hyper)
        for m, chosen in _by_block_size(problems):
            p, m1, m2, vmax, steps = ([kernel[i][j] for i in chosen] for j in range(5))
            triton_kept.kept_adamw_(
                p, [problems[i][1][step] for i in chosen], m1, m2, vmax, steps,
                [problems[i][2] for i in chosen], [problems[i][4] for i in chosen], m=m,
                **hyper)
    assert len(counter.grids) == STEPS * (3 + 1 + 1)  # m = 4: three signatures
    for (param, *_, kept, _, _), state, expected in zip(problems, kernel, oracle, strict=True):
        for value, reference in zip(state[:4], expected[:4], strict=True):
            if param.numel():
                _assert_near(value, reference, param.dtype)
        assert state[4].item() == expected[4].item()
        assert torch.equal(state[0][kept == 0], param[kept == 0])


@pytest.mark.cuda
@pytest.mark.parametrize("rule", ["sgd", "adamw"])
def test_kernel_reads_a_gradient_laid_out_unlike_its_weight(rule, device):
    # A channels_last weight with a contiguous gradient: each is addressed through its own
    # strides of one joint fold (folding each alone gives different sizes).
    case = ((4, 8, 3, 3), 2, 4, "channels_last")
    _, n, m, _ = case
    param, grads, code, kept = _problem(case, torch.float32, device, seed=3)
    grads = [g.contiguous() for g in grads]
    assert folded_layouts(param)[0][:2] != folded_layouts(grads[0])[0][:2]
    p, oracle = param.clone(), param.double().cpu()
    k = param.numel() // m
    state = [torch.zeros(k, n, device=device) for _ in range(3)] + [torch.tensor(0.0)]
    oracle_state = [torch.zeros(k, n, dtype=torch.float64) for _ in range(3)]
    oracle_state.append(torch.tensor(0.0))
    buffers, oracle_buffers = [None], [None]
    for grad in grads:
        if rule == "sgd":
            _kernel_sgd([p], [grad], buffers, [code], [n], m=m, lr=0.125, **DYADIC_SGD)
            kept_sgd([oracle], [grad.double().cpu()], oracle_buffers, [code.cpu()], [n], m=m,
                     lr=0.125, fused=False, **DYADIC_SGD)
        else:
            hyper = dict(m=m, amsgrad=False, beta1=0.875, beta2=0.96875, lr=2**-7,
                         weight_decay=0.0, eps=2**-20, maximize=False)
            triton_kept.kept_adamw_([p], [grad], [state[0]], [state[1]], [], [state[3]],
                                    [code], [n], **hyper)
            kept_adamw([oracle], [grad.double().cpu()], [oracle_state[0]], [oracle_state[1]],
                       [], [oracle_state[3]], [code.cpu()], [n], **hyper)
    _assert_near(p, oracle, torch.float32)
    assert torch.equal(p[kept == 0], param[kept == 0])


@pytest.mark.skipif(triton_kept.interpreting(), reason="this is the parent of the child run")
def test_kernels_under_the_triton_interpreter(run_interpreted):
    """The kernel tests, run on CPU tensors by Triton's interpreter in a child pytest."""
    expected = len(CASES) * (len(SGD_CONFIGS) + len(ADAMW_CONFIGS)) + 3 + 4 + 6
    run_interpreted(__file__, expected, timeout=600)


def test_folded_layout_addresses_the_blocks_of_core_nm():
    # The kernels' addressing (block index -> folded outer index, strides) in plain torch: the
    # first entry of every block must be the one core.nm's block view puts there.
    for shape, layout in (((3, 8, 2, 2), "channels_last"), ((4, 8), "transposed")):
        t = _layout(torch.arange(torch.Size(shape).numel(), dtype=torch.float32).view(shape),
                    layout)
        ((n1, n2, *strides),) = folded_layouts(t)
        n0 = t.numel() // (t.shape[1] * n1 * n2)
        index = torch.arange(t.numel() // 4)
        per_row = t.shape[1] // 4
        outer, column = index // per_row, (index % per_row) * 4
        i2, i1, i0 = outer % n2, outer // n2 % n1, outer // n2 // n1
        assert int(i0.max()) == n0 - 1
        offsets = i0 * strides[0] + i1 * strides[1] + i2 * strides[2] + column * strides[3]
        flat = t.as_strided((t.numel(),), (1,))
        expected = t.movedim(1, -1).reshape(-1, 4)[:, 0]
        assert torch.equal(flat[offsets], expected)
