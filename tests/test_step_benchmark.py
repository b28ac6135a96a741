"""The step benchmark's command line (benchmarks.step): a small run of each rule prints its
table and writes the columns of the recorded CSVs, and bad flags are refused by name."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from benchmarks import step, step_report

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"


def _header(path: Path) -> list[str]:
    with open(path, newline="") as f:
        return next(csv.reader(f))


def test_small_sgd_run_table_and_csv(tmp_path, capsys):
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
        assert r["sgd_ms"] > 0 and r["ordinary_ms"] > 0 and r["sgd_fused_ms"] > 0
        assert 0.46 < r["params_m"] < 0.47
        if r["method"] == "bame":
            assert r["update_ms"] > 0 and r["train_bame_ms"] > 0 and r["train_sgd_ms"] > 0
            assert r["gradual_ms"] > 0 and r["sgd_gradual_loop_ms"] > 0
            assert r["amortised_pct"] is not None
            assert r["target"] == step_report.verdict(r)  # the verdict of this row's own ratios
        else:
            assert r["update_ms"] is None and r["gradual_ms"] is None and r["target"] == "-"
    assert _header(path) == _header(RESULTS / "step.csv")  # README cites its columns
    with open(path) as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    out = capsys.readouterr().out
    assert "| model | N:M | method | params (M) | SGD ms |" in out
    assert "| evolve / ordinary | gradual update ms | gradual / ordinary |" in out
    assert "| resnet32 | 1:16 | bame | 0.46 |" in out
    assert "training step of resnet32 (batch 8" in out and "BAMESGD 1:16" in out
    assert "medians of 2 ordinary and 1 update steps" in out


def test_small_adamw_run_table_and_csv(tmp_path, capsys):
    path = tmp_path / "step_adamw.csv"
    rows = step.main(["--optimizer", "adamw", "--models", "resnet32", "--patterns", "2:4",
                      "1:16", "--steps", "1", "--warmup", "0", "--csv", str(path)])
    assert [(r["model"], r["pattern"]) for r in rows] == [("resnet32", "2:4"), ("resnet32", "1:16")]
    for r in rows:
        assert r["adamw_ms"] > 0 and r["ordinary_ms"] > 0 and r["update_ms"] > 0
        assert r["adamw_fused_ms"] > 0 and r["fused_gbps"] > 0 and r["ordinary_gbps"] > 0
    assert _header(path) == _header(RESULTS / "step_adamw.csv")  # README cites its columns
    out = capsys.readouterr().out
    assert "BAMEAdamW against torch.optim.AdamW(foreach=True) and (fused=True)" in out
    assert "| update / ordinary | target (x fused) |" in out and "| resnet32 | 1:16 |" in out


def test_defaults_of_each_rule():
    sgd = step.parse_args([])
    assert sgd.optimizer == "sgd" and sgd.patterns == [(2, 4), (1, 4), (1, 16)]
    assert (sgd.steps, sgd.update_steps, sgd.train_steps, sgd.warmup) == (40, 6, 10, 3)
    assert sgd.methods == ["bame"] and sgd.train_models == ["resnet32"]
    assert sgd.train_batch == 128 and sgd.models == list(step.DEFAULT_MODELS)
    adamw = step.parse_args(["--optimizer", "adamw"])
    assert adamw.patterns == [(2, 4), (1, 16)] and (adamw.steps, adamw.warmup) == (20, 3)
    assert adamw.models == list(step.DEFAULT_MODELS)
    quick = step.parse_args(["--optimizer", "adamw", "--quick"])
    assert (quick.steps, quick.warmup) == (5, 1)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--patterns", "4:4"], "invalid N:M pattern '4:4'"),
        (["--steps", "0"], "--steps: must be >= 1"),
        (["--train-batch", "0"], "--train-batch: must be >= 1"),
        (["--device", "nope"], "--device: cannot use 'nope'"),
        (["--optimizer", "adam"], "invalid choice: 'adam'"),
        (["--optimizer", "adamw", "--update-steps", "3"], "--update-steps: only with --optimizer"),
        (["--optimizer", "adamw", "--train-models"], "--train-models: only with --optimizer sgd"),
        (["--optimizer", "adamw", "--warmup", "-1"], "--warmup: must be >= 0"),
    ],
)
def test_bad_flags(argv, message, capsys):
    with pytest.raises(SystemExit):
        step.main(argv)
    assert message in capsys.readouterr().err


def test_channels_last_flag_reaches_the_timing_and_the_header(monkeypatch, capsys):
    seen = []

    def fake(name, pattern, device, steps, warmup, bar, channels_last):
        seen.append(channels_last)
        return {"adamw": 2.0, "adamw_fused": 1.0, "ordinary": 1.0, "update": 5.0,
                "fused_quartiles": (1.0, 1.0), "params": 10, "bytes_dense": 280,
                "bytes_sparse": 160}

    monkeypatch.setattr(step, "time_adamw_steps", fake)
    argv = ["--optimizer", "adamw", "--models", "resnet32", "--patterns", "2:4", "--steps", "1"]
    step.main(argv)
    assert step.CHANNELS_LAST_NOTE not in capsys.readouterr().out
    step.main([*argv, "--channels-last"])
    assert step.CHANNELS_LAST_NOTE in capsys.readouterr().out
    assert seen == [False, True]
