"""The memory benchmark: its state walk, its shape shortcut, and its table on ResNet-32."""

from __future__ import annotations

import csv

import pytest
import torch
from torch import nn

from bame_optim.methods import METHODS
from benchmarks import harness, memory


def _tiny() -> nn.Module:
    """Repeated shapes (so :func:`memory.representatives` has work), a norm and a bias."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 32),
        nn.Linear(32, 32),
        nn.Linear(32, 32),
        nn.LayerNorm(32),
        nn.Linear(32, 32, bias=False),
        nn.Linear(32, 10),
    )


def test_walk_counts_every_tensor_once_and_numbers_as_zero():
    a = torch.zeros(3, 4)  # 48 bytes
    b = torch.zeros(5, dtype=torch.bool)  # 5
    c = torch.zeros(2, 2, dtype=torch.float64)  # 32
    d = torch.zeros(7, dtype=torch.int16)  # 14
    state = {"x": [a, (b, {"y": c, "z": [d, a]})], "step": 5, "flag": True, "name": "w"}
    assert memory.walk_bytes(state) == (48 + 5 + 32 + 14, 4)
    assert memory.walk_bytes({"n": 3, "f": 0.5, "none": None}) == (0, 0)


def test_state_bytes_splits_sparse_dense_and_other():
    sparse, dense = nn.Parameter(torch.zeros(4, 8)), nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([sparse, dense], lr=0.1)
    opt.state[sparse] = {"values": torch.zeros(4, 2), "codes": [torch.zeros(4, dtype=torch.uint8)]}
    opt.state[dense] = {"momentum_buffer": torch.zeros(3), "step": 7}
    opt.state["shared"] = {"t": torch.zeros(2, dtype=torch.float16)}
    opt.param_groups[0]["extra"] = torch.zeros(1)
    out = memory.state_bytes(opt, {id(sparse)})
    assert out == {
        "sparse": 32 + 4,
        "dense": 12,
        "other": 4 + 4,
        "tensors": 5,
        "total": 36 + 12 + 8,
    }
    # a representative counts for its whole shape class
    assert memory.state_bytes(opt, {id(sparse)}, {id(sparse): 3})["sparse"] == 3 * 36


def test_references_sgd_momentum_and_adamw_moments_and_steps():
    run = memory.Run(_tiny(), torch.device("cpu"))
    out = memory.measure_reference(run, set())
    assert out["total"] == out["dense"] == 4 * run.numel
    # exp_avg + exp_avg_sq (8 bytes per fp32 parameter) and a 4-byte step tensor per parameter
    out = memory.measure_reference(run, set(), "adamw")
    assert out["total"] == out["dense"] == 8 * run.numel + 4 * len(run.params)
    assert out["tensors"] == 3 * len(run.params)


@pytest.mark.parametrize("pattern", [(1, 4), (2, 4)])
def test_one_parameter_per_shape_gives_the_exact_numbers(pattern):
    run = memory.Run(_tiny(), torch.device("cpu"))
    groups, counts = memory.representatives(harness.sparse_groups(run.model, *pattern))
    assert sum(counts.values()) == len(run.params)
    assert len(harness.params_of(groups)) < len(run.params)
    for method in (m for m in METHODS if m != "dense"):
        fast = memory.measure_method(run, method, pattern, 5)
        exact = memory.measure_method(run, method, pattern, 5, exact=True)
        assert fast == exact, method
    # BAMEAdamW by hand. Each sparse weight of K blocks keeps exp_avg and exp_avg_sq as
    # [K, kept] fp32 (kept = M at t = 0, then N), one uint8 code per block and a 4-byte step
    # tensor, plus the fp32 oscillation EMA [K] in the evolve phase; dense parameters carry
    # torch.optim.AdamW's state: two fp32 moments and the step.
    n, m = pattern
    sparse = harness.params_of(harness.sparse_groups(run.model, n, m), sparse=True)
    assert sparse and len(sparse) < len(run.params)
    blocks = sum(p.numel() for p in sparse) // m
    steps = 4 * len(sparse)
    kept = {"gradual": m, "prune": n, "evolve": n, "frozen": n}
    expected = {
        label: 2 * 4 * blocks * k + blocks + steps + (4 * blocks if label == "evolve" else 0)
        for label, k in kept.items()
    }
    dense_numel = run.numel - m * blocks
    dense = 8 * dense_numel + 4 * (len(run.params) - len(sparse))
    peaks = memory.measure_method(run, "bame_adamw", pattern, 5)
    assert {label: b["sparse"] for label, b in peaks.items()} == expected
    assert {(b["dense"], b["other"]) for b in peaks.values()} == {(dense, 0)}
    # against torch.optim.AdamW's state of the same parameters, measured the same way
    ref = memory.measure_reference(run, {id(p) for p in sparse}, "adamw")
    assert ref["sparse"] == 8 * m * blocks + steps and ref["dense"] == dense
    assert ref["other"] == 0
    frozen = (2 * 4 * n + 1) / (8 * m)  # fp32 moments of N of M weights + a code per block
    assert peaks["frozen"]["sparse"] / ref["sparse"] == pytest.approx(frozen, rel=0.01)


def test_every_phase_is_reached_and_measured():
    run = memory.Run(_tiny(), torch.device("cpu"))
    peaks = memory.measure_method(run, "bame", (1, 4), 5)
    assert {k: v["steps"] for k, v in peaks.items()} == {
        "gradual": 1,
        "prune": 1,
        "evolve": 1,
        "frozen": 2,
    }
    static = memory.measure_method(run, "static", (1, 4), 5)
    assert set(static) == {"prune", "frozen"}
    sgd = memory.measure_method(run, "dense", (1, 4), 5)
    assert set(sgd) == {"-"} and sgd["-"]["total"] == 4 * run.numel
    adamw = memory.measure_method(run, "bame_adamw", (1, 4), 5)
    assert {k: v["steps"] for k, v in adamw.items()} == {k: v["steps"] for k, v in peaks.items()}
    assert set(memory.measure_method(run, "static_adamw", (1, 4), 5)) == {"prune", "frozen"}


def test_resnet32_table_and_csv(tmp_path, capsys):
    path = tmp_path / "memory.csv"
    rows = memory.main(
        [
            "--models",
            "resnet32",
            "--patterns",
            "2:4",
            "--methods",
            "static",
            "bame",
            "bame_adamw",
            "--csv",
            str(path),
        ]
    )
    numel = sum(p.numel() for p in memory.MODELS["resnet32"]().parameters())
    sgd = [r for r in rows if r["method"] == "sgd"]
    assert len(sgd) == 1 and sgd[0]["state_bytes"] == 4 * numel and sgd[0]["ratio"] == 1.0
    assert sgd[0]["sparse_ratio"] == 1.0
    adamw = [r for r in rows if r["method"] == "adamw"]
    assert len(adamw) == 1 and adamw[0]["ratio"] == adamw[0]["sparse_ratio"] == 1.0
    n_params = len(list(memory.MODELS["resnet32"]().parameters()))
    assert adamw[0]["state_bytes"] == 8 * numel + 4 * n_params
    # each row is against its family's reference
    assert {r["method"]: r["reference"] for r in rows} == {
        "sgd": "sgd",
        "static": "sgd",
        "bame": "sgd",
        "adamw": "adamw",
        "bame_adamw": "adamw",
    }
    for r in rows:
        assert r["state_bytes"] >= r["sparse_bytes"] + r["dense_bytes"]
        assert r["state_bytes"] > 0 and r["ratio"] > 0
    bame = {r["phase"]: r for r in rows if r["method"] == "bame"}
    assert set(bame) == {"gradual", "prune", "evolve", "frozen"}
    # dense parameters carry the family's dense state in every method and phase
    for ref in sgd + adamw:
        family = [r for r in rows if r["reference"] == ref["method"]]
        assert {r["dense_bytes"] for r in family} == {ref["dense_bytes"]}
    with open(path) as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    out = capsys.readouterr().out
    assert "| resnet32 | 2:4 | torch SGD (1.0) | torch SGD |" in out
    assert "| resnet32 | 2:4 | bame | torch SGD |" in out
    assert "| resnet32 | 2:4 | torch AdamW (1.0) | torch AdamW |" in out
    assert "| resnet32 | 2:4 | bame_adamw | torch AdamW |" in out
    # the frozen-phase state is [K, 2] fp32 momentum + one uint8 code per block: 9/16 of SGD's
    assert "| resnet32 | 2:4 | frozen | < 0.60 | 0.562 | PASS |" in out
    # at t = 0 every weight is kept: all momentum plus the codes, above SGD's
    assert "| resnet32 | 2:4 | gradual | < 0.60 | 1.062 | MISS |" in out
    # BAMEAdamW, outside the evolve phase: two [K, 2] fp32 moments + a code per block, 17/32
    assert "outside the evolve phase" in out and "sparse part x AdamW" in out
    assert "| resnet32 | 2:4 | frozen | < 0.60 | 0.531 | PASS |" in out
    assert "| resnet32 | 2:4 | prune | < 0.60 | 0.531 | PASS |" in out
    assert "| resnet32 | 2:4 | evolve | < 0.60 | 0.656 |" not in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--patterns", "4:4"], "invalid N:M pattern '4:4'"),
        (["--total-steps", "4"], "--total-steps: must be >= 5"),
        (["--methods", "nope"], "invalid choice: 'nope'"),
    ],
)
def test_bad_flags(argv, message, capsys):
    with pytest.raises(SystemExit):
        memory.main(argv)
    assert message in capsys.readouterr().err
