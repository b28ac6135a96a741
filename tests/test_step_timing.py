"""The step benchmark's timing loops (benchmarks.step_timing): its configurations really are
ordinary / update steps for both rules, and the medians come back under their names."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmarks import harness, step_timing


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 4))


def _masks(optimizer, model):
    return {name: optimizer.kept_mask(p) for name, p in model.named_parameters()}


def _start(kind, pattern=(2, 4), method="bame", rule="sgd"):
    model = _mlp()
    grads = [torch.randn_like(p) for p in model.parameters()]
    harness.assign_grads(model, grads)
    optimizer, start = step_timing.make_bame(model, *pattern, kind, method, rule)
    for _ in range(start):
        optimizer.step()
    return model, optimizer


@pytest.mark.parametrize("rule", ["sgd", "adamw"])
@pytest.mark.parametrize("pattern", [(2, 4), (1, 16)])
def test_ordinary_configuration_never_updates_a_mask(pattern, rule):
    model, optimizer = _start("ordinary", pattern, step_timing.BAME_METHOD[rule], rule)
    before = _masks(optimizer, model)
    sparse = [name for name, mask in before.items() if mask is not None]
    assert sparse == ["1.weight", "2.weight"]  # nm_param_groups: stem and classifier dense
    for _ in range(5):
        assert step_timing.update_flags(optimizer) == [False]
        optimizer.step()
    after = _masks(optimizer, model)
    for name in sparse:
        assert torch.equal(before[name], after[name]), name


@pytest.mark.parametrize("rule", ["sgd", "adamw"])
@pytest.mark.parametrize("pattern", [(2, 4), (1, 16)])
def test_update_configuration_updates_masks_every_step(pattern, rule):
    model, optimizer = _start("update", pattern, step_timing.BAME_METHOD[rule], rule)
    changed = 0
    for _ in range(3):
        assert step_timing.update_flags(optimizer) == [True]
        before = _masks(optimizer, model)
        optimizer.step()
        after = _masks(optimizer, model)
        changed += sum(
            int((before[name] != after[name]).sum()) for name in after if after[name] is not None
        )
    assert changed > 0
    assert optimizer.param_groups[0]["step"] == 4


@pytest.mark.parametrize("pattern", [(2, 4), (1, 16)])
def test_gradual_configuration_updates_every_step_at_a_steady_budget(pattern):
    """Late in the gradual phase: every step is a gradual update, each block keeps n + 1
    (pruned to it by the first step), and the masks no longer change."""
    n = pattern[0]
    model, optimizer = _start("gradual", pattern)
    group = optimizer.param_groups[0]
    assert group["step"] == harness.FAR - harness.GRADUAL_LEAD + 1 < group["t_i"]
    before = _masks(optimizer, model)
    for _ in range(3):
        assert step_timing.update_flags(optimizer) == [True]
        optimizer.step()
    after = _masks(optimizer, model)
    for name, mask in after.items():
        if mask is not None:
            assert mask.sum(dim=1).tolist() == [n + 1] * mask.shape[0]
            assert torch.equal(mask, before[name]), name


def test_each_rule_gets_its_hyper_parameters_and_fused_steps():
    sgd, _ = step_timing.make_bame(_mlp(), 2, 4, "ordinary")
    adamw, _ = step_timing.make_bame(_mlp(), 2, 4, "ordinary", "bame_adamw", "adamw")
    assert sgd.defaults["lr"] == 0.1 and sgd.defaults["momentum"] == 0.9
    assert adamw.defaults["lr"] == 1e-3 and adamw.defaults["weight_decay"] == 0.05
    assert sgd.defaults["fused"] is True and adamw.defaults["fused"] is True
    torch_fused = step_timing.make_torch(_mlp(), "adamw", fused=True)
    assert isinstance(torch_fused, torch.optim.AdamW) and torch_fused.defaults["fused"] is True
    assert step_timing.make_torch(_mlp(), "sgd", fused=False).defaults["foreach"] is True
    assert step_timing.update_flags(torch_fused) == []


def test_unknown_configuration():
    with pytest.raises(ValueError, match="Invalid kind value: 'frozen'"):
        step_timing.make_bame(_mlp(), 2, 4, "frozen")


def test_adamw_timing_names_every_median(monkeypatch):
    seen = []

    def fake(calls, steps, warmup, timer, before=None, bar=None):
        seen.append((list(calls), steps, warmup))
        for name in calls:  # the hook reassigns the gradients, then each step runs once
            before(name)
            calls[name]()
        # rounds of 1, 2, 3 ms per call, times the call's place
        return {name: [float(i + 1) * r for r in (1, 2, 3)] for i, name in enumerate(calls)}

    monkeypatch.setattr(step_timing, "interleaved_rounds", fake)
    times = step_timing.time_adamw_steps("small_cnn", (2, 4), torch.device("cpu"), 7, 2)
    assert seen == [(["adamw", "adamw_fused", "ordinary", "update"], 7, 2)]
    assert {k: times[k] for k in seen[0][0]} == {"adamw": 2.0, "adamw_fused": 4.0,
                                                 "ordinary": 6.0, "update": 8.0}
    assert times["fused_quartiles"] == (1.5, 1.5)  # ordinary / fused is 3 / 2 in every round
    assert times["bytes_dense"] > times["bytes_sparse"] > 0 and times["params"] > 0


def _channels_last(model: nn.Module) -> bool:
    convs = [p for p in model.parameters() if p.ndim == 4]
    return any(not p.is_contiguous() for p in convs) and all(
        p.is_contiguous(memory_format=torch.channels_last) for p in convs)


@pytest.mark.parametrize("channels_last", [False, True])
def test_channels_last_reaches_the_bame_models_only(monkeypatch, channels_last):
    """--channels-last: BAME's copies of the model step in that format (fused=True, so their
    gradients must follow it), torch's stay contiguous, for both rules."""
    seen = []
    make_bame, make_torch = step_timing.make_bame, step_timing.make_torch

    def bame(model, *args):
        seen.append(("bame", _channels_last(model)))
        return make_bame(model, *args)

    def torch_optimizer(model, *args, **kwargs):
        seen.append(("torch", _channels_last(model)))
        return make_torch(model, *args, **kwargs)

    monkeypatch.setattr(step_timing, "make_bame", bame)
    monkeypatch.setattr(step_timing, "make_torch", torch_optimizer)
    cpu = torch.device("cpu")
    step_timing.time_sgd_steps("small_cnn", (2, 4), cpu, 1, 1, 0, ["bame"], None, channels_last)
    step_timing.time_adamw_steps("small_cnn", (2, 4), cpu, 1, 0, None, channels_last)
    assert {kind for kind, _ in seen} == {"bame", "torch"}
    assert all(last == (channels_last and kind == "bame") for kind, last in seen)
