"""``python -m benchmarks.triton_host`` on the CPU: the real Triton entry points, their
kernels recorded instead of run, timed per rule."""

from __future__ import annotations

import torch

from bame_optim.kernels import triton_kept
from benchmarks import triton_host


def test_prints_one_row_per_rule_and_leaves_the_kernels_as_they_were(capsys):
    kernels = triton_kept._kernels()
    before = kernels.kept_sgd_kernel, kernels.kept_adamw_kernel, triton_kept.interpreting
    triton_host.main(["--models", "resnet32", "--rounds", "2"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| resnet")]
    assert [row.split("|")[3].strip() for row in rows] == ["sgd", "adamw"]
    for row in rows:
        sparse, per_step, per_weight = (float(cell) for cell in row.split("|")[4:7])
        assert sparse == 30 and per_step > 0 and abs(per_weight * sparse - per_step) <= sparse
    after = kernels.kept_sgd_kernel, kernels.kept_adamw_kernel, triton_kept.interpreting
    assert after == before
    assert torch.is_grad_enabled()  # no global switch left behind
