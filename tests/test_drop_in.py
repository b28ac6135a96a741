"""The one-line swap from torch.optim.SGD never fails silently: each test is a mistake a user
makes (or a behaviour of SGD they rely on) and the outcome they must get."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from bame_optim import BAMESGD, nm_param_groups
from bame_optim.core.nm import is_nm_sparse, param_to_blocks
from bame_optim.methods import make_optimizer


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, 4))


def _train(model: nn.Module, opt, steps: int, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(16, 8, generator=gen), torch.randint(0, 4, (16,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


# -- 1. conformance with torch.optim.SGD ------------------------------------------------------


def test_tensor_lr_is_accepted_and_equals_a_float_lr():
    a, b = _model(), _model()
    opt_a = BAMESGD(a.parameters(), lr=torch.tensor(0.1), momentum=0.9, total_steps=30,
                    delta_t=2)
    opt_b = BAMESGD(b.parameters(), lr=0.1, momentum=0.9, total_steps=30, delta_t=2)
    _train(a, opt_a, 25)
    _train(b, opt_b, 25)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="Invalid lr value: a Tensor lr must be one"):
        BAMESGD(a.parameters(), lr=torch.tensor([0.1, 0.2]), total_steps=10)


@pytest.mark.parametrize("groups", ["sparse_false", "nothing_sparse"])
def test_total_steps_is_not_needed_without_sparse_parameters(groups):
    model = nn.Sequential(nn.Linear(6, 3))  # 6 % 4 != 0: nothing is N:M-divisible
    if groups == "sparse_false":
        opt = BAMESGD(_model().parameters(), lr=0.1, sparse=False)
    else:
        opt = BAMESGD(model.parameters(), lr=0.1)
    assert opt.param_groups[0]["t_i"] == 0


def test_sparse_parameters_still_need_total_steps():
    with pytest.raises(ValueError, match="Invalid total_steps value: None"):
        BAMESGD(_model().parameters(), lr=0.1)


def test_load_state_dict_fills_missing_group_keys_as_sgd_does():
    model = _model()
    opt = BAMESGD(model.parameters(), lr=0.1, momentum=0.9, total_steps=20, delta_t=2)
    _train(model, opt, 3)
    saved = copy.deepcopy(opt.state_dict())
    for group in saved["param_groups"]:
        for key in ("foreach", "maximize", "delta_t", "alpha", "fused"):
            del group[key]
    fresh = BAMESGD(model.parameters(), lr=0.1, momentum=0.9, total_steps=20, delta_t=2)
    fresh.load_state_dict(saved)
    _train(model, fresh, 2)  # used to raise KeyError
    assert fresh.param_groups[0]["delta_t"] == 2 and fresh.param_groups[0]["step"] == 5


def test_momentum_zero_keeps_no_state_for_dense_parameters():
    model = _model()
    opt = BAMESGD(model.parameters(), lr=0.1, sparse=False)
    ref = torch.optim.SGD(_model().parameters(), lr=0.1)
    _train(model, opt, 2)
    _train(_model(), ref, 2)
    assert opt.state_dict()["state"] == ref.state_dict()["state"] == {}


def test_params_none_is_a_clear_type_error():
    with pytest.raises(TypeError, match=r"Invalid params value: None .*model\.parameters"):
        BAMESGD(None, lr=0.1, total_steps=10)


# -- 2. migration from a dense checkpoint -----------------------------------------------------


def test_start_from_a_torch_sgd_checkpoint():
    """Dense parameters keep SGD's momentum; sparse ones start BAME's schedule at step 0 with
    every weight kept and their momentum compacted."""
    model = _model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _train(model, sgd, 3)
    saved = copy.deepcopy(sgd.state_dict())
    dense_momentum = {id(p): sgd.state[p]["momentum_buffer"].clone() for p in model.parameters()}
    opt = BAMESGD(model.parameters(), lr=0.1, momentum=0.9, n=2, m=4, total_steps=40,
                  delta_t=4)
    opt.load_state_dict(saved)
    assert all(g["step"] == 0 for g in opt.param_groups)
    weight, bias = model[2].weight, model[2].bias
    assert torch.equal(opt.momentum_buffer(weight), dense_momentum[id(weight)])
    assert torch.equal(opt.state[bias]["momentum_buffer"], dense_momentum[id(bias)])
    assert opt.kept_mask(weight).all()
    assert opt.state[weight]["momentum_buffer"].shape == (16 * 16 // 4, 4)
    _train(model, opt, 40)
    assert is_nm_sparse(weight.detach(), 2, 4)


# -- 3. silent loss of N:M --------------------------------------------------------------------


def test_weights_loaded_behind_the_optimizer_are_re_zeroed_on_the_next_aligned_step():
    model = _model()
    opt = BAMESGD(model.parameters(), lr=0.1, momentum=0.9, total_steps=12, delta_t=4)
    _train(model, opt, 12)  # frozen phase from t_f = 8
    dense = _model(seed=5).state_dict()
    model.load_state_dict(dense)  # e.g. a framework restoring dense weights
    assert not is_nm_sparse(model[2].weight.detach(), 2, 4)
    _train(model, opt, 1)  # t = 12: a multiple of delta_t, in the frozen phase
    assert is_nm_sparse(model[2].weight.detach(), 2, 4)
    mask = opt.kept_mask(model[2].weight)
    assert (param_to_blocks(model[2].weight.detach(), 4)[~mask] == 0).all()


def test_first_step_after_load_state_dict_re_applies_the_masks():
    """A resume that restores the optimizer but writes the layers afterwards (as Hugging Face
    Trainer was seen to do) is re-zeroed at once, whatever the step."""
    model = _model()
    opt = BAMESGD(model.parameters(), lr=0.1, momentum=0.9, total_steps=12, delta_t=4)
    _train(model, opt, 9)
    state = copy.deepcopy(opt.state_dict())
    resumed = _model(seed=7)  # dense weights
    opt2 = BAMESGD(resumed.parameters(), lr=0.1, momentum=0.9, total_steps=12, delta_t=4)
    opt2.load_state_dict(state)
    _train(resumed, opt2, 1)  # t = 9: not aligned
    assert is_nm_sparse(resumed[2].weight.detach(), 2, 4)


def test_finalize_masks_prunes_to_n_now_and_fixes_the_masks():
    model = _model()
    opt = BAMESGD(model.parameters(), lr=0.1, momentum=0.9, total_steps=300, delta_t=2)
    _train(model, opt, 10)  # a short run: still in the gradual phase
    assert not is_nm_sparse(model[2].weight.detach(), 2, 4)
    opt.finalize_masks()
    weight = model[2].weight
    assert is_nm_sparse(weight.detach(), 2, 4) and (opt.kept_mask(weight).sum(1) == 2).all()
    mask = opt.kept_mask(weight).clone()
    _train(model, opt, 12)
    assert torch.equal(opt.kept_mask(weight), mask)
    assert opt.sparsity_report()[2]["phase"] == "frozen"


def test_finalize_masks_at_step_zero_is_not_replaced_by_the_random_start():
    model = _model()
    opt = BAMESGD(model.parameters(), lr=0.1, total_steps=30, t_i=0, t_f=0)
    opt.finalize_masks()
    mask = opt.kept_mask(model[2].weight).clone()
    _train(model, opt, 3)
    assert torch.equal(opt.kept_mask(model[2].weight), mask)


def test_stepping_past_total_steps_before_n_m_warns():
    model = _model()
    opt = BAMESGD(model.parameters(), lr=0.1, total_steps=6, t_i=5, t_f=6, delta_t=100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing before total_steps
        _train(model, opt, 0)
    opt.param_groups[0]["t_i"] = opt.param_groups[0]["t_f"] = 50  # a schedule too long
    with pytest.warns(UserWarning, match="ran past total_steps=6 .*not N:M.*finalize_masks"):
        _train(model, opt, 8)


def test_no_warning_past_total_steps_once_n_m():
    model = _model()
    opt = BAMESGD(model.parameters(), lr=0.1, total_steps=6, delta_t=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train(model, opt, 9)


# -- 4. schedules that silently skip BAME -----------------------------------------------------


def test_a_schedule_with_almost_no_evolve_updates_warns_with_its_numbers():
    with pytest.warns(UserWarning, match=r"t_i=100 .. t_f=200 holds 0 mask update.*delta_t=100"
                      r".*choose delta_t <= 25 for this run"):
        BAMESGD(_model().parameters(), lr=0.1, total_steps=300)
    # a window too short for any delta_t: the advice is a longer run, not a smaller delta_t
    with pytest.warns(UserWarning, match=r"holds 2 mask update.*delta_t=1 .*too short for 3 "
                      r"updates at any delta_t: train for more steps"):
        BAMESGD(_model().parameters(), lr=0.1, total_steps=9, delta_t=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        groups = nm_param_groups(_model(), 2, 4, exclude=())  # no shape-only guess to warn of
        BAMESGD(groups, lr=0.1, total_steps=300, delta_t=10)
        BAMESGD(groups, lr=0.1, total_steps=300, t_i=0, t_f=0)  # static
        BAMESGD(_model().parameters(), lr=0.1, sparse=False)  # nothing to evolve


def test_schedule_summary_counts_the_updates():
    opt = BAMESGD(_model().parameters(), lr=0.1, total_steps=300, delta_t=10)
    summary = opt.schedule_summary()
    assert "\n" not in summary
    assert "2:4: gradual to t_i=100 (10 mask updates), evolve to t_f=200 (9 updates" in summary
    dense = BAMESGD(_model().parameters(), lr=0.1, sparse=False)
    assert dense.schedule_summary() == "BAMESGD: no sparse parameters"


# -- 6. unclear crashes -----------------------------------------------------------------------


@pytest.mark.parametrize(("n", "m"), [(1, 72), (4, 72), (2, 128)])
def test_large_m_trains(n, m):
    layer = nn.Linear(2 * m, 3)
    opt = BAMESGD(layer.parameters(), lr=0.1, momentum=0.9, n=n, m=m, total_steps=8, delta_t=1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(8):
        opt.zero_grad()
        layer(torch.randn(4, 2 * m, generator=gen)).square().sum().backward()
        opt.step()
    assert is_nm_sparse(layer.weight.detach(), n, m)
    assert (opt.kept_mask(layer.weight).sum(1) == n).all()


def test_sparse_layout_gradient_names_the_parameter():
    model = nn.Sequential(nn.Embedding(10, 8, sparse=True), nn.Linear(8, 4))
    opt = BAMESGD(model.parameters(), lr=0.1, total_steps=10)
    model(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match=r"sparse parameter 0 \(shape \(10, 8\)\).*sparse=False"):
        opt.step()


def test_an_embedding_with_sparse_gradients_trains_in_a_dense_group():
    model = nn.Sequential(nn.Embedding(10, 8, sparse=True), nn.Linear(8, 4))
    groups = [{"params": model[0].parameters(), "sparse": False},
              {"params": model[1].parameters()}]
    opt = BAMESGD(groups, lr=0.1, momentum=0.9, total_steps=10, delta_t=1)
    ref = torch.optim.SGD(copy.deepcopy(model[0]).parameters(), lr=0.1, momentum=0.9)
    ref_param = ref.param_groups[0]["params"][0]
    for _ in range(3):
        opt.zero_grad()
        ref.zero_grad()
        model(torch.tensor([1, 2])).sum().backward()
        ref_param.grad = model[0].weight.grad.clone()
        opt.step()
        ref.step()
    assert torch.equal(model[0].weight, ref_param)


def test_loading_another_pattern_warns_and_changing_it_back_is_a_clear_error():
    model = _model()
    opt = BAMESGD(model.parameters(), lr=0.1, n=1, m=8, total_steps=20, delta_t=2)
    _train(model, opt, 3)
    saved = copy.deepcopy(opt.state_dict())
    other = BAMESGD(model.parameters(), lr=0.1, n=2, m=4, total_steps=20, delta_t=2)
    with pytest.warns(UserWarning, match="saved at 1:8 and now trains at that pattern instead "
                                         "of 2:4"):
        other.load_state_dict(saved)
    other.param_groups[0]["n"], other.param_groups[0]["m"] = 2, 4
    with pytest.raises(ValueError, match=r"Invalid state for parameter 0 .*another N:M pattern"):
        _train(model, other, 1)


def test_make_optimizer_refuses_a_setting_the_method_cannot_honour():
    with pytest.raises(ValueError, match=r"Invalid keywords for method 'srste': \['alpha'\]"):
        make_optimizer("srste", nm_param_groups(_model(), 2, 4), lr=0.1, alpha=0.3)
