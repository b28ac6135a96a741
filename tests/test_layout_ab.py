"""benchmarks.layout_ab: BAME's step on a contiguous and a channels-last copy of a model,
against torch's fused step on the contiguous one, in one process."""

from __future__ import annotations

import pytest

from benchmarks import layout_ab, step_timing


def test_small_run_times_both_layouts_against_torch(monkeypatch, capsys):
    layouts = []
    make_bame = step_timing.make_bame

    def spy(model, *args):
        convs = [p for p in model.parameters() if p.ndim == 4]
        layouts.append(any(not p.is_contiguous() for p in convs))
        return make_bame(model, *args)

    monkeypatch.setattr(layout_ab, "make_bame", spy)
    rows = layout_ab.main(["--models", "small_cnn", "--patterns", "2:4", "--rules", "sgd",
                           "adamw", "--rounds", "2", "--warmup", "0"])
    assert [(r["model"], r["pattern"], r["rule"]) for r in rows] == [
        ("small_cnn", "2:4", "sgd"), ("small_cnn", "2:4", "adamw")]
    assert layouts == [False, True, False, True]  # contiguous, then channels_last, per rule
    for row in rows:
        assert all(row[c] > 0 for c in layout_ab.CONTENDERS)
        assert 0 < row["last_vs_contiguous_q1"] <= row["last_vs_contiguous_q3"]
    out = capsys.readouterr().out
    assert "last/cont [rounds' IQR]" in out and "small_cnn  2:4   adamw" in out


@pytest.mark.parametrize(("argv", "message"), [
    (["--rounds", "1"], "Invalid --rounds value: 1"),
    (["--warmup", "-1"], "Invalid --warmup value: -1"),
    (["--patterns", "2:3:4"], "2:3:4"),
    (["--train-batch", "0"], "Invalid --train-batch value: 0"),
    (["--train-batch", "2", "--models", "gpt2_small"], "Invalid --models value: 'gpt2_small'"),
])
def test_bad_flags_are_refused_by_name(argv, message, capsys):
    with pytest.raises(SystemExit):
        layout_ab.main(argv)
    assert message in capsys.readouterr().err


def test_both_copies_step_through_the_fused_kernels():
    """Every BAME step is fused=True, which raises on a gradient laid out unlike its weight,
    so a run that returns its times stepped both copies through the kernels."""
    times = layout_ab.time_layouts("small_cnn", 2, 4, "adamw", 2, 0)
    assert set(times) == set(layout_ab.CONTENDERS)
    assert all(len(v) == 2 and min(v) > 0 for v in times.values())


def test_training_steps_of_both_layouts(capsys):
    """--train-batch: whole training steps of the three copies, the input in each copy's
    layout (fused=True would raise on gradients unlike their weights)."""
    rows = layout_ab.main(["--models", "resnet32", "--patterns", "1:16", "--rules", "sgd",
                           "--rounds", "2", "--warmup", "0", "--train-batch", "2"])
    assert [(r["model"], r["pattern"], r["rule"]) for r in rows] == [("resnet32", "1:16", "sgd")]
    assert all(rows[0][c] > 0 for c in layout_ab.CONTENDERS)
    assert "training steps of batch 2 (forward, backward, step)" in capsys.readouterr().out
