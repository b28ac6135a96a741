"""bame_optim.kernels.block_layout: the folded block layouts the kernels read parameters
through, on known layouts, and that the cache behind them never leaks a shared list."""

from __future__ import annotations

import torch

from bame_optim.kernels.block_layout import folded_layouts


def test_a_contiguous_linear_weight_is_one_outer_dimension():
    w = torch.zeros(6, 8)
    assert folded_layouts(w) == [[1, 6, 0, 0, 8, 1]]


def test_a_transposed_view_keeps_its_strides():
    w = torch.zeros(8, 6).t()  # [6, 8] with dimension 1 at stride 6
    assert folded_layouts(w) == [[1, 6, 0, 0, 1, 6]]


def test_a_conv_weight_folds_its_kernel_dimensions():
    w = torch.zeros(4, 8, 3, 3)  # out at stride 72, kernel positions 3 x 3 fold into 9 at 1
    assert folded_layouts(w) == [[4, 9, 0, 72, 1, 9]]


def test_weight_and_gradient_fold_only_where_both_do():
    w = torch.zeros(4, 8, 3, 3).contiguous(memory_format=torch.channels_last)
    g = torch.zeros(4, 8, 3, 3)
    w_layout, g_layout = folded_layouts(w, g)
    assert w_layout[:2] == g_layout[:2] == [4, 9]  # kh, kw fold in both; out does not
    assert w_layout[2:] == [0, 72, 8, 1] and g_layout[2:] == [0, 72, 1, 9]
    (alone,) = folded_layouts(w)
    assert alone[:2] == [1, 36]  # channels_last alone folds out, kh, kw into one


def test_four_unfoldable_outer_dimensions_are_none():
    w = torch.zeros(2, 3, 4, 5, 6).permute(0, 1, 3, 2, 4)  # nothing folds: four outer dims
    assert folded_layouts(w) is None


def test_the_result_is_a_copy_each_time():
    w = torch.zeros(6, 8)
    first = folded_layouts(w)
    first[0][0] = 99  # a caller that writes into its layout
    assert folded_layouts(w) == [[1, 6, 0, 0, 8, 1]]
