"""Weights whose input dimension is 0 (``[in, out]``, Hugging Face Conv1D): a group with
``"nm_dim": 0`` trains such a weight exactly as the transposed ``[out, in]`` weight trains in an
ordinary group, bit for bit, through every phase, and reads back in the weight's own layout."""

from __future__ import annotations

import copy

import pytest
import torch

from bame_optim import BAMESGD, BAMEAdamW
from bame_optim.core.nm import is_nm_sparse, nm_layout
from bame_optim.methods import make_optimizer

IN, OUT, STEPS = 16, 6, 14


def _pair(seed: int = 0, dtype=torch.float32):
    """An [in, out] weight and its transposed copy [out, in], equal values."""
    torch.manual_seed(seed)
    w0 = torch.nn.Parameter(torch.randn(IN, OUT, dtype=dtype))
    w1 = torch.nn.Parameter(w0.detach().t().contiguous())
    return w0, w1


def _grads(step: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(OUT, IN, generator=torch.Generator().manual_seed(100 + step), dtype=dtype)


def _run(opt_a, w0, opt_b, w1, steps, start=0):
    """Step both with the same gradient, in each weight's layout (``w1`` may be ``[in, out]``
    too: then both get the ``[in, out]`` gradient)."""
    for t in range(start, start + steps):
        g = _grads(t, w0.dtype)
        w0.grad = g.t().contiguous()
        w1.grad = g.clone() if w1.shape == g.shape else g.t().contiguous()
        opt_a.step()
        opt_b.step()


OPTIMIZERS = {
    "sgd": lambda params, **kw: BAMESGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3,
                                        nesterov=True, **kw),
    "sgd_eager": lambda params, **kw: BAMESGD(params, lr=0.1, momentum=0.9, fused=False, **kw),
    "adamw": lambda params, **kw: BAMEAdamW(params, lr=1e-2, weight_decay=1e-2, amsgrad=True,
                                            **kw),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("n, m", [(2, 4), (1, 8)])
def test_an_in_out_weight_trains_bit_for_bit_as_its_transpose(name, n, m):
    w0, w1 = _pair()
    schedule = dict(n=n, m=m, total_steps=12, delta_t=1, alpha=0.3, beta=0.3)
    opt_a = OPTIMIZERS[name]([{"params": [w0], "sparse": True, "nm_dim": 0}], **schedule)
    opt_b = OPTIMIZERS[name]([{"params": [w1], "sparse": True}], **schedule)
    _run(opt_a, w0, opt_b, w1, STEPS)  # gradual, t_i, evolve (LMA + OBF), frozen
    assert torch.equal(w0.detach().t(), w1.detach())
    assert torch.equal(opt_a.kept_mask(w0), opt_b.kept_mask(w1))
    assert is_nm_sparse(nm_layout(w0.detach(), 0), n, m)
    buffer = "momentum_buffer" if name.startswith("sgd") else "exp_avg"
    a, b = getattr(opt_a, buffer)(w0), getattr(opt_b, buffer)(w1)
    assert a.shape == w0.shape, "buffers read back in the weight's own layout"
    assert torch.equal(a.t(), b)
    row_a, row_b = opt_a.sparsity_report()[0], opt_b.sparsity_report()[0]
    assert row_a["nm_valid"] and row_a["nm_dim"] == 0 and row_b["nm_dim"] == 1
    assert row_a["blocks"] == row_b["blocks"] == IN * OUT // m
    assert opt_a.check_nm() == ["group0.param0"]


def test_resume_of_an_in_out_weight_is_bit_exact():
    w0, _ = _pair()
    groups = lambda w: [{"params": [w], "sparse": True, "nm_dim": 0}]  # noqa: E731
    opt = BAMEAdamW(groups(w0), lr=1e-2, total_steps=12, delta_t=1)
    twin = torch.nn.Parameter(w0.detach().clone())
    ref = BAMEAdamW(groups(twin), lr=1e-2, total_steps=12, delta_t=1)
    _run(opt, w0, ref, twin, 6)
    saved, weight = copy.deepcopy(opt.state_dict()), w0.detach().clone()
    assert saved["param_groups"][0]["nm_dim"] == 0
    resumed_w = torch.nn.Parameter(weight)
    resumed = BAMEAdamW(groups(resumed_w), lr=1e-2, total_steps=12, delta_t=1)
    resumed.load_state_dict(saved)
    _run(resumed, resumed_w, ref, twin, 6, start=6)
    assert torch.equal(resumed_w, twin)


def test_a_dense_torch_sgd_state_is_compacted_along_the_input_dimension():
    w0, w1 = _pair()
    dense_a, dense_b = torch.optim.SGD([w0], lr=0.1, momentum=0.9), torch.optim.SGD(
        [w1], lr=0.1, momentum=0.9)
    _run(dense_a, w0, dense_b, w1, 2)
    opt_a = BAMESGD([{"params": [w0], "sparse": True, "nm_dim": 0}], lr=0.1, momentum=0.9,
                    total_steps=12, delta_t=1)
    opt_b = BAMESGD([{"params": [w1], "sparse": True}], lr=0.1, momentum=0.9, total_steps=12,
                    delta_t=1)
    opt_a.load_state_dict(dense_a.state_dict())
    opt_b.load_state_dict(dense_b.state_dict())
    assert torch.equal(opt_a.momentum_buffer(w0), dense_a.state[w0]["momentum_buffer"])
    _run(opt_a, w0, opt_b, w1, 8)
    assert torch.equal(w0.detach().t(), w1.detach())


def test_sparse_none_reads_the_input_dimension_of_the_group():
    w = torch.nn.Parameter(torch.randn(16, 6))  # [in, out]: 16 divides by 4, 6 does not
    opt = BAMESGD([{"params": [w], "nm_dim": 0}], lr=0.1, total_steps=12)
    assert opt._is_sparse(w, opt.param_groups[0])
    opt = BAMESGD([{"params": [w]}], lr=0.1, total_steps=12)  # dim 1 (6) does not divide
    assert not opt._is_sparse(w, opt.param_groups[0])


def test_bad_nm_dim_values_are_named():
    w, conv = torch.nn.Parameter(torch.randn(8, 8)), torch.nn.Parameter(torch.randn(8, 8, 3, 3))
    with pytest.raises(ValueError, match="Invalid nm_dim value: 2"):
        BAMESGD([{"params": [w], "nm_dim": 2}], lr=0.1, total_steps=12)
    with pytest.raises(ValueError, match="Invalid nm_dim value: True"):
        BAMESGD([{"params": [w], "nm_dim": True}], lr=0.1, total_steps=12)
    with pytest.raises(ValueError, match=r"Invalid nm_dim value: 0 .*\(8, 8, 3, 3\)"):
        BAMESGD([{"params": [conv], "sparse": True, "nm_dim": 0}], lr=0.1, total_steps=12)


@pytest.mark.parametrize("method", ["srste", "lbc", "maxq", "bame_bidir"])
def test_peers_whose_masks_run_along_dim_1_refuse_an_in_out_group(method):
    w = torch.nn.Parameter(torch.randn(16, 8))
    with pytest.raises(ValueError, match=r"Invalid nm_dim value: 0 .*along dimension 1 only"):
        make_optimizer(method, [{"params": [w], "sparse": True, "nm_dim": 0}], lr=0.1,
                       total_steps=12)


def test_torch_state_dict_of_an_in_out_weight_is_in_the_weights_layout():
    w0, w1 = _pair()
    opt_a = BAMEAdamW([{"params": [w0], "sparse": True, "nm_dim": 0}], lr=1e-2, total_steps=12,
                      delta_t=1)
    opt_b = BAMEAdamW([{"params": [w1], "sparse": True}], lr=1e-2, total_steps=12, delta_t=1)
    _run(opt_a, w0, opt_b, w1, 7)
    state = opt_a.torch_state_dict()["state"][0]
    assert state["exp_avg"].shape == w0.shape
    assert torch.equal(state["exp_avg"].t(), opt_b.torch_state_dict()["state"][0]["exp_avg"])
    dense = torch.optim.AdamW([w0], lr=1e-2)
    dense.load_state_dict(opt_a.torch_state_dict())
    dense.step()  # torch steps from it
