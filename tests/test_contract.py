"""One contract battery over every method of the registry (:data:`bame_optim.methods.METHODS`),
all on the shared run of ``tests/contract.py``:

1. bit-identical resume in every phase and under every SGD option, and 2. ``load_state_dict``
   keeps every state tensor's dtype: test_contract_resume.py;
3. dense parameters follow :class:`torch.optim.SGD` / :class:`torch.optim.AdamW` bit for bit:
   test_contract_dense.py;
4. argument errors name the argument and value: test_contract_errors.py;
5. the N:M guarantee after every step and at the end of training, and 6. registry consistency
   (FLOPs profiles, scheduled masks, attachments): here.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.nn import functional as F

from bame_optim.core.nm import is_nm_sparse, param_to_blocks
from bame_optim.flops import FlopsProfile, layer_flops, step_density_sums, training_flops_ratio
from bame_optim.methods import (
    ADAMW_KEYWORDS,
    METHODS,
    SGD_KEYWORDS,
    accepted_keywords,
)
from bame_optim.peers.bidir import BidirBAMESGD

from .contract import (
    ALL_METHODS,
    DELTA_T,
    INPUT_SHAPE,
    SPARSE_METHODS,
    T_F,
    T_I,
    TOTAL_STEPS,
    M,
    N,
    batch,
    build_model,
    build_optimizer,
    sparse_params,
    train,
    train_step,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread


# -- 5. the N:M guarantee ---------------------------------------------------------------------


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4)], ids=["2:4", "1:4"])
@pytest.mark.parametrize("method", SPARSE_METHODS)
def test_every_sparse_weight_ends_n_m(method, n, m):
    model = build_model()
    opt = build_optimizer(method, model, n=n, m=m)
    assert len(sparse_params(opt)) == 3
    for t in range(TOTAL_STEPS):
        train_step(model, opt, t)
        for p, group in sparse_params(opt):
            kept = opt.kept_mask(p)
            assert kept is not None and kept.dtype == torch.bool
            pruned = param_to_blocks(p.detach(), group["m"])[~kept]
            assert torch.equal(pruned, torch.zeros_like(pruned)), (t, tuple(p.shape))
    for p, group in sparse_params(opt):
        assert (group["n"], group["m"]) == (n, m)
        assert torch.isfinite(p).all()
        assert is_nm_sparse(p.detach(), n, m)
        assert (opt.kept_mask(p).sum(dim=1) == n).all()
    assert all(row["nm_valid"] for row in opt.sparsity_report() if row["sparse"])


@pytest.mark.parametrize("method", SPARSE_METHODS)
def test_channels_last_weights_stay_n_m_and_channels_last(method):
    """A model in the channels-last memory format (whose convolution blocks the fused CPU
    kernels read as rows): every step keeps the pruned entries at exactly 0 and the weights
    in their layout."""
    model = build_model().to(memory_format=torch.channels_last)
    conv = model[0].weight
    assert not conv.is_contiguous() and conv.is_contiguous(memory_format=torch.channels_last)
    opt = build_optimizer(method, model)
    for t in range(TOTAL_STEPS):
        train_step(model, opt, t)
        assert conv.is_contiguous(memory_format=torch.channels_last), t
        for p, group in sparse_params(opt):
            pruned = param_to_blocks(p.detach(), group["m"])[~opt.kept_mask(p)]
            assert torch.equal(pruned, torch.zeros_like(pruned)), (t, tuple(p.shape))
    assert all(is_nm_sparse(p.detach(), N, M) for p, _ in sparse_params(opt))


# -- 6. registry consistency ------------------------------------------------------------------


@pytest.mark.parametrize("method", ALL_METHODS)
def test_flops_profile_works_on_the_model(method):
    record = METHODS[method]
    assert record.name == method and isinstance(record.flops, FlopsProfile)
    family = SGD_KEYWORDS if record.optimizer == "sgd" else ADAMW_KEYWORDS
    assert accepted_keywords(method) >= family
    fixed = {k: v for k, v in record.fixed.items() if k in ("t_i", "t_f")}
    schedule = {"t_i": T_I, "t_f": T_F} | fixed
    ratio = training_flops_ratio(
        build_model(), INPUT_SHAPE, method, n=N, m=M, total_steps=TOTAL_STEPS, delta_t=DELTA_T,
        exclude=(), **schedule,
    )
    assert math.isfinite(ratio) and ratio > 0
    if record.flops is FlopsProfile.DENSE:
        assert ratio == 1.0
    elif record.flops is not FlopsProfile.PRETRAIN_FIXED:
        assert ratio < 1.0
    # a method whose masks may change at every step has a per-step profile, and back
    per_step = (FlopsProfile.STE, FlopsProfile.LBC, FlopsProfile.MAXQ)
    assert record.scheduled_masks == (record.flops not in per_step)


@pytest.mark.parametrize(
    "method",
    [name for name, r in METHODS.items()
     if r.flops in (FlopsProfile.SCHEDULED, FlopsProfile.SCHEDULED_BIDIR)],
)
def test_scheduled_flops_count_the_mask_in_force(method):
    """The forward density the FLOPs profile sums is the density of the mask in force."""
    model = build_model()
    opt = build_optimizer(method, model)
    p = sparse_params(opt)[0][0]
    measured = 0
    for t in range(TOTAL_STEPS):
        kept = opt.kept_mask(p)
        measured += 1 if kept is None else kept.float().mean().item()
        train_step(model, opt, t)
    forward, _, _ = step_density_sums(
        method, n=N, m=M, total_steps=TOTAL_STEPS, t_i=T_I, t_f=T_F, delta_t=DELTA_T
    )
    assert measured == pytest.approx(float(forward), abs=1e-9)
    layers = layer_flops(model, INPUT_SHAPE, n=N, m=M, exclude=())
    assert all(layer.sparse for layer in layers)


@pytest.mark.parametrize("method", SPARSE_METHODS)
def test_masks_change_only_when_due(method):
    record = METHODS[method]
    model = build_model()
    opt = build_optimizer(method, model)
    changes, due = [], []
    for t in range(TOTAL_STEPS):
        before = []
        for p, group in sparse_params(opt):
            assert group["step"] == t
            kept = opt.kept_mask(p)
            before.append(torch.ones_like(param_to_blocks(p, group["m"]), dtype=torch.bool)
                          if kept is None else kept)
        train_step(model, opt, t)
        for (p, group), old in zip(sparse_params(opt), before, strict=True):
            due.append(opt.mask_update_due(group, t))
            if not torch.equal(opt.kept_mask(p), old):
                changes.append(t)
                assert opt.mask_update_due(group, t), (t, tuple(p.shape))
                last = opt.last_mask_update(group)
                assert last is None or t <= last
    assert changes
    if record.scheduled_masks:
        assert not all(due)
        assert all(opt.last_mask_update(g) is not None for _, g in sparse_params(opt))


def test_attach_is_given_exactly_to_the_bidirectional_method():
    for record in METHODS.values():
        factory = record.factory
        bidir = isinstance(factory, type) and issubclass(factory, BidirBAMESGD)
        assert (record.attach is not None) == bidir, record.name
    with pytest.raises(ValueError, match="Invalid optimizer value: BAMESGD"):
        METHODS["bame_bidir"].attach(build_model(), build_optimizer("bame", build_model()))


@pytest.mark.parametrize("method", [name for name, r in METHODS.items() if r.attach is not None])
def test_attach_is_used_and_its_absence_breaks_nothing(method):
    plain = build_model()
    opt = build_optimizer(method, plain, attach=False)
    train(plain, opt, 0, TOTAL_STEPS)
    for p, group in sparse_params(opt):
        assert torch.isfinite(p).all() and is_nm_sparse(p.detach(), group["n"], group["m"])
        assert "backward_mask" in opt.state[p]

    # with the same weights and masks, attaching changes the input gradient of the sparse layers
    attached = copy.deepcopy(plain)
    opt_attached = build_optimizer(method, attached, attach=False)
    opt_attached.load_state_dict(opt.state_dict())
    handles = METHODS[method].attach(attached, opt_attached)
    assert len(handles) == 3
    x, y = batch(TOTAL_STEPS)
    for net in (plain, attached):
        net.zero_grad()
        F.cross_entropy(net(x), y).backward()
    assert torch.equal(plain[5].weight.grad, attached[5].weight.grad)  # dW is unchanged
    assert not torch.equal(plain[0].weight.grad, attached[0].weight.grad)  # dX upstream is not
