"""benchmarks.kernel_ab: the other source tree is the one asked for, built under a name of its
own, and steps exactly as this checkout's module does when built from the same sources."""

from __future__ import annotations

import subprocess

import pytest
import torch

from bame_optim.core.kept import encode_kept
from bame_optim.core.nm import random_nm_mask
from bame_optim.kernels import kept_adamw_cpu, kept_sgd_cpu, native
from benchmarks import kernel_ab

from .test_kept_sgd_cpu import require_kernel


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--rounds", "5"], "one of the arguments --against --csrc is required"),
        (["--against", "HEAD", "--rounds", "1"], "Invalid --rounds value: 1 (at least 2)"),
        (["--against", "HEAD", "--threads", "0"], "Invalid --threads value: 0 (at least 1)"),
        (["--csrc", "/nonexistent/csrc"], "Invalid --csrc value: /nonexistent/csrc"),
        (["--against", "HEAD", "--shapes", "64x0x3x3"], "Invalid --shapes value: '64x0x3x3'"),
        (["--against", "HEAD", "--shapes", "64"], "Invalid --shapes value: '64'"),
        (["--against", "HEAD", "--shapes", "8x16*two"], "Invalid --shapes value: '8x16*two'"),
        (["--against", "HEAD", "--shapes", "8x16*0"], "Invalid --shapes value: '8x16*0'"),
        (["--against", "HEAD", "--shapes", "8x24", "--patterns", "1:16"],
         "Invalid --shapes value: 8x24 (dim 1, 24, is not a multiple of M = 16 of 1:16)"),
        (["--against", "HEAD", "--shapes", "8x16", "--models", "resnet50"],
         "argument --models: not allowed with argument --shapes"),
        (["--against", "HEAD", "--shapes", "8x16", "--layers", "3x3"],
         "Invalid --layers value: --layers chooses among a model's weights"),
    ],
)
def test_bad_arguments_are_refused_by_name(argv, message, capsys):
    with pytest.raises(SystemExit):
        kernel_ab.parse_args(argv)
    assert message in capsys.readouterr().err


def test_sources_at_a_revision_are_that_revisions_files(tmp_path):
    folder = kernel_ab.sources_at("HEAD", tmp_path)
    committed = subprocess.run(
        ["git", "show", f"HEAD:{kernel_ab.CSRC}/kept_move.h"], cwd=kernel_ab.ROOT,
        capture_output=True, check=True,
    ).stdout
    assert (folder / "kept_move.h").read_bytes() == committed
    assert {p.name for p in native.SOURCES} <= {p.name for p in folder.iterdir()}
    with pytest.raises(SystemExit, match="Invalid --against value: 'no-such-revision'"):
        kernel_ab.sources_at("no-such-revision", tmp_path / "other")


