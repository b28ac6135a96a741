"""The optimizers' evolve update through the fused passes (bame_optim.optim.fused_evolve)
equals the eager rule (rules.lma_obf + NMEngine.apply_mask) bit for bit: a multi-phase run
(gradual pruning, the evolve phase with LMA + OBF, the fixed phase; weights written from
outside, a non-finite gradient) on a model with Linear, Conv2d (contiguous and channels_last)
and an [in, out] weight (nm_dim 0), compared on the parameters, every state tensor and the
reported flips and frozen blocks. The eager run is the same optimizer with the fused evolve
switched off (``fused_evolve_runs`` patched to False), so the ordinary steps take the same
path in both runs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bame_optim import BAMESGD, BAMEAdamW
from bame_optim.kernels import evolve_cpu, native
from bame_optim.optim import fused_evolve, mask_update

from .bitwise import bits

STEPS = 26
SCHEDULE = dict(total_steps=24, t_i=6, t_f=18, delta_t=2, alpha=0.4, beta=0.6)


@pytest.fixture(scope="module", autouse=True)
def _kernel():
    if native.required():
        assert evolve_cpu.available(), f"unavailable: {evolve_cpu.error()}"
        return
    if evolve_cpu.disabled() or not evolve_cpu.available():
        pytest.skip(f"fused evolve passes unavailable: {evolve_cpu.error()}")


def _model(m: int, dtype: torch.dtype, device: str = "cpu") -> nn.ModuleDict:
    torch.manual_seed(0)
    model = nn.ModuleDict({
        "linear": nn.Linear(2 * m, 5),
        "conv": nn.Conv2d(m, 3, 3),
        "conv_cl": nn.Conv2d(m, 4, 2),
        "in_out": nn.Linear(6, 2 * m, bias=False),
    }).to(device=device, dtype=dtype)
    model["conv_cl"].to(memory_format=torch.channels_last)
    return model  # in_out's weight [2m, 6] has its input (blocked) dimension at 0


def _groups(model):
    return [
        {"params": [model["linear"].weight, model["conv"].weight, model["conv_cl"].weight],
         "sparse": True},
        {"params": [model["in_out"].weight], "sparse": True, "nm_dim": 0},
        {"params": [model["linear"].bias, model["conv"].bias, model["conv_cl"].bias],
         "sparse": False},
    ]


OPTIMIZERS = {
    "sgd": lambda groups, **kw: BAMESGD(groups, lr=0.05, momentum=0.9, weight_decay=1e-3, **kw),
    "sgd_nesterov": lambda groups, **kw: BAMESGD(groups, lr=0.1, momentum=0.5, nesterov=True,
                                                 **kw),
    "adamw": lambda groups, **kw: BAMEAdamW(groups, lr=1e-2, weight_decay=1e-2, **kw),
    "adamw_amsgrad": lambda groups, **kw: BAMEAdamW(groups, lr=1e-2, amsgrad=True,
                                                    revive_score="sgd", **kw),
}


def _train(name, n, m, dtype, *, fused_evolve_on, monkeypatch, calls, device="cpu"):
    model = _model(m, dtype, device)
    optimizer = OPTIMIZERS[name](_groups(model), n=n, m=m, **SCHEDULE)
    runs = fused_evolve.fused_evolve_runs if fused_evolve_on else (lambda *args: False)

    def counted(*args):
        result = runs(*args)
        calls.append(result)
        return result

    monkeypatch.setattr(mask_update, "fused_evolve_runs", counted)
    params = list(model.parameters())
    for step in range(STEPS):
        gen = torch.Generator().manual_seed(1000 + step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(device, dtype)
            if step % 5 == 0:  # ties between scores: small integers
                p.grad = p.grad.round()
        if step == 12:  # an update step: this weight's mask update is skipped (and NaN spreads)
            model["linear"].weight.grad[0, 0] = float("nan")
        if step == 13:
            with torch.no_grad():  # written from outside: pruned entries come back nonzero
                model["conv"].weight.add_(0.5)
                model["in_out"].weight[0, :] = -0.0
        if step == 12:
            with pytest.warns(RuntimeWarning, match="NaN or Inf"):
                optimizer.step()
        else:
            optimizer.step()
    return model, optimizer


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (1, 8), (2, 16)])
def test_fused_evolve_equals_the_eager_rule_bit_for_bit(name, n, m, dtype, monkeypatch):
    _assert_runs_equal(name, n, m, dtype, monkeypatch, "cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["sgd", "adamw_amsgrad"])
@pytest.mark.parametrize("n, m", [(2, 4), (1, 16)])
def test_cuda_fused_evolve_equals_the_eager_rule_bit_for_bit(name, n, m, monkeypatch):
    # The Triton evolve kernels against the eager rule on the GPU (the same ordinary steps).
    _assert_runs_equal(name, n, m, torch.float32, monkeypatch, "cuda")


def _assert_runs_equal(name, n, m, dtype, monkeypatch, device):
    fused_calls, eager_calls = [], []
    fused_model, fused_opt = _train(name, n, m, dtype, fused_evolve_on=True,
                                    monkeypatch=monkeypatch, calls=fused_calls, device=device)
    eager_model, eager_opt = _train(name, n, m, dtype, fused_evolve_on=False,
                                    monkeypatch=monkeypatch, calls=eager_calls, device=device)
    assert any(fused_calls), "the fused evolve passes never ran"
    assert len(fused_calls) == len(eager_calls)
    for (key, a), b in zip(fused_model.named_parameters(), eager_model.parameters(), strict=True):
        assert torch.equal(bits(a), bits(b)), key
        state_a, state_b = fused_opt.state[a], eager_opt.state[b]
        assert state_a.keys() == state_b.keys(), key
        for entry, value in state_a.items():
            other = state_b[entry]
            if isinstance(value, torch.Tensor):
                assert value.dtype == other.dtype and value.shape == other.shape, (key, entry)
                assert torch.equal(bits(value), bits(other)), (key, entry)
            else:
                assert value == other, (key, entry)
    assert fused_opt.sparsity_report() == eager_opt.sparsity_report()


def test_fused_false_never_runs_the_passes(monkeypatch):
    model = _model(4, torch.float32)
    optimizer = BAMESGD(_groups(model), lr=0.1, momentum=0.9, n=2, m=4, fused=False, **SCHEDULE)
    called = []
    monkeypatch.setattr(mask_update, "evolve_fused_many", lambda *a, **k: called.append(1))
    for step in range(STEPS):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step))
        optimizer.step()
    assert not called


def test_fused_true_names_a_parameter_the_passes_cannot_take():
    weight = nn.Parameter(torch.randn(2, 128))  # M = 128: above the passes' 64
    optimizer = BAMESGD([weight], lr=0.1, n=1, m=128, sparse=True, fused=True, t_i=0, t_f=10,
                        delta_t=1, total_steps=10)
    weight.grad = torch.randn(2, 128)
    optimizer.step()  # step 0: the start mask (not an evolve update)
    with pytest.raises(ValueError, match=r"Invalid fused value: True .*evolve"):
        optimizer.step()


def test_without_native_kernels_the_eager_rule_runs(monkeypatch):
    monkeypatch.setenv(native.DISABLE_ENV, "1")
    model = _model(4, torch.float32)
    optimizer = BAMESGD(_groups(model), lr=0.1, momentum=0.9, n=2, m=4, **SCHEDULE)
    group = optimizer.param_groups[0]
    weight = model["linear"].weight
    weight.grad = torch.randn(weight.shape)
    optimizer.step()
    assert not fused_evolve.fused_evolve_runs(optimizer.engine, weight, weight.grad,
                                              optimizer.state[weight], group)
