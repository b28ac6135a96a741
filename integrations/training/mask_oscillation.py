"""Mask oscillation, the paper's Figure 2: :class:`MaskOscillation` accumulates each N:M block's
SAD (Eq. 7) over a run from ``optimizer.kept_mask(p)``, and summarizes it per layer."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..accelerate import unwrap_optimizer

__all__ = ["MaskOscillation"]


class MaskOscillation:
    """Accumulated SAD (Eq. 7) per N:M block, read from ``optimizer.kept_mask(p)``.

    Call :meth:`after_step` after every ``optimizer.step()`` (skipped ones included). It reads
    the masks when a real step ran whose counter ``t`` is a mask-update step of its group
    (the optimizer's ``mask_update_due``), or after every real step when
    ``every_step`` (methods whose masks move at every step). For every sparse parameter,
    ``SAD_k = sum_m |B_old[k, m] - B_new[k, m]|`` is added to ``sad[name][k]`` for the blocks
    whose old mask kept exactly ``n`` weights (the N:M phase: BAME's gradual pruning is not
    counted as oscillation). :attr:`cycles` counts the reads that compared N:M blocks.

    The state (:meth:`state_dict`) holds the totals; the previous masks are read again from the
    optimizer on construction, which is exact after a resume since masks do not change between
    steps.
    """

    def __init__(self, optimizer: Optimizer, *, every_step: bool = False) -> None:
        self.optimizer = unwrap_optimizer(optimizer)
        self.every_step = every_step
        self.sad: dict[str, Tensor] = {}
        self._cycles: Tensor | int = 0
        self._params: list[tuple[str, Tensor, int]] = []
        for g, group in enumerate(self.optimizer.param_groups):
            names = group.get("param_names")
            for j, p in enumerate(group["params"]):
                if group.get("sparse", False):
                    name = names[j] if names else f"group{g}.param{j}"
                    self._params.append((name, p, group["n"]))
        self._last = {name: self.optimizer.kept_mask(p) for name, p, _ in self._params}
        self._seen = self._steps()

    def _steps(self) -> list[int]:
        return [group["step"] for group in self.optimizer.param_groups]

    def _due(self, old: list[int], new: list[int]) -> bool:
        if self.every_step:
            return old != new
        groups = self.optimizer.param_groups
        return any(
            self.optimizer.mask_update_due(g, t)
            for g, a, b in zip(groups, old, new, strict=True)
            for t in range(a, b)
        )

    def after_step(self) -> bool:
        """Read the masks if a real step since the last call may have changed them; returns
        whether it read them."""
        steps = self._steps()
        old, self._seen = self._seen, steps
        if not self._due(old, steps):
            return False
        compared: Tensor | None = None  # any N:M block compared (on the device: no sync)
        for name, p, n in self._params:
            new = self.optimizer.kept_mask(p)
            previous = self._last[name]
            self._last[name] = new
            if new is None or previous is None:
                continue
            at_budget = previous.sum(dim=-1) == n
            change = (previous != new).sum(dim=-1, dtype=torch.int32) * at_budget
            total = self.sad.get(name)
            self.sad[name] = change if total is None else total + change
            compared = at_budget.any() if compared is None else compared | at_budget.any()
        if compared is not None:
            self._cycles = self._cycles + compared.to(torch.int64)
        return True

    @property
    def cycles(self) -> int:
        """Reads that compared two masks in at least one N:M block (the paper's LMA cycles
        ``c`` of Eq. 7, for BAME)."""
        return int(self._cycles)

    def total(self) -> int:
        """All accumulated SAD (mask entries that changed, summed over reads)."""
        return int(sum(int(t.sum()) for t in self.sad.values()))

    def state_dict(self) -> dict[str, Any]:
        """``{"sad": {name: int32 [K] CPU tensor}, "cycles": int}``."""
        return {"sad": {k: v.cpu() for k, v in self.sad.items()}, "cycles": self.cycles}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the totals of :meth:`state_dict` (onto the parameters' devices)."""
        devices = {name: p.device for name, p, _ in self._params}
        self.sad = {k: v.to(devices.get(k, torch.device("cpu"))) for k, v in state["sad"].items()}
        self._cycles = int(state["cycles"])

    def summary(self) -> dict[str, Any]:
        """Per layer and overall: blocks, total and maximum SAD, the share of blocks that never
        changed, and the share of all changes held by the 10% most-changed blocks."""
        layers = {name: _sad_summary(t.cpu()) for name, t in self.sad.items()}
        every = torch.cat([t.cpu() for t in self.sad.values()]) if self.sad else None
        overall = _sad_summary(every) if every is not None else {}
        return {"cycles": self.cycles, "overall": overall, "layers": layers}


def _sad_summary(sad: Tensor) -> dict[str, Any]:
    blocks = sad.numel()
    total = int(sad.sum())
    top = max(1, blocks // 10)
    top_total = int(sad.sort(descending=True).values[:top].sum()) if blocks else 0
    return {
        "blocks": blocks,
        "total": total,
        "max": int(sad.max()) if blocks else 0,
        "mean": total / blocks if blocks else 0.0,
        "never_changed": float((sad == 0).float().mean()) if blocks else 1.0,
        "top10_share": top_total / total if total else 0.0,
    }
