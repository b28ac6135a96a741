"""The fused CPU kept-AdamW kernel (bame_optim.kernels.kept_adamw_cpu) against the eager
composition it replaces: kept_indices, gather_kept, torch.optim.adamw.adamw, scatter_kept_.

Moments, amsgrad maxima and step counts must be bit-identical (torch.equal). The weights must
be bit-identical to the eager chain with an IEEE square root, and within the tolerance torch's
own test_fused_matches_forloop allows between fused and for-loop AdamW (assert_close's
defaults: float32 rtol 1.3e-6 / atol 1e-5, float64 rtol 1e-7 / atol 1e-7) of the eager path
itself, whose Tensor.sqrt (MKL on x86 builds) is not always correctly rounded. Skips, or with
BAME_OPTIM_REQUIRE_NATIVE=1 fails, where the kernel cannot be built."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.optim.adamw import adamw

from bame_optim import BAMEAdamW
from bame_optim.core.kept import encode_kept, gather_kept, kept_indices, scatter_kept_
from bame_optim.core.nm import random_nm_mask
from bame_optim.kernels import kept_adamw_cpu, native
from bame_optim.optim.functional import kept_adamw

from .test_kept_sgd_cpu import channels_last, require_kernel

SHAPES = [(5, 16), (33, 80), (3, 32, 3, 3), (2, 16, 5), (300, 272)]
PATTERNS = [(2, 4), (1, 16), (3, 8), (16, 32)]  # (16, 32): positions, not ranks
HYPERS = [
    dict(amsgrad=False, beta1=0.9, beta2=0.999, lr=1e-3, weight_decay=0.05, eps=1e-8,
         maximize=False),
    dict(amsgrad=True, beta1=0.9, beta2=0.999, lr=1e-2, weight_decay=0.0, eps=1e-8,
         maximize=False),
    dict(amsgrad=False, beta1=0.5, beta2=0.9, lr=0.3, weight_decay=0.1, eps=1e-6,
         maximize=True),  # beta1 <= 0.5: lerp's other branch
    dict(amsgrad=True, beta1=0.0, beta2=0.0, lr=1e-2, weight_decay=0.01, eps=1e-8,
         maximize=True),
]


@pytest.fixture(scope="module", autouse=True)
def _kernel():
    require_kernel(kept_adamw_cpu)


def make_case(n, m, dtype, seed, shapes=SHAPES, steps=(0, 3, 1000)):
    gen = torch.Generator().manual_seed(seed)
    shapes = [s for s in shapes if s[1] % m == 0]

    def randn(*shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)

    params = [randn(*s) for s in shapes]
    grads = [randn(*s) for s in shapes]
    kept = [encode_kept(random_nm_mask(p.numel() // m, n, m, gen), n) for p in params]
    exp_avgs = [randn(p.numel() // m, n) * 0.1 for p in params]
    exp_avg_sqs = [randn(p.numel() // m, n).square() for p in params]
    maxima = [v + randn(*v.shape).abs() * 0.1 for v in exp_avg_sqs]
    state_steps = [torch.tensor(float(steps[i % len(steps)])) for i in range(len(params))]
    return dict(params=params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs,
                max_exp_avg_sqs=maxima, state_steps=state_steps, kept=kept,
                counts=[n] * len(params))


def clone_case(case):
    return {k: [t.clone() if isinstance(t, torch.Tensor) else t for t in v]
            for k, v in case.items()}


def eager_step(case, m, *, foreach, **hyper):
    """The composition the kernel replaces (what BAMEAdamW runs without it)."""
    positions = [kept_indices(k, c, m) for k, c in zip(case["kept"], case["counts"], strict=True)]
    weights = [gather_kept(p, i, m) for p, i in zip(case["params"], positions, strict=True)]
    grads = [gather_kept(g, i, m) for g, i in zip(case["grads"], positions, strict=True)]
    adamw(weights, grads, case["exp_avgs"], case["exp_avg_sqs"],
          case["max_exp_avg_sqs"] if hyper["amsgrad"] else [], case["state_steps"],
          foreach=foreach, **hyper)
    for p, i, w in zip(case["params"], positions, weights, strict=True):
        scatter_kept_(p, i, w, m)


def ieee_step(case, m, *, amsgrad, beta1, beta2, lr, weight_decay, eps, maximize):
    """torch's single-tensor AdamW op by op (ATen's rounding of each op), but with an IEEE
    (correctly rounded) square root: the kernel's arithmetic, which must match bit for bit."""
    for i, p in enumerate(case["params"]):
        pos = kept_indices(case["kept"][i], case["counts"][i], m)
        w, g = gather_kept(p, pos, m), gather_kept(case["grads"][i], pos, m)
        g = -g if maximize else g
        exp_avg, exp_avg_sq = case["exp_avgs"][i], case["exp_avg_sqs"][i]
        case["state_steps"][i] += 1
        step = case["state_steps"][i].item()
        if weight_decay != 0:
            w.mul_(1 - lr * weight_decay)
        exp_avg.lerp_(g, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        second = exp_avg_sq
        if amsgrad:
            torch.maximum(case["max_exp_avg_sqs"][i], exp_avg_sq, out=case["max_exp_avg_sqs"][i])
            second = case["max_exp_avg_sqs"][i]
        root = torch.from_numpy(np.sqrt(second.numpy()))
        denom = (root / (1 - beta2**step) ** 0.5).add_(eps)
        w.addcdiv_(exp_avg, denom, value=-(lr / (1 - beta1**step)))
        scatter_kept_(p, pos, w, m)


def fused_step(case, m, **hyper):
    kept_adamw_cpu.fused_kept_adamw_(
        case["params"], case["grads"], case["exp_avgs"], case["exp_avg_sqs"],
        case["max_exp_avg_sqs"], case["state_steps"], case["kept"], case["counts"], m=m, **hyper)


def assert_state_equal(expected, actual, amsgrad):
    keys = ["exp_avgs", "exp_avg_sqs", "state_steps"] + (["max_exp_avg_sqs"] if amsgrad else [])
    for key in keys:
        for i, (a, b) in enumerate(zip(expected[key], actual[key], strict=True)):
            assert torch.equal(a, b), f"{key}[{i}]: {(a != b).sum().item()} entries differ"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("n", "m"), PATTERNS)
