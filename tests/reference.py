"""A slow, obviously-correct BAME loop for one list of parameters, in the order DESIGN.md
sections 3 and 4 give, to compare :class:`bame_optim.BAMESGD` against.

The gradual and prune steps are written out per block in Python; LMA + OBF call
:func:`bame_optim.core.evolution.evolve_mask`, which ``test_evolution.py`` checks against its own
per-block float64 loop.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from bame_optim.core.evolution import evolve_mask
from bame_optim.core.nm import param_to_blocks, random_nm_mask
from bame_optim.optim.rules import SEED_STRIDE as _SEED_STRIDE


def blocks_of(tensor: torch.Tensor, m: int) -> torch.Tensor:
    return param_to_blocks(tensor, m)


def to_param(blocks: torch.Tensor, shape) -> torch.Tensor:
    moved = (shape[0], *shape[2:], shape[1])
    return blocks.reshape(moved).movedim(-1, 1)


def budget(t: int, n: int, m: int, t_i: int) -> int:
    if t >= t_i:
        return n
    return n + math.ceil((m - n) * (1 - Fraction(t, t_i)))


def keep_largest_kept(weight_blocks: torch.Tensor, kept: torch.Tensor, count: int) -> torch.Tensor:
    """Per block: the ``count`` largest |w| among kept entries, ties to the lower index."""
    new = torch.zeros_like(kept)
    for k in range(weight_blocks.shape[0]):
        candidates = [j for j in range(weight_blocks.shape[1]) if kept[k, j]]
        candidates.sort(key=lambda j: (-abs(float(weight_blocks[k, j])), j))
        for j in candidates[:count]:
            new[k, j] = True
    return new


class ReferenceBAME:
    """Sparse SGD with BAME masks on ``params`` (all sparse), float64 recommended."""

    def __init__(
        self,
        params,
        *,
        n,
        m,
        t_i,
        t_f,
        delta_t,
        alpha=0.5,
        beta=0.5,
        gamma=0.9,
        momentum=0.0,
        dampening=0.0,
        weight_decay=0.0,
        nesterov=False,
        seed=0,
        first_index=0,
        revive="sgd",
    ):
        self.params = params
        self.n, self.m, self.t_i, self.t_f, self.delta_t = n, m, t_i, t_f, delta_t
        self.alpha, self.beta, self.gamma = alpha, beta, gamma
        self.momentum, self.dampening = momentum, dampening
        self.weight_decay, self.nesterov, self.seed = weight_decay, nesterov, seed
        self.first_index = first_index
        self.revive = revive
        self.t = 0
        self.masks = [torch.ones(p.numel() // m, m, dtype=torch.bool) for p in params]
        self.oscillation = [torch.zeros(p.numel() // m, dtype=torch.float64) for p in params]
        self.buffers: list[torch.Tensor | None] = [None] * len(params)
        self.frozen = [0] * len(params)

    def is_update(self, t: int) -> bool:
        return t == self.t_i or (t < self.t_f and t % self.delta_t == 0)

    def step(self, grads: list[torch.Tensor], lr: float) -> None:
        t = self.t
        for i, (p, g) in enumerate(zip(self.params, grads, strict=True)):
            if self.is_update(t):
                changed = self.update_mask(i, p, g, lr, t)
                self.restart_buffers(i, changed)
            kept = to_param(self.masks[i], p.shape)
            self.update_weight(i, p, torch.where(kept, g, torch.zeros_like(g)), lr)
        self.t += 1

    def update_mask(self, i: int, p: torch.Tensor, g: torch.Tensor, lr: float, t: int):
        """Apply the rule of step ``t`` to mask ``i``; zero newly pruned weights; return the
        entries (parameter layout) whose mask flipped."""
        old = self.masks[i]
        w = blocks_of(p, self.m)
        if t == self.t_i and self.t_i == 0:
            gen = torch.Generator().manual_seed(self.seed * _SEED_STRIDE + self.first_index + i)
            new = random_nm_mask(old.shape[0], self.n, self.m, gen)
        elif t <= self.t_i:
            new = keep_largest_kept(w, old, budget(t, self.n, self.m, self.t_i))
        else:
            evo = evolve_mask(
                w,
                blocks_of(g, self.m),
                old,
                self.oscillation[i],
                n=self.n,
                lr=lr,
                alpha=self.alpha,
                beta=self.beta,
                gamma=self.gamma,
                revive=self.revive,
            )
            new, self.oscillation[i] = evo.kept, evo.oscillation
            self.frozen[i] = int(evo.frozen.sum())
        with torch.no_grad():
            p[to_param(old & ~new, p.shape)] = 0
        self.masks[i] = new
        return to_param(old != new, p.shape)

    def restart_buffers(self, i: int, changed: torch.Tensor) -> None:
        if self.buffers[i] is not None:
            self.buffers[i][changed] = 0

    def update_weight(self, i: int, p: torch.Tensor, g: torch.Tensor, lr: float) -> None:
        """SGD with momentum on the masked gradient ``g`` (zeros at pruned entries)."""
        d = g + self.weight_decay * p.detach()
        if self.momentum:
            if self.buffers[i] is None:
                self.buffers[i] = d.clone()
            else:
                self.buffers[i] = self.momentum * self.buffers[i] + (1 - self.dampening) * d
            d = d + self.momentum * self.buffers[i] if self.nesterov else self.buffers[i]
        with torch.no_grad():
            p.sub_(lr * d)


class ReferenceBAMEAdamW(ReferenceBAME):
    """BAME masks with AdamW on the kept weights, every moment dense (zeros at pruned
    entries, reset to 0 where the mask flips), one step count per parameter."""

    def __init__(self, params, *, betas=(0.9, 0.999), eps=1e-8, amsgrad=False, maximize=False,
                 revive="adam", **kwargs):
        super().__init__(params, revive=revive, **kwargs)
        self.betas, self.eps, self.amsgrad, self.maximize = betas, eps, amsgrad, maximize
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]
        self.max_exp_avg_sq = [torch.zeros_like(p) for p in params]
        self.steps = [0] * len(params)

    def restart_buffers(self, i: int, changed: torch.Tensor) -> None:
        for moments in (self.exp_avg, self.exp_avg_sq, self.max_exp_avg_sq):
            moments[i][changed] = 0

    def update_weight(self, i: int, p: torch.Tensor, g: torch.Tensor, lr: float) -> None:
        beta1, beta2 = self.betas
        g = -g if self.maximize else g
        self.steps[i] += 1
        s = self.steps[i]
        self.exp_avg[i] = beta1 * self.exp_avg[i] + (1 - beta1) * g
        self.exp_avg_sq[i] = beta2 * self.exp_avg_sq[i] + (1 - beta2) * g * g
        second = self.exp_avg_sq[i]
        if self.amsgrad:
            self.max_exp_avg_sq[i] = torch.maximum(self.max_exp_avg_sq[i], second)
            second = self.max_exp_avg_sq[i]
        denom = second.sqrt() / math.sqrt(1 - beta2**s) + self.eps
        with torch.no_grad():
            p.mul_(1 - lr * self.weight_decay)
            p.sub_(lr / (1 - beta1**s) * self.exp_avg[i] / denom)
