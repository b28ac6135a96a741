"""The silent cases of the second red-team round (issue 16): each test fails on the code before
the fix it names.

* S1: a weight revived at an evolve update after an outside write restarts from 0;
* S2: :class:`MaskSync` also checks in the frozen phase and at its first step;
* S3: a setting the method's schedule never reads is refused (``static`` with ``alpha``);
* S4: schedule keywords passed to the new optimizer win over a loaded checkpoint's;
* S5: a run that ends long before ``total_steps`` says so (``check_finished``).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from bame_optim import BAMESGD, BAMEAdamW

OPTIMIZERS = {
    "sgd": lambda params, **kw: BAMESGD(params, lr=0.1, momentum=0.9, **kw),
    "adamw": lambda params, **kw: BAMEAdamW(params, lr=0.01, **kw),
}


def _param(seed: int = 0) -> nn.Parameter:
    torch.manual_seed(seed)
    return nn.Parameter(torch.randn(8, 16))


def _run(opt: torch.optim.Optimizer, p: nn.Parameter, steps: int, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        p.grad = torch.randn(p.shape, generator=generator)
        opt.step()


# -- S1 ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_s1_weight_revived_after_an_outside_write_restarts_from_zero(kind):
    # total 30, delta_t 2: t_i 10, t_f 20; step 12 is an evolve update step.
    p = _param()
    opt = OPTIMIZERS[kind]([p], n=1, m=4, total_steps=30, delta_t=2, alpha=0.0)
    _run(opt, p, 12)
    assert opt.param_groups[0]["step"] == 12
    p_ref = nn.Parameter(p.detach().clone())
    opt_ref = OPTIMIZERS[kind]([p_ref], n=1, m=4, total_steps=30, delta_t=2, alpha=0.0)
    opt_ref.load_state_dict(copy.deepcopy(opt.state_dict()))
    before = opt.kept_mask(p).clone()

    written = torch.randn(p.shape, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        p.copy_(written)  # e.g. model.load_state_dict of dense weights
        p_ref.copy_(written * before.reshape(p.shape))  # the same write, pruned entries at 0
    grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(8)) * 10
    p.grad, p_ref.grad = grad.clone(), grad.clone()
    opt.step()
    opt_ref.step()

    after = opt.kept_mask(p)
    revived = after & ~before
    assert revived.any(), "the test needs a revived weight"
    assert torch.equal(after, opt_ref.kept_mask(p_ref))
    assert torch.equal(p, p_ref)
    # A revived weight took one step from 0: nowhere near the written value.
    assert not torch.isclose(p.detach().reshape(-1, 4)[revived],
                             written.reshape(-1, 4)[revived]).any()


# -- S4 ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_s4_given_schedule_wins_over_the_checkpoint_with_a_warning(kind):
    p = _param()
    old = OPTIMIZERS[kind]([p], n=1, m=4, total_steps=40, delta_t=2)
    _run(old, p, 5)
    saved = copy.deepcopy(old.state_dict())
    with pytest.warns(UserWarning, match="evolve window"):  # delta_t=100 at 400 steps
        new = OPTIMIZERS[kind]([p], n=1, m=4, total_steps=400)
    with pytest.warns(UserWarning, match=r"total_steps=400 \(the checkpoint's: 40\)") as record:
        new.load_state_dict(saved)
    message = str(record[0].message)
    assert "t_i=133 (the checkpoint's: 13)" in message
    assert "t_f=266 (the checkpoint's: 26)" in message
    assert record[0].filename == __file__  # points at the user's line
    group = new.param_groups[0]
    assert (group["total_steps"], group["t_i"], group["t_f"]) == (400, 133, 266)
    assert group["delta_t"] == 2  # not given: the checkpoint's
    assert group["step"] == 5
    _run(new, p, 3)  # and it trains on


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_s4_same_schedule_loads_silently(kind):
    p = _param()
    old = OPTIMIZERS[kind]([p], n=1, m=4, total_steps=40, delta_t=2)
    _run(old, p, 5)
    new = OPTIMIZERS[kind]([p], n=1, m=4, total_steps=40, delta_t=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new.load_state_dict(copy.deepcopy(old.state_dict()))
    assert new.param_groups[0]["t_i"] == 13


def test_s4_fused_is_the_new_optimizers():
    p = _param()
    old = BAMESGD([p], lr=0.1, n=1, m=4, total_steps=40, delta_t=2, fused=False)
    _run(old, p, 2)
    saved = copy.deepcopy(old.state_dict())
    saved["param_groups"][0]["fused"] = True  # saved on a machine with the kernel
    new = BAMESGD([p], lr=0.1, n=1, m=4, total_steps=40, delta_t=2)
    new.load_state_dict(saved)
    assert new.param_groups[0]["fused"] is None  # auto: the kernel where this machine has it
    _run(new, p, 2)


# -- S5 ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_s5_run_ending_in_the_gradual_phase_says_so(kind):
    # total_steps = epochs * len(loader) under accumulation 4: only a quarter of it runs.
    p = _param()
    opt = OPTIMIZERS[kind]([p], n=1, m=4, total_steps=40, delta_t=2)
    _run(opt, p, 10)
    with pytest.warns(UserWarning, match=r"training ended at step 10, before t_i=13 "
                      r"\(total_steps=40\).* keeps up to 3 of 4 .* not 1:4") as record:
        assert opt.check_finished() is False
    assert record[0].filename == __file__
    opt.finalize_masks()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert opt.check_finished() is True


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_s5_training_script_warns_when_it_ends_before_t_i(
    tmp_path, monkeypatch, load_example, write_cifar_folder
):
    from bame_apps.integrations.training import loop

    counted = loop.optimizer_steps
    # A loop whose total_steps is 4 times the steps it runs (counted in batches under an
    # accumulation of 4).
    monkeypatch.setattr(loop, "optimizer_steps", lambda *args: 4 * counted(*args))
    write_cifar_folder(tmp_path / "cifar", per_batch=8)
    argv = ["--data", str(tmp_path / "cifar"), "--model", "small_cnn", "--batch-size", "8",
            "--delta-t", "1", "--workers", "0", "--no-progress", "--epochs", "1",
            "--output-dir", str(tmp_path / "out")]
    with pytest.warns(UserWarning, match="training ended at step 5, before t_i=6"):
        load_example("train_cifar").main(argv)


# -- S2 ----------------------------------------------------------------------------------------


def test_s2_mask_sync_checks_after_the_last_mask_update(monkeypatch):
    from bame_apps.integrations import accelerate as integration

    p = _param()
    opt = BAMESGD([p], lr=0.1, n=1, m=4, t_i=4, t_f=8, delta_t=2)
    checked = []
    monkeypatch.setattr(integration, "verify_masks",
                        lambda o, acc, fix: checked.append(o.param_groups[0]["step"] - 1) or True)
    _run(opt, p, 10)  # the last mask update ran at t = 6
    # A rank resumed in the frozen phase (from another checkpoint, say) builds its MaskSync.
    sync = integration.MaskSync(opt)
    generator = torch.Generator().manual_seed(3)
    for _ in range(6):  # t = 10 .. 15
        p.grad = torch.randn(p.shape, generator=generator)
        opt.step()
        sync.after_step()
    assert checked == [10, 12, 14]  # the first step it sees, then every delta_t


# -- S3 ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "keyword", "value"), [
    ("static", "alpha", 0.3), ("static", "beta", 0.1), ("static", "gamma", 0.5),
    ("static_adamw", "alpha", 0.3), ("static_adamw", "revive_score", "sgd"),
])
def test_s3_static_refuses_the_evolve_keywords(method, keyword, value):
    from bame_optim import nm_param_groups
    from bame_optim.methods import make_optimizer

    groups = nm_param_groups(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)),
                             1, 4, exclude=())
    with pytest.raises(ValueError, match=rf"Invalid {keyword} value: {value!r} \({method} fixes "
                       r"t_i = t_f, so it has no evolve phase"):
        make_optimizer(method, groups, lr=0.1, total_steps=30, **{keyword: value})
    make_optimizer(method, groups, lr=0.1, total_steps=30, alpha=0.5)  # the default: no harm


def test_s3_command_line_refuses_static_with_alpha(capsys, load_example):
    with pytest.raises(SystemExit):
        load_example("train_cifar").main(["--data", "d", "--method", "static", "--alpha", "0.3"])
    assert "argument --alpha: invalid value 0.3 (method static has no evolve phase" in (
        capsys.readouterr().err)


# -- conformance with torch.optim ---------------------------------------------------------------


@pytest.mark.parametrize(("ours", "theirs"), [(BAMESGD, torch.optim.SGD),
                                              (BAMEAdamW, torch.optim.AdamW)])
def test_lr_is_checked_before_params_as_torch_does(ours, theirs):
    lr = torch.tensor([0.1, 0.2])
    with pytest.raises(ValueError):
        theirs(None, lr=lr)
    with pytest.raises(ValueError, match="Invalid lr value: a Tensor lr must be one floating"):
        ours(None, lr=lr, total_steps=10)
    with pytest.raises(TypeError, match="Invalid params value: None"):
        ours(None, lr=0.1, total_steps=10)


def test_adamw_loads_an_old_checkpoint_with_a_python_number_step():
    p, q = _param(), _param()
    opt = BAMEAdamW([p], lr=0.01, n=1, m=4, total_steps=40, delta_t=2)
    _run(opt, p, 3)
    saved = copy.deepcopy(opt.state_dict())
    for state in saved["state"].values():
        state["step"] = float(state["step"])  # as torch wrote it before 1.12
    with torch.no_grad():
        q.copy_(p)
    other = BAMEAdamW([q], lr=0.01, n=1, m=4, total_steps=40, delta_t=2)
    other.load_state_dict(saved)
    assert torch.is_tensor(other.state[q]["step"])
    _run(opt, p, 3, seed=5)
    _run(other, q, 3, seed=5)
    assert torch.equal(p, q)


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_s4_a_later_t_i_does_not_bring_pruned_weights_back(kind):
    p = _param()
    old = OPTIMIZERS[kind]([p], n=1, m=4, total_steps=30, delta_t=2)
    _run(old, p, 14)  # past t_i = 10: one weight kept per block
    saved = copy.deepcopy(old.state_dict())
    new = OPTIMIZERS[kind]([p], n=1, m=4, total_steps=300, delta_t=2)  # t_i = 100
    with pytest.warns(UserWarning, match="total_steps=300"):
        new.load_state_dict(saved)
    _run(new, p, 4)
    assert new.state[p]["kept_count"] == 1
    assert (new.kept_mask(p).sum(dim=1) == 1).all()