@pytest.mark.parametrize("hyper", HYPERS)
def test_bit_identical_with_ieee_sqrt(dtype, n, m, hyper):
    case = make_case(n, m, dtype, seed=n * 100 + m)
    expected = clone_case(case)
    ieee_step(expected, m, **hyper)
    fused_step(case, m, **hyper)
    assert_state_equal(expected, case, hyper["amsgrad"])
    for i, (a, b) in enumerate(zip(expected["params"], case["params"], strict=True)):
        assert torch.equal(a, b), f"params[{i}]: {(a != b).sum().item()} entries differ"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("hyper", HYPERS)
def test_matches_torch_adamw_single_tensor_and_foreach(dtype, foreach, hyper):
    for n, m in [(2, 4), (1, 16)]:
        case = make_case(n, m, dtype, seed=7)
        expected = clone_case(case)
        eager_step(expected, m, foreach=foreach, **hyper)
        fused_step(case, m, **hyper)
        assert_state_equal(expected, case, hyper["amsgrad"])
        for a, b in zip(expected["params"], case["params"], strict=True):
            torch.testing.assert_close(b, a)  # torch's fused-vs-forloop tolerance


def test_tensor_lr_and_betas_are_read_as_floats():
    hyper = dict(HYPERS[0])
    case = make_case(2, 4, torch.float32, seed=1)
    floats = clone_case(case)
    fused_step(floats, 4, **hyper)
    fused_step(case, 4, **(hyper | dict(lr=torch.tensor(hyper["lr"], dtype=torch.float64),
                                       beta1=torch.tensor(hyper["beta1"], dtype=torch.float64),
                                       beta2=torch.tensor([hyper["beta2"]],
                                                          dtype=torch.float64))))
    assert_state_equal(floats, case, amsgrad=False)
    for a, b in zip(floats["params"], case["params"], strict=True):
        assert torch.equal(a, b)


