"""benchmarks.baseline_groups: torch's fused step over one group against over
``nm_param_groups``' groups, in one process."""

from __future__ import annotations

import copy

import pytest
import torch

from benchmarks import baseline_groups
from benchmarks.harness import assign_grads, build_model, fixed_grads, sparse_groups
from benchmarks.step_timing import make_torch


def test_small_run_times_both_groupings(capsys):
    rows = baseline_groups.main(["--models", "small_cnn", "--rules", "sgd", "adamw",
                                 "--rounds", "2", "--warmup", "0"])
    assert [(r["model"], r["rule"]) for r in rows] == [("small_cnn", "sgd"),
                                                       ("small_cnn", "adamw")]
    for row in rows:
        assert row["one"] > 0 and row["groups"] > 0 and 0 < row["q1"] <= row["q3"]
    assert "groups/one [rounds' IQR]" in capsys.readouterr().out


@pytest.mark.parametrize("rule", ["sgd", "adamw"])
def test_the_two_groupings_differ_only_in_the_1d_weight_decay(rule):
    """The grouped optimizer does the one-group optimizer's work: the same update on every
    parameter nm_param_groups keeps decayed, and no weight decay on the 1-D ones (as BAME's
    groups), so the benchmark compares the grouping's cost, not another update."""
    base = build_model("small_cnn", torch.device("cpu"))
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.1)  # no zero biases: a weight decay left on would show
    grads = fixed_grads(base, torch.device("cpu"))
    one, grouped, undecayed = (copy.deepcopy(base) for _ in range(3))
    optimizers = [make_torch(one, rule, fused=True),
                  baseline_groups.grouped_torch(grouped, rule, 2, 4)]
    no_decay = torch.optim.SGD if rule == "sgd" else torch.optim.AdamW
    reference = make_torch(undecayed, rule, fused=True)
    for group in reference.param_groups:
        group["weight_decay"] = 0.0
    optimizers.append(reference)
    for model, optimizer in zip((one, grouped, undecayed), optimizers, strict=True):
        assign_grads(model, grads)
        optimizer.step()
    assert isinstance(optimizers[1], no_decay) and len(optimizers[1].param_groups) > 1
    assert [g["weight_decay"] for g in optimizers[1].param_groups] == [
        g.get("weight_decay", optimizers[0].defaults["weight_decay"])
        for g in sparse_groups(copy.deepcopy(base), 2, 4)]
    compared = 0
    for a, b, c in zip(one.parameters(), grouped.parameters(), undecayed.parameters(),
                       strict=True):
        if a.ndim > 1:
            torch.testing.assert_close(b, a, rtol=0, atol=0)
        else:
            torch.testing.assert_close(b, c, rtol=0, atol=0)
            assert not torch.equal(b, a)
            compared += 1
    assert compared > 0


@pytest.mark.parametrize(("argv", "message"), [
    (["--rounds", "1"], "Invalid --rounds value: 1"),
    (["--warmup", "-1"], "Invalid --warmup value: -1"),
    (["--rules", "adam"], "invalid choice: 'adam'"),
])
def test_bad_flags_are_refused_by_name(argv, message, capsys):
    with pytest.raises(SystemExit):
        baseline_groups.main(argv)
    assert message in capsys.readouterr().err
