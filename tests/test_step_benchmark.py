"""The step benchmark: its schedules really are ordinary / update steps, and its table."""

from __future__ import annotations

import csv

import pytest
import torch
from torch import nn

from benchmarks import step


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 4))


def _masks(optimizer, model):
    return {name: optimizer.kept_mask(p) for name, p in model.named_parameters()}


def _start(kind, pattern=(2, 4)):
    model = _mlp()
    grads = [torch.randn_like(p) for p in model.parameters()]
    step.assign_grads(model, grads)
    optimizer, start = step.make_bame(model, *pattern, kind)
    for _ in range(start):
        optimizer.step()
    return model, optimizer


@pytest.mark.parametrize("pattern", [(2, 4), (1, 16)])
def test_ordinary_configuration_never_updates_a_mask(pattern):
    model, optimizer = _start("ordinary", pattern)
    before = _masks(optimizer, model)
    sparse = [name for name, mask in before.items() if mask is not None]
    assert sparse == ["1.weight", "2.weight"]  # nm_param_groups: stem and classifier dense
    for _ in range(5):
        assert step.update_flags(optimizer) == [False]
        optimizer.step()
    after = _masks(optimizer, model)
    for name in sparse:
        assert torch.equal(before[name], after[name]), name


@pytest.mark.parametrize("pattern", [(2, 4), (1, 16)])
def test_update_configuration_updates_masks_every_step(pattern):
    model, optimizer = _start("update", pattern)
    changed = 0
    for _ in range(3):
        assert step.update_flags(optimizer) == [True]
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
    assert group["step"] == step.FAR - step.GRADUAL_LEAD + 1 < group["t_i"]
    before = _masks(optimizer, model)
    for _ in range(3):
        assert step.update_flags(optimizer) == [True]
        optimizer.step()
    after = _masks(optimizer, model)
    for name, mask in after.items():
        if mask is not None:
            assert mask.sum(dim=1).tolist() == [n + 1] * mask.shape[0]
            assert torch.equal(mask, before[name]), name


def test_unknown_configuration():
    with pytest.raises(ValueError, match="Invalid kind value: 'frozen'"):
        step.make_bame(_mlp(), 2, 4, "frozen")


def test_interleaving_rotates_the_order_and_skips_warmup():
    order: list[str] = []
    calls = {name: (lambda name=name: order.append(name)) for name in "abc"}
    times = step.interleaved(calls, steps=2, warmup=1, timer=step.Timer(torch.device("cpu")))
    assert order == list("abcbcacab")
    assert set(times) == set("abc") and all(t >= 0 for t in times.values())


def test_small_run_table_and_csv(tmp_path, capsys):
    path = tmp_path / "step.csv"
    argv = ["--models", "resnet32", "--patterns", "1:16", "--methods", "bame", "static"]
    argv += ["--steps", "2", "--update-steps", "1", "--warmup", "0"]
    argv += ["--train-steps", "1", "--train-batch", "8", "--csv", str(path)]
    rows = step.main(argv)
    assert [(r["model"], r["n"], r["m"], r["method"]) for r in rows] == [
        ("resnet32", 1, 16, "bame"),
        ("resnet32", 1, 16, "static"),
    ]
    for r in rows:
        assert r["sgd_ms"] > 0 and r["ordinary_ms"] > 0
        assert r["ordinary_ratio"] == pytest.approx(r["ordinary_ms"] / r["sgd_ms"])
        assert 0.46 < r["params_m"] < 0.47
        if r["method"] == "bame":
            assert r["update_ms"] > 0 and r["train_bame_ms"] > 0 and r["train_sgd_ms"] > 0
            assert r["gradual_ms"] > 0 and r["sgd_gradual_loop_ms"] > 0
            assert r["gradual_vs_ordinary"] == pytest.approx(r["gradual_ms"] / r["ordinary_ms"])
            assert r["amortised_pct"] is not None
            assert r["target"] == step.verdict(r)  # the verdict of this row's own ratios
        else:
            assert r["update_ms"] is None and r["gradual_ms"] is None and r["target"] == "-"
    with open(path) as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    out = capsys.readouterr().out
    assert "| model | N:M | method | params (M) | SGD ms |" in out
    assert "| evolve / ordinary | gradual update ms | gradual / ordinary |" in out
    assert "| resnet32 | 1:16 | bame | 0.46 |" in out
    assert "training step of resnet32 (batch 8" in out and "BAMESGD 1:16" in out


def test_verdict_applies_the_stated_targets():
    row = {"model": "resnet32", "method": "bame", "n": 2, "m": 4, "ordinary_ratio": 1.1,
           "amortised_pct": 1.9}
    assert step.verdict(row) == "PASS"
    assert step.verdict({**row, "ordinary_ratio": 1.2}).startswith("MISS: ordinary 1.20x")
    assert step.verdict({**row, "amortised_pct": 2.0}).startswith("MISS: update 2.00%")
    assert step.verdict({**row, "n": 1, "m": 16, "ordinary_ratio": 1.0}).startswith("MISS")
    assert step.verdict({**row, "n": 1, "m": 16, "ordinary_ratio": 0.99}) == "PASS"
    assert step.verdict({**row, "n": 1, "amortised_pct": None}) == "-"  # 1:4: no target
    assert step.verdict({**row, "method": "static"}) == "-"
    on_resnet50 = {**row, "model": "resnet50", "update_vs_ordinary": 10.0}
    assert step.verdict(on_resnet50) == "PASS"
    assert step.verdict({**on_resnet50, "update_vs_ordinary": 10.5}).startswith(
        "MISS: update step 10.5x ordinary"
    )
    assert step.verdict({**row, "update_vs_ordinary": 50.0}) == "PASS"  # no target off resnet50
    gradual = {**on_resnet50, "gradual_vs_ordinary": 12.0}
    assert step.verdict(gradual) == "MISS: gradual step 12.0x ordinary !<= 10.0x"
    assert step.verdict({**gradual, "gradual_vs_ordinary": 3.0}) == "PASS"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--patterns", "4:4"], "invalid N:M pattern '4:4'"),
        (["--steps", "0"], "--steps: must be >= 1"),
        (["--device", "nope"], "--device: cannot use 'nope'"),
    ],
)
def test_bad_flags(argv, message, capsys):
    with pytest.raises(SystemExit):
        step.main(argv)
    assert message in capsys.readouterr().err
