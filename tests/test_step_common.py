"""The step benchmarks' shape set and byte model (benchmarks.step_common)."""

from __future__ import annotations

import pytest
import torch

from benchmarks import step, step_adamw, step_common


def test_gpt2_small_shape_set():
    model = step_common.build_model("gpt2_small", torch.device("cpu"))
    weights = [p for p in model.parameters() if p.ndim == 2]
    assert len(weights) == 48
    assert {tuple(w.shape) for w in weights} == {(2304, 768), (768, 768), (3072, 768),
                                                 (768, 3072)}
    assert sum(w.numel() for w in weights) == 12 * (768 * 2304 + 768 * 768 + 2 * 768 * 3072)


def test_step_bytes_model():
    dense = torch.zeros(10, 8)
    sparse = torch.zeros(100, 16)
    groups = [{"params": [sparse], "sparse": True}, {"params": [dense], "sparse": False}]
    words = 4  # float32
    assert step_common.step_bytes(groups, None, None, "sgd") == (80 + 1600) * words * 5
    assert step_common.step_bytes(groups, None, None, "adamw") == (80 + 1600) * words * 7
    # compact: 3 words per weight plus 2 (SGD) / 4 (AdamW) per kept weight
    assert step_common.step_bytes(groups, 2, 4, "sgd") == 80 * 4 * 5 + 1600 * 4 * (3 + 1)
    assert step_common.step_bytes(groups, 1, 16, "adamw") == 80 * 4 * 7 + round(
        1600 * 4 * (3 + 4 / 16))
    assert step_common.gbps(2_000_000, 2.0) == pytest.approx(1.0)


def test_sgd_rows_report_fused_ratio_and_gbps(tmp_path):
    rows = step.main(["--models", "resnet32", "--patterns", "2:4", "--steps", "1",
                      "--update-steps", "1", "--warmup", "0", "--train-models"])
    (row,) = rows
    assert row["ordinary_vs_fused"] == pytest.approx(row["ordinary_ms"] / row["sgd_fused_ms"])
    assert row["fused_gbps"] > 0 and row["ordinary_gbps"] > 0
    assert step.verdict({**row, "ordinary_ratio": 0.5, "ordinary_vs_fused": 1.2,
                         "update_vs_ordinary": None, "gradual_vs_ordinary": None,
                         "amortised_pct": None}).startswith("MISS: ordinary 1.20x fused")


def test_adamw_rows_report_fused_ratio_and_gbps():
    (row,) = step_adamw.main(["--models", "resnet32", "--patterns", "1:16", "--steps", "1",
                              "--warmup", "0"])
    assert row["ordinary_vs_fused"] == pytest.approx(row["ordinary_ms"] / row["adamw_fused_ms"])
    assert row["target"] == ("PASS" if row["ordinary_vs_fused"] <= 0.6 else "MISS")
    assert row["fused_gbps"] > 0 and row["ordinary_gbps"] > 0