def test_a_build_of_this_checkouts_sources_steps_bit_for_bit_as_the_native_module(capsys):
    require_kernel(kept_adamw_cpu)
    other = kernel_ab.build(native.CSRC)
    ours = native.load()
    assert other.__name__.startswith(kernel_ab.BUILD_NAME) and other is not ours
    gen = torch.Generator().manual_seed(0)
    shapes = [(8, 16, 3, 3), (6, 32)]
    weights = [torch.randn(s, generator=gen) for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    kept = [encode_kept(random_nm_mask(w.numel() // 16, 1, 16, gen), 1) for w in weights]
    tables, codes = kept_sgd_cpu.tables_for(kept, [1, 1], 16)
    results = []
    for module in (ours, other):
        ws = [w.clone() for w in weights]
        buffers = [torch.ones(w.numel() // 16, 1) for w in weights]
        module.fused_kept_sgd(ws, grads, buffers, kept, tables, codes, 16, 0.1, 0.9, 0.0, 5e-4,
                              False, False, kept_sgd_cpu.fma(), True)
        results.append(ws + buffers)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(results[0][0], weights[0])  # it stepped

    # AdamW through the other build's binding, with the rounding flags this checkout probed,
    # as the package's own entry point steps (its step counts at 5 give bias corrections of 6).
    lr, b1, b2, wd, eps = 1e-3, 0.9, 0.999, 0.05, 1e-8
    moments = [[torch.rand(w.numel() // 16, 1, generator=gen) for w in weights] for _ in "mv"]
    ws = [w.clone() for w in weights]
    m1, m2 = ([t.clone() for t in ts] for ts in moments)
    other.fused_kept_adamw(
        ws, grads, m1, m2, [], kept, tables, [1, 1], [lr / (1 - b1**6)] * 2,
        [(1 - b2**6) ** 0.5] * 2, 16, lr, b1, b2, wd, eps, False, False, kept_sgd_cpu.fma(),
        kept_adamw_cpu.fma_addcmul(), True)
    expected = [w.clone() for w in weights]
    e1, e2 = ([t.clone() for t in ts] for ts in moments)
    kept_adamw_cpu.fused_kept_adamw_(
        expected, grads, e1, e2, [], [torch.tensor(5.0) for _ in weights], kept, [1, 1], m=16,
        amsgrad=False, beta1=b1, beta2=b2, lr=lr, weight_decay=wd, eps=eps, maximize=False,
        avx512=True)
    for a, b in zip(ws + m1 + m2, expected + e1 + e2, strict=True):
        assert torch.equal(a, b)

    rows = kernel_ab.main(["--csrc", str(native.CSRC), "--models", "small_cnn", "--patterns",
                           "1:4", "--rounds", "2", "--warmup", "0"])
    assert [(r["model"], r["pattern"], r["rule"]) for r in rows] == [
        ("small_cnn", "1:4", "sgd"), ("small_cnn", "1:4", "adamw")]
    assert all(r[c] > 0 for r in rows for c in kernel_ab.CONTENDERS)
    out = capsys.readouterr().out
    assert "A: this checkout, B: " in out and "A/torch B/torch    A/B" in out


def test_shapes_are_the_weights_timed(monkeypatch, capsys):
    assert kernel_ab.weight_shapes("8x16x3x3*3") == [torch.Size([8, 16, 3, 3])] * 3
    assert kernel_ab.weight_shapes("6x32") == [torch.Size([6, 32])]
    require_kernel(kept_adamw_cpu)
    timed = []

    def steps(modules, shapes, n, m, rule, channels_last):
        timed.append((shapes, n, m, rule, channels_last))
        return {c: (lambda: None) for c in kernel_ab.CONTENDERS}

    monkeypatch.setattr(kernel_ab, "steps", steps)
    argv = ["--csrc", str(native.CSRC), "--shapes", "8x16x3x3*2", "6x32", "--patterns", "1:16",
            "--rules", "sgd", "--rounds", "2"]
    rows = kernel_ab.main(argv)
    shapes = [torch.Size([8, 16, 3, 3])] * 2 + [torch.Size([6, 32])]
    assert timed == [(shapes, 1, 16, "sgd", False)]
    assert [(r["model"], r["pattern"], r["rule"]) for r in rows] == [("shapes", "1:16", "sgd")]
    assert "shapes 8x16x3x3*2 6x32*1;" in capsys.readouterr().out
    kernel_ab.main([*argv, "--channels-last"])
    assert timed[1] == (shapes, 1, 16, "sgd", True)
    assert "shapes 8x16x3x3*2 6x32*1, A channels_last;" in capsys.readouterr().out


@pytest.mark.parametrize("rule", ["sgd", "adamw"])
def test_channels_last_steps_take_channels_last_tensors(rule):
    """With channels_last module A steps its 4-D weights and gradients in that format (the
    kernels' row paths) and leaves them there, B its contiguous ones, to the same values."""
    require_kernel(kept_adamw_cpu)
    module = native.load()
    shapes = [torch.Size([8, 16, 3, 3]), torch.Size([6, 32])]
    for channels_last in (False, True):
        calls = kernel_ab.steps({"A": module, "B": module}, shapes, 2, 4, rule, channels_last)
        for call in calls.values():
            call()
        # each module's weights and gradients: default arguments of its call
        (_, a, a_grads, *_), (_, b, b_grads, *_) = (calls[x].__defaults__ for x in "AB")
        assert a[0].is_contiguous() != channels_last and a_grads[0].stride() == a[0].stride()
        assert a[0].is_contiguous(memory_format=torch.channels_last) or not channels_last
        assert b[0].is_contiguous() and b_grads[0].is_contiguous() and a[1].is_contiguous()
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
