"""Slow, readable BAME optimizers over one list of parameters, every one sparse: SGD
(:class:`ReferenceBAME`) and AdamW (:class:`ReferenceBAMEAdamW`) on the kept weights, masks
from :mod:`.evolution`. Buffers are dense (zeros at pruned entries, reset where a mask flips),
so nothing here depends on the engine's compact state. Use float64 parameters."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .evolution import (
    evolve_blocks,
    gradual_budget,
    keep_largest,
    random_start,
    to_blocks,
    to_param,
)

__all__ = ["SEED_STRIDE", "ReferenceBAME", "ReferenceBAMEAdamW"]

SEED_STRIDE = 1_000_003
"""The static start of parameter ``i`` is drawn from a generator seeded with
``seed * SEED_STRIDE + i`` (the value :mod:`bame_optim.optim.rules` uses; a test checks)."""


class ReferenceBAME:
    """Sparse SGD with BAME masks on ``params`` (all sparse), in the order of docs/design.md
    sections 2-4: on an update step the rule of its phase (a seeded random start at
    ``t = t_i = 0``, the gradual budget's largest ``|W|`` until ``t_i``, LMA + OBF until
    ``t_f``), newly pruned weights set to 0 and flipped entries' buffers to 0; then SGD on the
    masked gradient. ``step(grads, lr)`` takes the gradients and this step's learning rate."""

    def __init__(
        self,
        params: list[Tensor],
        *,
        n: int,
        m: int,
        t_i: int,
        t_f: int,
        delta_t: int,
        alpha: float = 0.5,
        beta: float = 0.5,
        gamma: float = 0.9,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        seed: int = 0,
        first_index: int = 0,
        revive: str = "sgd",
    ) -> None:
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
        self.buffers: list[Tensor | None] = [None] * len(params)
        self.frozen = [0] * len(params)

    def is_update(self, t: int) -> bool:
        return t == self.t_i or (t < self.t_f and t % self.delta_t == 0)

    def step(self, grads: list[Tensor], lr: float) -> None:
        t = self.t
        for i, (p, g) in enumerate(zip(self.params, grads, strict=True)):
            if self.is_update(t):
                changed = self.update_mask(i, p, g, lr, t)
                self.restart_buffers(i, changed)
            kept = to_param(self.masks[i], p.shape)
            self.update_weight(i, p, torch.where(kept, g, torch.zeros_like(g)), lr)
        self.t += 1

    def update_mask(self, i: int, p: Tensor, g: Tensor, lr: float, t: int) -> Tensor:
        """Apply the rule of step ``t`` to mask ``i``; zero newly pruned weights; return the
        entries (parameter layout) whose mask flipped."""
        old = self.masks[i]
        w = to_blocks(p.detach(), self.m)
        if t == self.t_i and self.t_i == 0:
            gen = torch.Generator().manual_seed(self.seed * SEED_STRIDE + self.first_index + i)
            new = random_start(old.shape[0], self.n, self.m, gen)
        elif t <= self.t_i:
            new = keep_largest(w, old, gradual_budget(t, self.n, self.m, self.t_i))
        else:
            result = evolve_blocks(
                w, to_blocks(g, self.m), old, self.oscillation[i], n=self.n, lr=lr,
                alpha=self.alpha, beta=self.beta, gamma=self.gamma, revive=self.revive,
            )
            new = torch.tensor(result["kept"], dtype=torch.bool).reshape(old.shape)
            self.oscillation[i] = torch.tensor(result["oscillation"], dtype=torch.float64)
            self.frozen[i] = sum(result["frozen"])
        with torch.no_grad():
            p[to_param(old & ~new, p.shape)] = 0
        self.masks[i] = new
        return to_param(old != new, p.shape)

    def restart_buffers(self, i: int, changed: Tensor) -> None:
        if self.buffers[i] is not None:
            self.buffers[i][changed] = 0

    def update_weight(self, i: int, p: Tensor, g: Tensor, lr: float) -> None:
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
    entries, reset to 0 where the mask flips), one step count per parameter; LMA's revive
    score is ``η |G|`` unless ``revive="sgd"``."""

    def __init__(
        self,
        params: list[Tensor],
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        amsgrad: bool = False,
        maximize: bool = False,
        revive: str = "adam",
        **kwargs,
    ) -> None:
        super().__init__(params, revive=revive, **kwargs)
        self.betas, self.eps, self.amsgrad, self.maximize = betas, eps, amsgrad, maximize
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]
        self.max_exp_avg_sq = [torch.zeros_like(p) for p in params]
        self.steps = [0] * len(params)

    def restart_buffers(self, i: int, changed: Tensor) -> None:
        for moments in (self.exp_avg, self.exp_avg_sq, self.max_exp_avg_sq):
            moments[i][changed] = 0

    def update_weight(self, i: int, p: Tensor, g: Tensor, lr: float) -> None:
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
