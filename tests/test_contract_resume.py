"""The contract battery (test_contract.py), parts 1-2: bit-identical resume from a checkpoint
taken in every phase (read back with ``torch.load(weights_only=True)`` into an optimizer built
with other hyper-parameters) and under every SGD option; ``load_state_dict`` keeps every state
tensor's dtype (bfloat16 and float64 models)."""

from __future__ import annotations

import copy
import functools
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from bame_optim.core.evolution import score_dtype
from bame_optim.core.nm import is_nm_sparse
from bame_optim.methods import (
    METHODS,
)

from .contract import (
    ALL_METHODS,
    DELTA_T,
    DENSE_FACTORIES,
    RESUME_POINTS,
    SGD_METHODS,
    T_F,
    T_I,
    TOTAL_STEPS,
    assert_same_state,
    build_model,
    build_optimizer,
    momentum_of,
    other_hyper,
    sparse_params,
    train,
    train_step,
)
from .peer_setups import save_and_load

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread


# -- 1. bit-identical resume in every phase ----------------------------------------------------


@functools.cache
def uninterrupted_run(method: str) -> tuple[nn.Module, Any]:
    """The whole run of ``method``, once per module (read only)."""
    model = build_model()
    opt = build_optimizer(method, model)
    train(model, opt, 0, TOTAL_STEPS)
    return model, opt


@pytest.mark.parametrize("resume_at", RESUME_POINTS, ids=RESUME_POINTS.values())
@pytest.mark.parametrize("method", ALL_METHODS)
def test_resume_is_bit_identical(method, resume_at):
    model_a, opt_a = uninterrupted_run(method)

    model_b = build_model()
    opt_b = build_optimizer(method, model_b)
    train(model_b, opt_b, 0, resume_at)
    saved_model = copy.deepcopy(model_b.state_dict())
    saved_opt = copy.deepcopy(opt_b.state_dict())
    del model_b, opt_b

    model_c = build_model()
    with torch.no_grad():
        for p in model_c.parameters():
            p.add_(1.0)  # the model load, not the seed, must give the weights
    model_c.load_state_dict(saved_model)
    # A fresh optimizer with other hyper-parameters: everything but the schedule keywords it
    # is given (the same here; those win, test_safety.py) must come from the state dict, read
    # back as accelerate.utils.load does (torch.load with weights_only=True).
    opt_c = build_optimizer(method, model_c, attach=False, **other_hyper(method))
    opt_c.load_state_dict(save_and_load(saved_opt))
    if METHODS[method].attach is not None:
        METHODS[method].attach(model_c, opt_c)
    train(model_c, opt_c, resume_at, TOTAL_STEPS)

    for (name, p), q in zip(model_a.named_parameters(), model_c.parameters(), strict=True):
        assert torch.equal(p, q), name
        if hasattr(opt_a, "kept_mask"):
            mask_a, mask_c = opt_a.kept_mask(p), opt_c.kept_mask(q)
            assert (mask_a is None) == (mask_c is None), name
            if mask_a is not None:
                assert torch.equal(mask_a, mask_c), name
        buffer_a, buffer_c = momentum_of(opt_a, p), momentum_of(opt_c, q)
        assert (buffer_a is None) == (buffer_c is None), name
        if buffer_a is not None:
            assert torch.equal(buffer_a, buffer_c), name
    for group_a, group_c in zip(opt_a.param_groups, opt_c.param_groups, strict=True):
        assert group_a.get("step") == group_c.get("step")
    assert_same_state(opt_a, opt_c)


SGD_OPTIONS = {  # lr: maximize ascends the loss; the runs must stay finite to compare
    "nesterov_maximize": {"lr": 0.01, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01,
                          "maximize": True},
    "dampening": {"lr": 0.1, "momentum": 0.5, "dampening": 0.3, "weight_decay": 0.1},
    "plain": {"lr": 0.1, "momentum": 0.0},
}


