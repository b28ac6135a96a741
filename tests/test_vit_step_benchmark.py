"""The DeiT training-step timing (:mod:`benchmarks.vit_step`) times every optimizer and prints
their ratios to both AdamW implementations."""

from __future__ import annotations

import pytest

from benchmarks import vit_step

pytest.importorskip("timm", reason="the ViT step timing builds timm's DeiT")


def test_vit_step_timing_prints_ratios_to_both_adamw(tmp_path, capsys):
    row = vit_step.main(["--depth", "1", "--image-size", "32", "--batch", "2", "--steps", "2",
                         "--warmup", "0", "--csv", str(tmp_path / "vit.csv")])
    for kind in vit_step.KINDS:
        assert row[f"{kind}_ms"] > 0
    assert row["bame_ordinary_vs_adamw_fused"] == pytest.approx(
        row["bame_ordinary_ms"] / row["adamw_fused_ms"]
    )
    assert row["sparse_params"] == 4  # qkv, proj, fc1, fc2 (patch embedding, head dense)
    out = capsys.readouterr().out
    assert "| bame_update |" in out and "x AdamW fused" in out
    assert (tmp_path / "vit.csv").read_text().count("\n") == 2
