"""The AdamW step benchmark times what it says: ordinary steps never update masks, update
steps always do, and the table has one row per model and pattern."""

from __future__ import annotations

import pytest
import torch

from benchmarks import step_adamw


@pytest.mark.parametrize(("kind", "due"), [("ordinary", False), ("update", True)])
def test_steps_after_the_first_are_of_the_asked_kind(kind, due):
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 16),
                                torch.nn.Linear(16, 4))
    opt = step_adamw.make_optimizer(model, 2, 4, kind)
    for t in range(1, 6):
        for group in opt.param_groups:
            if group["sparse"]:
                assert opt.mask_update_due(group, t) is due, (kind, t)


def test_bad_kind_raises_naming_it():
    with pytest.raises(ValueError, match="Invalid kind value: 'gradual'"):
        step_adamw.make_optimizer(torch.nn.Linear(8, 8), 2, 4, "gradual")


def test_main_prints_one_row_per_model_and_pattern(tmp_path, capsys):
    rows = step_adamw.main(["--models", "resnet32", "--patterns", "2:4", "1:16", "--steps", "1",
                            "--warmup", "0", "--csv", str(tmp_path / "step_adamw.csv")])
    assert [(r["model"], r["pattern"]) for r in rows] == [("resnet32", "2:4"), ("resnet32", "1:16")]
    for r in rows:
        assert r["adamw_ms"] > 0 and r["ordinary_ms"] > 0 and r["update_ms"] > 0
        assert r["update_ratio"] == pytest.approx(r["update_ms"] / r["adamw_ms"])
    assert "update / ordinary" in capsys.readouterr().out
    assert (tmp_path / "step_adamw.csv").read_text().count("\n") == 3