@pytest.mark.parametrize("options", SGD_OPTIONS.values(), ids=SGD_OPTIONS)
@pytest.mark.parametrize("method", SGD_METHODS)
def test_resume_is_bit_identical_under_every_sgd_option(method, options):
    """The resume of the battery with SGD's other options (Nesterov, maximize, dampening, no
    momentum), from a checkpoint in the evolve phase."""
    model_a = build_model()
    opt_a = build_optimizer(method, model_a, **options)
    train(model_a, opt_a, 0, TOTAL_STEPS)
    model_b = build_model()
    opt_b = build_optimizer(method, model_b, **options)
    train(model_b, opt_b, 0, 12)
    opt_c = build_optimizer(method, model_b, attach=False, **other_hyper(method))
    opt_c.load_state_dict(save_and_load(opt_b.state_dict()))
    if METHODS[method].attach is not None:
        METHODS[method].attach(model_b, opt_c)
    train(model_b, opt_c, 12, TOTAL_STEPS)
    for p, q in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert p.isfinite().all()  # NaN would make the comparison vacuous
        assert torch.equal(p, q)
    assert_same_state(opt_a, opt_c)


def test_the_schedule_passes_through_every_phase():
    model = build_model()
    opt = build_optimizer("bame", model)
    group = opt.param_groups[0]
    assert (group["t_i"], group["t_f"], group["delta_t"]) == (T_I, T_F, DELTA_T)
    seen = []
    for t in range(TOTAL_STEPS):
        seen.append(opt.phase_name(group))
        train_step(model, opt, t)
    assert seen[2] == "gradual" and seen[T_I] == "prune"
    assert seen[10] == "evolve" and seen[T_F] == seen[-1] == "frozen"
    lbc = build_optimizer("lbc", build_model())
    assert lbc.param_groups[0]["t_f"] == T_F


# -- 2. load_state_dict keeps every state tensor's dtype ---------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("method", ALL_METHODS)
def test_load_state_dict_keeps_dtypes(method, dtype):
    model = build_model(dtype)
    opt = build_optimizer(method, model)
    train(model, opt, 0, 12)  # evolve phase: every kind of state exists (oscillation, scores)
    before = opt.state_dict()["state"]
    dtypes = {(i, k): v.dtype for i, s in before.items() for k, v in s.items()
              if isinstance(v, Tensor)}
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    after = opt.state_dict()["state"]
    assert {(i, k): v.dtype for i, s in after.items() for k, v in s.items()
            if isinstance(v, Tensor)} == dtypes
    for i, entries in before.items():
        for key, value in entries.items():
            if isinstance(value, Tensor):
                assert torch.equal(value, after[i][key]), (i, key)

    params = [p for group in opt.param_groups for p in group["params"]]
    for (i, key), found in dtypes.items():
        expected = {
            "momentum_buffer": dtype,
            "exp_avg": dtype,
            "exp_avg_sq": dtype,
            "step": torch.float32,  # torch.optim.AdamW's counter
            "dense_weight": dtype,
            "oscillation": score_dtype(dtype),
            "scores": score_dtype(dtype),
            "mask": torch.bool,
            "remaining": torch.bool,
            "backward_mask": torch.bool,
        }.get(key)
        if key == "kept":
            assert not found.is_floating_point, (i, key, found)
        else:
            assert found == expected, (i, key, found)
        assert params[i].dtype == dtype
    if METHODS[method].factory not in DENSE_FACTORIES:
        kinds = {k for _, k in dtypes}
        buffers = {"momentum_buffer"} if METHODS[method].optimizer == "sgd" else {"exp_avg"}
        assert buffers < kinds
    for key in ("momentum_buffer", "exp_avg", "dense_weight", "scores"):  # not a trivial state
        assert all(after[i][key].any() for i in after if key in after[i]), key
    train(model, opt, 12, 14)  # and it still trains
    for p, group in sparse_params(opt):
        assert is_nm_sparse(p.detach(), group["n"], group["m"])
