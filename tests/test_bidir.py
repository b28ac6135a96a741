"""Bidirectional masks: the input gradient uses an N:M weight along the output dimension,
the weight and bias gradients are unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bame_optim import BAMESGD
from bame_optim.core.nm import param_to_blocks
from bame_optim.peers.bidir import (
    BidirBAMESGD,
    _dense_reference,
    attach_backward_masks,
    backward_mask,
    backward_mask_as_param,
)

LAYERS = [
    (lambda: nn.Linear(16, 8), (5, 3, 16)),
    (lambda: nn.Conv1d(8, 8, 3, bias=False), (2, 8, 9)),
    (lambda: nn.Conv2d(8, 16, 3, padding=1, stride=2), (2, 8, 7, 7)),
    (lambda: nn.Conv2d(8, 8, 3, groups=2, dilation=2), (1, 8, 9, 9)),
]


@pytest.mark.parametrize(("make", "x_shape"), LAYERS)
def test_gradients_use_backward_mask_for_input_only(make, x_shape):
    torch.manual_seed(0)
    layer = make().double()
    opt = BidirBAMESGD([layer.weight], lr=0.1, n=1, m=4, t_i=0, t_f=0)
    layer.weight.grad = torch.randn_like(layer.weight)
    opt.step()
    opt.zero_grad()
    handles = attach_backward_masks(layer, opt)
    weight = layer.weight.detach().clone()
    masked = weight * backward_mask_as_param(opt.state[layer.weight]["backward_mask"], weight.shape)
    # W ⊙ Bᵀ is N:M along the output dimension
    assert (param_to_blocks(masked.transpose(0, 1), 4) != 0).sum(dim=1).le(1).all()

    x = torch.randn(x_shape, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y, _dense_reference(layer, x.detach(), weight))
    grad_out = torch.randn_like(y)
    y.backward(grad_out)

    x_ref = x.detach().clone().requires_grad_()
    w_ref = weight.clone().requires_grad_()
    (expected_x,) = torch.autograd.grad(_dense_reference(layer, x_ref, masked), x_ref, grad_out)
    (expected_w,) = torch.autograd.grad(_dense_reference(layer, x.detach(), w_ref), w_ref, grad_out)
    torch.testing.assert_close(x.grad, expected_x)
    torch.testing.assert_close(layer.weight.grad, expected_w)
    if layer.bias is not None:
        expected_b = grad_out.sum(dim=[d for d in range(grad_out.ndim) if d != 1])
        if isinstance(layer, nn.Linear):
            expected_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        torch.testing.assert_close(layer.bias.grad, expected_b)
    for handle in handles:
        handle.remove()
    x.grad = None
    layer(x).backward(grad_out)  # hooks removed: the ordinary backward again
    (dense_x,) = torch.autograd.grad(_dense_reference(layer, x_ref, weight), x_ref, grad_out)
    torch.testing.assert_close(x.grad, dense_x)
    assert not torch.allclose(dense_x, expected_x)


def test_backward_mask_keeps_largest_output_weights():
    w = torch.tensor([[4.0, 0.0], [1.0, 3.0], [2.0, 5.0], [3.0, 1.0]])  # [out=4, in=2]
    mask = backward_mask_as_param(backward_mask(w, 2, 4), w.shape)
    assert mask.T.tolist() == [[True, False, False, True], [False, True, True, False]]


def test_forward_masks_and_updates_equal_bamesgd():
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(8, 16, generator=gen).requires_grad_()
    q = p.detach().clone().requires_grad_()
    bidir = BidirBAMESGD([p], lr=0.1, momentum=0.9, n=2, m=4, t_i=3, t_f=12, delta_t=2)
    plain = BAMESGD([q], lr=0.1, momentum=0.9, n=2, m=4, t_i=3, t_f=12, delta_t=2)
    for _ in range(15):
        grad = torch.randn(8, 16, generator=gen)
        p.grad, q.grad = grad.clone(), grad.clone()
        bidir.step()
        plain.step()
    assert torch.equal(p, q)
    assert torch.equal(bidir.kept_mask(p), plain.kept_mask(q))


def test_attach_requires_bidir_optimizer():
    layer = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="Invalid optimizer value: BAMESGD"):
        attach_backward_masks(layer, BAMESGD(layer.parameters(), t_i=0, t_f=0))
