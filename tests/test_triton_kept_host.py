"""The host side of the Triton kept step (no kernel runs): what ``supports`` answers, the
signatures and layouts of ``_items`` (cached by the tensors' metadata) and the launch table of
``_launch``, whose addresses are read at every call."""

from __future__ import annotations

import pytest
import torch

from bame_optim.kernels import triton_kept


@pytest.fixture
def on_cpu(monkeypatch):
    """The CPU as the kernels' device (as under ``TRITON_INTERPRET=1``), without Triton."""
    monkeypatch.setattr(triton_kept, "interpreting", lambda: True)


def test_division_magic_divides_every_int32_index_exactly():
    gen = torch.Generator().manual_seed(0)
    top = 2**31 - 1
    divisors = [*range(1, 2049), top, top - 1, 2**30, 2**30 + 1, 2**30 - 1, 3 * 2**20 + 7]
    divisors += [2**k + e for k in range(11, 31) for e in (-1, 0, 1)]
    divisors += torch.randint(1, top, (2000,), generator=gen).tolist()
    for d in divisors:
        magic, shift = triton_kept.division_magic(d)
        assert 0 < magic < 2**32 and shift <= 62  # the kernels multiply in uint64
        edges = {0, 1, d - 1, d, d + 1, 2 * d - 1, top, top - 1, top - top % d, top - top % d - 1}
        numbers = [n for n in edges if 0 <= n <= top]
        numbers += torch.randint(0, top, (64,), generator=gen).tolist()
        for n in numbers:
            assert (n * magic) >> shift == n // d, (n, d)
    for bad in (0, -3, 2**31, 1.5, True):
        with pytest.raises(ValueError, match="Invalid d value"):
            triton_kept.division_magic(bad)


def test_a_parameter_spanning_too_far_for_int32_gets_an_int64_launch(monkeypatch):
    # The span counts strides' reach (a transposed view spans its whole storage) and the
    # compact state's entries past the last program's end; the threshold is lowered to fall
    # between the two parameters.
    monkeypatch.setattr(triton_kept, "interpreting", lambda: True)
    monkeypatch.setattr(triton_kept, "_INT32_SPAN", 3000)
    small = torch.zeros(4, 8)  # spans 32; compact state (8 + 1024) * 2 = 2064
    large = torch.zeros(64, 32).t()  # [32, 64], strides (1, 32): spans 2048; (512 + 1024) * 2
    codes = [torch.zeros(8, dtype=torch.uint8), torch.zeros(512, dtype=torch.uint8)]
    items = triton_kept._items([small, large], [small.clone(), large.clone()], codes, [2, 2], 4)
    assert [key[-1] for _, key, _ in items] == [False, True]


def test_supports_answers_for_each_call_s_tensors(on_cpu):
    # Answers are cached by metadata: the same parameter with another gradient, or the same
    # metadata with a neg bit (not in the key), must get its own answer.
    param = torch.zeros(4, 8, 2, 2, 3)
    folding = torch.zeros_like(param)
    unfolding = torch.zeros(4, 2, 8, 3, 2).permute(0, 2, 1, 4, 3)  # dims 0, 2, 3, 4 stay apart
    assert unfolding.shape == param.shape
    answers = [triton_kept.supports(param, g) for g in (folding, unfolding, folding)]
    assert answers == [True, False, True]
    assert not triton_kept.supports(param, folding._neg_view())
    assert not triton_kept.supports(param, folding.double())
    assert not triton_kept.supports(param, None)
    assert not triton_kept.supports(param.flatten(), folding.flatten())  # ndim 1


def test_items_follow_the_kept_form_and_raise_on_a_code_of_another_shape(on_cpu):
    param = torch.zeros(4, 8)
    ranks = torch.zeros(8, dtype=torch.uint8)
    positions = torch.zeros(8, 2, dtype=torch.int64)
    for code, ranked in ((ranks, True), (positions, False), (ranks, True)):
        ((_, (_, _, count, is_ranked, code_dtype, _), layout),) = triton_kept._items(
            [param], [param.clone()], [code], [2], 4)
        assert (count, is_ranked, code_dtype) == (2, ranked, code.dtype)
        assert layout[:2] == (8, 2)  # blocks, blocks per row
    assert triton_kept._items([param], [param.clone()], [ranks], [0], 4) == []  # nothing kept
    with pytest.raises(ValueError, match="Invalid kept form"):
        triton_kept._items([param], [param.clone()], [torch.zeros(7, dtype=torch.uint8)], [2], 4)
    with pytest.raises(ValueError, match="not divisible by m"):
        triton_kept._items([torch.zeros(4, 6)], [torch.zeros(4, 6)], [ranks], [2], 4)
    with pytest.raises(ValueError, match="Invalid parameter"):
        triton_kept._items([param], [param.double()], [ranks], [2], 4)


def test_launch_table_holds_each_call_s_addresses(on_cpu):
    kernels = pytest.importorskip("bame_optim.kernels._triton_kept_kernels")
    params = [torch.zeros(4, 8), torch.zeros(2, 4, 3, 3)]
    codes = [torch.zeros(8, dtype=torch.uint8), torch.zeros(18, dtype=torch.uint8)]
    buffers = [torch.zeros(8, 2), torch.zeros(18, 2)]
    for _ in range(2):  # new gradients each step, as zero_grad(set_to_none=True) gives
        grads = [torch.zeros_like(p) for p in params]
        items = triton_kept._items(params, grads, codes, [2, 2], 4)
        rows = [(i, layout, ()) for i, _, layout in items]
        (programs,), table, _, _, _ = triton_kept._launch(rows, items[0][1], params, grads,
                                                          [buffers], codes, 4)
        assert table.dtype == torch.int64 and table.shape == (2, kernels.ROW.value)
        for row, (i, layout, _) in zip(table.tolist(), rows, strict=True):
            assert row[kernels.PARAM.value] == params[i].data_ptr()
            assert row[kernels.GRAD.value] == grads[i].data_ptr()
            assert row[kernels.KEPT.value] == codes[i].data_ptr()
            assert row[kernels.STATE.value] == buffers[i].data_ptr()
            assert tuple(row[kernels.BLOCKS.value:kernels.FIRST_PROGRAM.value]) == layout
        assert table[:, kernels.FIRST_PROGRAM.value].tolist() == [0, 1] and programs == 2


def test_advance_steps_every_counter_once_and_reads_them_back():
    # AdamW's step counters: CPU scalars, as torch keeps them (one in float64, as a checkpoint
    # of a float64 default dtype has), one op for all.
    steps = [torch.tensor(0.0), torch.tensor(41.0), torch.tensor(6.0, dtype=torch.float64)]
    assert triton_kept._advance(steps) == [1.0, 42.0, 7.0]
    assert [s.item() for s in steps] == [1.0, 42.0, 7.0]
    assert steps[2].dtype == torch.float64
    assert triton_kept._advance([]) == []
