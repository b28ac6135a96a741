"""The step benchmark's rows, verdicts and tables (benchmarks.step_report), from given medians:
every ratio is the quotient of the medians it names."""

from __future__ import annotations

import pytest

from benchmarks import step_report

SGD_TIMES = {
    "sgd": 2.0, "sgd_fused": 1.0, "ordinary:bame": 1.5, "ordinary:static": 3.0,
    "sgd_u": 2.5, "update": 9.0, "sgd_g": 2.2, "gradual": 4.5,
    "params": 460_000, "bytes_dense": 9_000_000, "bytes_sparse": 6_000_000,
    "fused_quartiles:bame": (1.4, 1.6), "fused_quartiles:static": (2.5, 3.5),
}
ADAMW_TIMES = {
    "adamw": 4.0, "adamw_fused": 2.0, "ordinary": 1.0, "update": 20.0,
    "params": 1_500_000, "bytes_dense": 42_000_000, "bytes_sparse": 20_000_000,
    "fused_quartiles": (0.45, 0.55),
}


def test_sgd_rows_are_ratios_of_the_medians():
    train = {"sgd": 100.0, "1:16": 110.0}
    rows = step_report.sgd_rows("resnet32", (1, 16), SGD_TIMES, train, ["bame", "static"])
    bame, static = rows
    assert (bame["model"], bame["n"], bame["m"], bame["method"]) == ("resnet32", 1, 16, "bame")
    assert bame["params_m"] == 0.46 and bame["sgd_ms"] == 2.0 and bame["ordinary_ms"] == 1.5
    assert bame["ordinary_ratio"] == 0.75 and bame["ordinary_vs_fused"] == 1.5
    assert (bame["ordinary_vs_fused_q1"], bame["ordinary_vs_fused_q3"]) == (1.4, 1.6)
    assert (static["ordinary_vs_fused_q1"], static["ordinary_vs_fused_q3"]) == (2.5, 3.5)
    assert bame["fused_gbps"] == 9.0 and bame["ordinary_gbps"] == 4.0
    assert bame["update_ratio"] == 9.0 / 2.5 and bame["update_vs_ordinary"] == 6.0
    assert bame["gradual_vs_ordinary"] == 3.0 and bame["sgd_gradual_loop_ms"] == 2.2
    assert (bame["train_sgd_ms"], bame["train_bame_ms"]) == (100.0, 110.0)
    assert bame["amortised_pct"] == pytest.approx(100 * (9.0 - 1.5) / 100 / 110.0)
    assert bame["target"] == step_report.verdict(bame) == "MISS: ordinary 1.50x fused !<= 0.7x"
    assert static["ordinary_ratio"] == 1.5 and static["target"] == "-"
    assert static["update_ms"] is None and static["amortised_pct"] is None
    untrained = step_report.sgd_rows("resnet32", (1, 16), SGD_TIMES, None, ["bame"])[0]
    assert untrained["amortised_pct"] is None and untrained["train_sgd_ms"] is None
    assert list(untrained) == list(bame)  # the columns of docs/results/step.csv, always


def test_sgd_table_prints_every_row():
    rows = step_report.sgd_rows("resnet32", (1, 16), SGD_TIMES, None, ["bame", "static"])
    table = step_report.format_table(rows).splitlines()
    assert table[0].startswith("| model | N:M | method | params (M) | SGD ms | ordinary ms |")
    assert "| fused SGD ms | x fused (rounds' IQR) | GB/s fused SGD / ordinary |" in table[0]
    assert table[2].startswith("| resnet32 | 1:16 | bame | 0.46 | 2.00 | 1.50 | 0.75x | 1.00 "
                               "| 1.50x (1.40-1.60) | 9.0 / 4.0 | 9.0 | 3.6x | 6.0 | 4.5 | 3.0 "
                               "| - |")
    assert table[3].endswith("| - | - | - | - | - | - | - |")


def test_verdict_applies_the_stated_targets():
    row = {"model": "resnet32", "method": "bame", "n": 2, "m": 4, "ordinary_ratio": 1.1,
           "amortised_pct": 1.9}
    assert step_report.verdict(row) == "PASS"
    assert step_report.verdict({**row, "ordinary_ratio": 1.2}).startswith("MISS: ordinary 1.20x")
    assert step_report.verdict({**row, "amortised_pct": 2.0}).startswith("MISS: update 2.00%")
    assert step_report.verdict({**row, "n": 1, "m": 16, "ordinary_ratio": 1.0}).startswith("MISS")
    assert step_report.verdict({**row, "n": 1, "m": 16, "ordinary_ratio": 0.99}) == "PASS"
    assert step_report.verdict({**row, "n": 1, "amortised_pct": None}) == "-"  # 1:4: no target
    assert step_report.verdict({**row, "method": "static"}) == "-"
    assert step_report.verdict({**row, "ordinary_vs_fused": 1.2}).startswith(
        "MISS: ordinary 1.20x fused !<= 1.0x"
    )
    assert step_report.verdict({**row, "ordinary_vs_fused": 1.0}) == "PASS"
    on_resnet50 = {**row, "model": "resnet50", "update_vs_ordinary": 10.0}
    assert step_report.verdict(on_resnet50) == "PASS"
    assert step_report.verdict({**on_resnet50, "update_vs_ordinary": 10.5}).startswith(
        "MISS: update step 10.5x ordinary"
    )
    assert step_report.verdict({**row, "update_vs_ordinary": 50.0}) == "PASS"  # off resnet50
    gradual = {**on_resnet50, "gradual_vs_ordinary": 12.0}
    assert step_report.verdict(gradual) == "MISS: gradual step 12.0x ordinary !<= 10.0x"
    assert step_report.verdict({**gradual, "gradual_vs_ordinary": 3.0}) == "PASS"


def test_adamw_row_ratios_and_target():
    row = step_report.adamw_row("deit_small", (2, 4), ADAMW_TIMES)
    assert row == {
        "model": "deit_small", "pattern": "2:4", "params_m": 1.5, "adamw_ms": 4.0,
        "ordinary_ms": 1.0, "update_ms": 20.0, "ordinary_ratio": 0.25, "update_ratio": 5.0,
        "update_over_ordinary": 20.0, "adamw_fused_ms": 2.0, "ordinary_vs_fused": 0.5,
        "ordinary_vs_fused_q1": 0.45, "ordinary_vs_fused_q3": 0.55, "fused_gbps": 21.0,
        "ordinary_gbps": 20.0, "target": "PASS",
    }
    assert step_report.adamw_row("x", (1, 16), ADAMW_TIMES)["target"] == "PASS"  # 0.5 <= 0.6
    slow = {**ADAMW_TIMES, "ordinary": 1.3}
    assert step_report.adamw_row("x", (1, 16), slow)["target"] == "MISS"
    assert step_report.adamw_row("x", (1, 4), ADAMW_TIMES)["target"] == "-"
    table = step_report.format_adamw_table([row]).splitlines()
    assert table[2] == ("| deit_small | 2:4 | 1.5 | 4.0 | 1.0 | 0.25x | 2.0 | 0.50x (0.45-0.55) "
                        "| 21.0 / 20.0 | 20.0 | 5.00x | 20.0x | PASS |")


def test_training_lines_give_each_pattern_against_sgd():
    (line,) = step_report.training_lines({"resnet32": {"sgd": 10.0, "2:4": 11.0}}, 8, 3)
    assert line == ("training step of resnet32 (batch 8, input 3x32x32, forward + backward + "
                    "step, interleaved, median of 3): SGD 10.0 ms, BAMESGD 2:4 11.0 ms (1.10x)")
