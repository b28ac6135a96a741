"""The ablation benchmark runs Table 3 and the Fig. 3 sweeps end to end on tiny IDX data, and
the settings it asks for are the ones the optimizer runs with."""

from __future__ import annotations

import csv
import gzip
import math
from fractions import Fraction

import numpy as np
import pytest

from bame_apps.integrations.idx import IMAGES_MAGIC, LABELS_MAGIC
from bame_optim.methods import make_optimizer
from benchmarks import ablation, accuracy

TRAIN_IMAGES, TEST_IMAGES, SIZE = 96, 20, 8
STEPS = ablation.QUICK.epochs * math.ceil(TRAIN_IMAGES / ablation.QUICK.batch_size)  # 6


@pytest.fixture
def tiny_fashion(tmp_path, idx_bytes):
    """A Fashion-MNIST-shaped IDX folder of 8x8 noise images, small enough for 18 runs."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "data"
    folder.mkdir()
    arrays = {
        "train-images-idx3-ubyte": (rng.integers(0, 256, (TRAIN_IMAGES, SIZE, SIZE)), IMAGES_MAGIC),
        "train-labels-idx1-ubyte": (rng.integers(0, 10, TRAIN_IMAGES), LABELS_MAGIC),
        "t10k-images-idx3-ubyte": (rng.integers(0, 256, (TEST_IMAGES, SIZE, SIZE)), IMAGES_MAGIC),
        "t10k-labels-idx1-ubyte": (rng.integers(0, 10, TEST_IMAGES), LABELS_MAGIC),
    }
    for name, (array, magic) in arrays.items():
        (folder / f"{name}.gz").write_bytes(gzip.compress(idx_bytes(array, magic)))
    return folder


@pytest.mark.filterwarnings("ignore:BAMESGD. the evolve window:UserWarning")
def test_quick_run_on_tiny_data(tiny_fashion, tmp_path, monkeypatch, capsys):
    built = []

    def recording(method, params, **kwargs):
        optimizer = make_optimizer(method, params, **kwargs)
        built.append((method, optimizer))
        return optimizer

    monkeypatch.setattr(accuracy, "make_optimizer", recording)
    out = tmp_path / "out"
    argv = ["--quick", "--data", str(tiny_fashion), "--output-dir", str(out), "--seeds", "5"]
    result = ablation.main(argv)
    t3, sweeps = result["table3"], result["sweeps"]

    assert [(r["t_i"], r["t_f"]) for r in t3] == [
        ("0", "T/3"),
        ("0", "2T/3"),
        ("0", "T"),
        ("T/3", "T"),
        ("2T/3", "T"),
        ("T/3", "2T/3"),
    ]
    assert [(r["t_i_steps"], r["t_f_steps"]) for r in t3] == [
        (0, 2),
        (0, 4),
        (0, 6),
        (2, 6),
        (4, 6),
        (2, 4),
    ]
    assert [r["paper_top1"] for r in t3] == [91.87, 92.57, 92.22, 92.81, 93.05, 93.15]
    assert list(t3[0]) == [
        "t_i",
        "t_f",
        "t_i_steps",
        "t_f_steps",
        "evolve_updates",
        "top1_mean",
        "top1_std",
        "seeds",
        "flops_ratio",
        "seconds",
        "paper_top1",
        "paper_flops",
    ]
    # gradual pruning from dense costs FLOPs: the later t_i, the more
    flops = {(r["t_i"], r["t_f"]): r["flops_ratio"] for r in t3}
    assert flops[("0", "T/3")] < flops[("T/3", "2T/3")] < flops[("2T/3", "T")] < 1.0

    assert [(r["knob"], r["value"]) for r in sweeps] == [
        *(("alpha", v) for v in (0.0, 0.25, 0.5, 0.75, 1.0)),
        *(("beta", v) for v in (0.0, 0.25, 0.5, 0.75, 1.0)),
        *(("delta_t", v) for v in (1, 2, 4, 8, 20)),  # the paper's ΔT x 4/100
    ]
    assert [r["paper_value"] for r in sweeps if r["knob"] == "delta_t"] == [10, 50, 100, 200, 500]
    assert list(sweeps[0]) == [
        "knob",
        "value",
        "paper_value",
        "alpha",
        "beta",
        "delta_t",
        "evolve_updates",
        "top1_mean",
        "top1_std",
        "seeds",
        "flops_ratio",
        "seconds",
    ]
    for row in [*t3, *sweeps]:
        # one seed: no spread, and the tables say so instead of "± 0.00"
        assert 0 <= row["top1_mean"] <= 100 and row["top1_std"] is None and row["seeds"] == "5"

    # what each optimizer ran with, read from its sparse param groups
    ran = []
    for method, optimizer in built:
        assert method == "bame"
        sparse = [g for g in optimizer.param_groups if g["sparse"]]
        assert sparse and all(g["n"] == 1 and g["m"] == 16 for g in sparse)
        keys = ("t_i", "t_f", "alpha", "beta", "delta_t", "seed", "total_steps")
        settings = {tuple(g[k] for k in keys) for g in sparse}
        assert len(settings) == 1
        ran.append(settings.pop())
    asked = [(r["t_i_steps"], r["t_f_steps"], 0.5, 0.5, 4) for r in t3]
    asked += [(2, 4, r["alpha"], r["beta"], r["delta_t"]) for r in sweeps]
    unique = list(dict.fromkeys(asked))  # the default setting is in Table 3 and every sweep
    assert len(unique) == 6 + 3 * 4
    assert sorted(ran) == sorted((*s, seed, STEPS) for s in unique for seed in (5,))

    with open(out / "runs.csv") as f:
        runs = list(csv.DictReader(f))
    assert len(runs) == len(built) == len(unique)
    assert (out / "ablation.png").stat().st_size > 1000
    for name in ("table3.csv", "sweeps.csv"):
        with open(out / name) as f:
            assert len(list(csv.DictReader(f))) == len(t3 if name == "table3.csv" else sweeps)
    summary = (out / "summary.md").read_text()
    assert "| T/3 | 2T/3 | 2-4 |" in summary and "ΔT scaling" in summary
    assert "(one seed)" in summary and "± 0.00" not in summary
    printed = capsys.readouterr().out
    assert "10 -> 1, 50 -> 2, 100 -> 4, 200 -> 8, 500 -> 20 steps" in printed
    assert "| 2T/3 | T | 4-6 |" in printed


def test_schedule_grid_adds_the_cells_the_paper_lacks():
    settings = ablation.table3_settings(accuracy.SMALL, ["paper", "grid"])
    pairs = [(s.t_i, s.t_f) for s in settings]
    assert pairs[:6] == [(t_i, t_f) for t_i, t_f, *_ in ablation.PAPER_TABLE3]
    grid = {
        (t_i, t_f)
        for t_i in (Fraction(0), Fraction(1, 6), Fraction(1, 3), Fraction(1, 2))
        for t_f in (t_i, Fraction(2, 3), Fraction(1))
    }
    assert len(pairs) == len(set(pairs)) and set(pairs) == grid | set(pairs[:6])
    assert len(pairs) == 6 + 8  # (0, 2T/3), (0, T), (T/3, 2T/3), (T/3, T) are the paper's


@pytest.mark.parametrize(
    ("fraction", "steps", "expected"),
    [(Fraction(1, 3), 940, 313), (Fraction(2, 3), 940, 626), (Fraction(1), 940, 940)],
)
def test_fractions_of_t_round_down_as_the_optimizer_defaults(fraction, steps, expected):
    assert ablation.at(fraction, steps) == expected


def test_delta_t_scaling_keeps_the_recipe_value_at_the_papers_100():
    assert [ablation.scaled_delta_t(v, 20) for v in ablation.PAPER_DELTA_TS] == [2, 10, 20, 40, 100]
    assert ablation.scaled_delta_t(10, 4) == 1  # never below one step


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--seeds", "-1"], "argument --seeds: invalid seed '-1'"),
        (["--seeds", "x"], "argument --seeds: invalid seed 'x'"),
        (["--seeds", "0", "0"], "argument --seeds: invalid value [0, 0] (a seed is repeated)"),
        (["--data", "{tmp}/missing"], "argument --data: '{tmp}/missing' is not a folder"),
        (["--output-dir", "{tmp}/file"], "argument --output-dir: '{tmp}/file' is a file"),
        (["--table3", "rows"], "argument --table3: invalid choice: 'rows'"),
        (["--device", "nowhere"], "argument --device: cannot use 'nowhere'"),
    ],
)
def test_bad_flags(argv, message, tmp_path, tiny_fashion, capsys):
    (tmp_path / "file").write_text("")
    argv = [a.format(tmp=tmp_path) for a in argv]
    if "--data" not in argv:
        argv += ["--data", str(tiny_fashion)]
    with pytest.raises(SystemExit) as stop:
        ablation.main(argv)
    assert stop.value.code == 2
    assert message.format(tmp=tmp_path) in capsys.readouterr().err


def test_console_script_runs_the_ablation(capsys):
    from bame_apps import console

    with pytest.raises(SystemExit) as stop:
        console.bench_ablation(["--help"])
    assert stop.value.code == 0
    assert "--table3" in capsys.readouterr().out