def test_pruned_entries_untouched_steps_advanced_versions_bumped():
    case = make_case(1, 4, torch.float32, seed=2, shapes=[(6, 16)], steps=(41,))
    param = case["params"][0]
    before = param.clone()
    versions = [t._version for t in (param, case["exp_avgs"][0], case["exp_avg_sqs"][0])]
    fused_step(case, 4, **HYPERS[0])
    pos = kept_indices(case["kept"][0], 1, 4)
    mask = torch.zeros(param.numel() // 4, 4, dtype=torch.bool).scatter_(1, pos, True)
    mask = mask.view(6, 4, 4).view(6, 16)  # Linear: blocks along dim 1 are contiguous
    assert torch.equal(param[~mask], before[~mask])
    assert (param[mask] != before[mask]).all()
    assert case["state_steps"][0].item() == 42
    after = [t._version for t in (param, case["exp_avgs"][0], case["exp_avg_sqs"][0])]
    assert all(a > b for a, b in zip(after, versions, strict=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_transposed_view(dtype):
    """A weight stepped through ``w.t()`` of a contiguous ``[in, out]`` ``w`` (HF Conv1D)."""
    gen = torch.Generator().manual_seed(4)
    weights = [torch.randn(48, 7, generator=gen, dtype=dtype),
               torch.randn(64, 300, generator=gen, dtype=dtype)]
    grads = [torch.randn(w.shape, generator=gen, dtype=dtype) for w in weights]
    case = make_case(2, 4, dtype, seed=5, shapes=[(7, 48), (300, 64)])
    case["params"] = [w.t() for w in weights]
    case["grads"] = [g.t() for g in grads]
    assert all(kept_adamw_cpu.supports(p, g)
               for p, g in zip(case["params"], case["grads"], strict=True))
    expected = clone_case(case)
    expected["params"] = [w.clone().t() for w in weights]
    ieee_step(expected, 4, **HYPERS[1])
    fused_step(case, 4, **HYPERS[1])
    assert_state_equal(expected, case, amsgrad=True)
    for a, w in zip(expected["params"], weights, strict=True):
        assert torch.equal(a.t(), w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("n", "m"), PATTERNS)
@pytest.mark.parametrize("hyper", HYPERS)
def test_channels_last_bit_identical(dtype, n, m, hyper):
    """Channels-last convolution weights, stepped in place with their strides kept: bit for
    bit the IEEE chain on them, and what the kernel gives contiguous copies."""
    shapes = [(3, 32, 3, 3), (4, 16, 1, 1), (2, 16, 5), (3, 32, 2, 3, 1), (40, 64, 3, 3)]
    case = make_case(n, m, dtype, seed=11, shapes=shapes)
    last = clone_case(case)
    last["params"] = [channels_last(p) for p in case["params"]]
    last["grads"] = [channels_last(g) for g in case["grads"]]
    strides = [p.stride() for p in last["params"]]
    assert all(kept_adamw_cpu.supports(p, g)
               for p, g in zip(last["params"], last["grads"], strict=True))
    expected = clone_case(last)
    ieee_step(expected, m, **hyper)
    fused_step(last, m, **hyper)
    fused_step(case, m, **hyper)
    assert [p.stride() for p in last["params"]] == strides
    assert_state_equal(expected, last, hyper["amsgrad"])
    assert_state_equal(case, last, hyper["amsgrad"])
    for a, b, c in zip(expected["params"], last["params"], case["params"], strict=True):
        assert torch.equal(a, b) and torch.equal(c, b)


def test_supports():
    p, g = torch.randn(8, 16), torch.randn(8, 16)
    assert kept_adamw_cpu.supports(p, g)
    conv = torch.randn(4, 8, 3, 3).to(memory_format=torch.channels_last)
    assert kept_adamw_cpu.supports(conv, conv.clone())
    assert kept_adamw_cpu.supports(p.double(), g.double())
    assert kept_adamw_cpu.supports(p.t(), g.t())
    assert not kept_adamw_cpu.supports(p.half(), g.half())  # eager path
    assert not kept_adamw_cpu.supports(p.bfloat16(), g.bfloat16())
    assert not kept_adamw_cpu.supports(p[:, ::2], g[:, ::2])
    assert not kept_adamw_cpu.supports(p, None)


def test_bad_input_raises_value_error_before_writing():
    case = make_case(2, 4, torch.float32, seed=0, shapes=[(4, 8)])
    before = clone_case(case)
    hyper = HYPERS[1]
    bad = [
        dict(exp_avgs=[]),  # lengths
        dict(max_exp_avg_sqs=[]),  # amsgrad needs the maxima
        dict(exp_avgs=[torch.zeros(8, 3)]),  # moment shape
        dict(exp_avg_sqs=[torch.zeros(8, 2, dtype=torch.float64)]),  # moment dtype
        dict(max_exp_avg_sqs=[torch.zeros(2, 8).t()]),  # layout
        dict(params=[case["params"][0].half()], grads=[case["grads"][0].half()]),  # dtype
        dict(kept=[torch.full_like(case["kept"][0], 6)]),  # rank >= binom(4, 2)
        dict(counts=[5]),
        dict(state_steps=[torch.zeros(2)]),
    ]
    for override in bad:
        with pytest.raises(ValueError):
            fused_step(case | override, 4, **hyper)
    with pytest.raises(ValueError):
        fused_step(case, 4, **(hyper | dict(lr=torch.tensor([1e-3, 1e-3]))))
    with pytest.raises(ValueError):
        fused_step(case, 3, **hyper)
    for key, tensors in before.items():
        for a, b in zip(tensors, case[key], strict=True):
            assert not isinstance(a, torch.Tensor) or torch.equal(a, b), key


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv(native.DISABLE_ENV, "1")
    assert not kept_adamw_cpu.available()
    case = make_case(2, 4, torch.float32, seed=0)
    with pytest.raises(RuntimeError, match=native.DISABLE_ENV):
        fused_step(case, 4, **HYPERS[0])
    with pytest.raises(ValueError, match=r"Invalid fused value: True .*disabled"):
        call_kept_adamw(case, fused=True)
    call_kept_adamw(case, fused=None)  # the eager path
    monkeypatch.setenv(native.DISABLE_ENV, "0")
    assert kept_adamw_cpu.available()


def call_kept_adamw(case, *, fused, m=4, **overrides):
    kept_adamw(case["params"], case["grads"], case["exp_avgs"], case["exp_avg_sqs"],
               case["max_exp_avg_sqs"], case["state_steps"], case["kept"], case["counts"], m=m,
               fused=fused, **(HYPERS[1] | overrides))


def test_kept_adamw_fused_paths():
    """fused=None and True take the kernel (bit-identical to calling it), False the eager
    path (bit-identical to torch's adamw on the gathered weights)."""
    case = make_case(2, 4, torch.float32, seed=9)
    direct, auto, forced, eager, reference = (clone_case(case) for _ in range(5))
    fused_step(direct, 4, **HYPERS[1])
    call_kept_adamw(auto, fused=None)
    call_kept_adamw(forced, fused=True)
    call_kept_adamw(eager, fused=False)
    eager_step(reference, 4, foreach=False, **HYPERS[1])
    for key in case:
        for a, b, c in zip(direct[key], auto[key], forced[key], strict=True):
            assert not isinstance(a, torch.Tensor) or (torch.equal(a, b) and torch.equal(a, c))
        for a, b in zip(reference[key], eager[key], strict=True):
            assert not isinstance(a, torch.Tensor) or torch.equal(a, b)


def test_kept_adamw_fused_true_names_device_and_dtype():
    case = make_case(2, 4, torch.float16, seed=3, shapes=[(4, 8)])
    with pytest.raises(ValueError, match=r"Invalid fused value: True .*cpu of dtype torch.float16"):
        call_kept_adamw(case, fused=True)
    call_kept_adamw(case, fused=None)  # float16: the eager path
    assert case["state_steps"][0].item() == 1


def test_bame_adamw_steps_through_the_kernel_like_the_eager_path(monkeypatch):
    """BAMEAdamW as it is (fused=None inside) against the same run with the kernel disabled."""
    def run():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 4))
        opt = BAMEAdamW(model.parameters(), lr=1e-2, weight_decay=0.05, amsgrad=True,
                        t_i=0, t_f=0, total_steps=10)
        gen = torch.Generator().manual_seed(1)
        for _ in range(4):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    fused = run()
    monkeypatch.setenv(native.DISABLE_ENV, "1")
    eager = run()
    for a, b in zip(eager, fused, strict=True):
        torch.testing.assert_close(b, a)


def test_empty_inputs():
    fused_step(make_case(2, 4, torch.float32, seed=0, shapes=[]), 4, **HYPERS[0])
    case = make_case(2, 4, torch.float32, seed=0, shapes=[(0, 8)])
    fused_step(case, 4, **HYPERS[0])
    assert case["state_steps"][0].item() == 1


class _StepSubclass(torch.Tensor):
    """A tensor subclass: its steps are read and advanced by Python, not the extension."""


@pytest.mark.parametrize("kind", ["float32", "float64", "shape (1,)", "view", "int64",
                                  "2**24", "subclass", "mixed"])
def test_step_counts_of_every_kind(kind):
    """Step tensors the extension reads and advances (plain one-element CPU tensors) and
    those Python does (here a subclass) step as the op-by-op reference: the same moments,
    weights and advanced counts (dtype kept, version bumped)."""
    def steps(value):
        made = {
            "float32": lambda: torch.tensor(value),
            "float64": lambda: torch.tensor(value, dtype=torch.float64),
            "shape (1,)": lambda: torch.tensor([value]),
            "view": lambda: torch.tensor([0.0, value, 0.0])[1:2],
            "int64": lambda: torch.tensor(int(value)),
            "2**24": lambda: torch.tensor(float(2**24) + value),  # step + 1 rounds to 2**24
            "subclass": lambda: torch.tensor(value).as_subclass(_StepSubclass),
        }
        return made[kind]() if kind != "mixed" else [
            made[k]() for k in ("float32", "subclass", "float64")][int(value) % 3]

    case = make_case(2, 4, torch.float32, seed=3, shapes=[(4, 16), (3, 8, 3, 3), (5, 8)])
    case["state_steps"] = [steps(float(v)) for v in (0, 3, 7)]
    expected = clone_case(case)
    versions = [s._version for s in case["state_steps"]]
    for _ in range(2):
        ieee_step(expected, 4, **HYPERS[1])
        fused_step(case, 4, **HYPERS[1])
    assert_state_equal(expected, case, amsgrad=True)
    for a, b, version in zip(expected["state_steps"], case["state_steps"], versions,
                             strict=True):
        assert a.dtype == b.dtype and type(a) is type(b)
        assert b._version > version
    for a, b in zip(expected["params"], case["params"], strict=True):
        assert torch.equal(a, b)


def test_step_counts_that_require_grad():
    """Step tensors that require grad keep torch's _foreach_add_ (the Python path): in place
    on such a leaf it raises, under no_grad it steps as the reference."""
    def case_with_leaf_steps():
        case = make_case(2, 4, torch.float32, seed=6, shapes=[(4, 16), (5, 8)])
        case["state_steps"] = [torch.tensor(3.0, requires_grad=True) for _ in case["params"]]
        return case

    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        fused_step(case_with_leaf_steps(), 4, **HYPERS[1])
    case = case_with_leaf_steps()
    expected = clone_case(case)
    with torch.no_grad():
        ieee_step(expected, 4, **HYPERS[1])
        fused_step(case, 4, **HYPERS[1])
    assert_state_equal(expected, case, amsgrad=True)
    assert all(s.requires_grad and s.item() == 4 for s in case["state_steps"])
