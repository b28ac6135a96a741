"""benchmarks.kept_step_cuda: a CPU smoke run of the code that times the fused kernels on CUDA."""

from __future__ import annotations

from benchmarks import kept_step_cuda


def test_cpu_smoke_run_times_every_kind_against_the_fused_baseline(capsys):
    argv = ["--device", "cpu", "--steps", "1", "--warmup", "0", "--no-compile",
            "--models", "small_cnn", "--patterns", "2:4"]
    rows = kept_step_cuda.main(argv)
    assert [row["rule"] for row in rows] == ["sgd", "adamw"]
    for row in rows:
        for kind in ("fused", "ordinary", "update"):
            assert row[f"{kind}_ms"] > 0 and row[f"{kind}_host_ms"] > 0
        assert row["update_ratio"] == row["update_ms"] / row["fused_ms"]
        assert "compiled_ms" not in row
    table = capsys.readouterr().out
    assert "| small_cnn | 2:4 | adamw |" in table and "(x fused)" in table
    assert "| ordinary host ms |" in table


def test_optimizers_are_torch_fused_and_bame_with_the_same_hyper_parameters():
    from torch import nn

    models = {kind: nn.Linear(8, 4) for kind in ("fused", "ordinary", "update")}
    optimizers = kept_step_cuda.make_optimizers(models, "adamw", 2, 4)
    assert optimizers["fused"].defaults["fused"] is True
    for kind in ("ordinary", "update"):
        defaults = optimizers[kind].defaults
        assert defaults["lr"] == 1e-3 and defaults["weight_decay"] == 0.05
        assert defaults["fused"] is True
    assert optimizers["update"].param_groups[-1]["delta_t"] == 1


def test_channels_last_smoke_run(capsys, monkeypatch):
    """--channels-last: BAME's models step in that format (fused=True, so their gradients
    must follow it), the fused baseline's stays contiguous."""
    layouts = {}
    make = kept_step_cuda.make_optimizers

    def spy(models, *args):
        layouts.update({kind: any(not p.is_contiguous() for p in model.parameters())
                        for kind, model in models.items()})
        return make(models, *args)

    monkeypatch.setattr(kept_step_cuda, "make_optimizers", spy)
    rows = kept_step_cuda.main(["--device", "cpu", "--steps", "1", "--warmup", "0",
                                "--no-compile", "--models", "small_cnn", "--patterns", "2:4",
                                "--rules", "sgd", "--channels-last"])
    assert layouts == {"fused": False, "ordinary": True, "update": True}
    assert rows[0]["ordinary_ms"] > 0 and rows[0]["update_ms"] > 0
    assert "BAME's models channels-last" in capsys.readouterr().out
