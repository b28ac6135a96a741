"""RigL restricted to N:M blocks: one swap per block at most, by |W| and |G|."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from bame_optim import BAMESGD
from bame_optim.optim.rules import rigl_mask
from bame_optim.optim.sgd import RigLSGD

from .strategies import MODERATE, nm_patterns


def _reference(weight, grad, kept, n):
    """Per block in float64: drop the smallest |w| kept (lower index on ties), then grow the
    largest |g| among the non-survivors, the dropped weight winning ties, then lower index."""
    new = torch.zeros_like(kept)
    for k in range(kept.shape[0]):
        kept_idx = [j for j in range(kept.shape[1]) if kept[k, j]]
        kept_idx.sort(key=lambda j: (-abs(float(weight[k, j])), j))
        survivors = kept_idx[: n - 1]
        candidates = [j for j in range(kept.shape[1]) if j not in survivors]
        candidates.sort(key=lambda j: (-abs(float(grad[k, j])), not kept[k, j], j))
        for j in [*survivors, candidates[0]]:
            new[k, j] = True
    return new


@MODERATE
@given(nm_patterns, st.integers(1, 12), st.integers(0, 2**16), st.booleans())
def test_rigl_mask_matches_reference(pattern, k, seed, ties):
    n, m = pattern
    gen = torch.Generator().manual_seed(seed)
    kept = torch.rand(k, m, generator=gen).argsort(dim=1).argsort(dim=1) < n
    if ties:  # integer values force ties in both |W| and |G|
        weight = torch.randint(-2, 3, (k, m), generator=gen).double() * kept
        grad = torch.randint(-2, 3, (k, m), generator=gen).double()
    else:
        weight = torch.randn(k, m, generator=gen, dtype=torch.float64) * kept
        grad = torch.randn(k, m, generator=gen, dtype=torch.float64)
    new = rigl_mask(weight, grad, kept, n)
    assert torch.equal(new, _reference(weight, grad, kept, n))
    assert (new.sum(dim=1) == n).all()
    assert ((new != kept).sum(dim=1) <= 2).all(), "at most one swap per block"


def test_rigl_optimizer_keeps_schedule_and_freezes_nothing():
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(8, 16, generator=gen).requires_grad_()
    q = p.detach().clone().requires_grad_()
    rigl = RigLSGD([p], lr=0.1, n=2, m=8, t_i=4, t_f=20, delta_t=2)
    bame = BAMESGD([q], lr=0.1, n=2, m=8, t_i=4, t_f=20, delta_t=2)
    for step in range(24):
        grad = torch.randn(8, 16, generator=gen)
        p.grad, q.grad = grad.clone(), grad.clone()
        rigl.step()
        bame.step()
        if step <= 4:  # gradual and prune phases are BAME's
            assert torch.equal(rigl.kept_mask(p), bame.kept_mask(q))
        assert rigl.state[p]["last_frozen"] == 0
        if step >= 4:
            assert (rigl.kept_mask(p).sum(dim=1) == 2).all()
        assert "oscillation" not in rigl.state[p]  # no OBF: nothing to track
    assert (p.detach()[~rigl.kept_mask(p).reshape(8, 16)] == 0).all()
