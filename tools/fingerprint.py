"""The 60-step fingerprint: one hash per method of the registry (and per FLOPs figure) that a
refactoring must leave unchanged, bit for bit.

Every method of :data:`bame_optim.methods.METHODS` trains a small conv + linear + attention
model for 60 steps (``delta_t = 3``: gradual, prune, evolve and frozen phases) at 2:4 and 1:4,
with its default fused path and, where it takes ``fused``, with ``fused=False``. Each run is
hashed over its losses, its final parameters, its ``state_dict()`` (every tensor's dtype, shape
and bytes, every group setting) and its ``sparsity_report()``. The FLOPs figures (every
profile's exact ratio on the same model and on ResNet-32, and ``benchmarks.flops_table``'s
output) are hashed too. One CPU thread, so every run is deterministic::

    TORCH_EXTENSIONS_DIR=.torch_ext .venv/bin/python tools/fingerprint.py > before.txt
    ... change the code ...
    TORCH_EXTENSIONS_DIR=.torch_ext .venv/bin/python tools/fingerprint.py | diff before.txt -
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, run as a script

STEPS = 60
DELTA_T = 3
PATTERNS = ((2, 4), (1, 4))
HYPER = {
    "sgd": {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3, "nesterov": True},
    "adamw": {"lr": 1e-2, "weight_decay": 1e-2},
}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3)
        self.fc = nn.Linear(32, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(F.relu(self.conv(x)).flatten(1)).unsqueeze(1).expand(-1, 4, -1)
        h = self.attn(h, h, h, need_weights=False)[0].mean(1)
        return self.head(F.relu(h))


class Digest:
    def __init__(self) -> None:
        self.sha = hashlib.sha256()

    def add(self, value: Any) -> None:
        if isinstance(value, Tensor):
            shape = value.shape
            value = value.detach().cpu().contiguous().reshape(-1)
            self.sha.update(f"T{value.dtype}{tuple(shape)}".encode())
            self.sha.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
        elif isinstance(value, dict):
            for key in sorted(value, key=repr):
                self.add(repr(key))
                self.add(value[key])
        elif isinstance(value, (list, tuple)):
            self.sha.update(f"L{len(value)}".encode())
            for item in value:
                self.add(item)
        else:
            self.sha.update(repr(value).encode())

    def hex(self) -> str:
        return self.sha.hexdigest()[:16]


def run(method: str, n: int, m: int, **extra: Any) -> str:
    from bame_optim import nm_param_groups
    from bame_optim.methods import METHODS, make_optimizer

    torch.manual_seed(0)
    model = Net()
    record = METHODS[method]
    groups = nm_param_groups(model, n, m, exclude=())
    opt = make_optimizer(method, groups, n=n, m=m, total_steps=STEPS, delta_t=DELTA_T,
                         **HYPER[record.optimizer], **extra)
    if record.attach is not None:
        record.attach(model, opt)
    digest = Digest()
    generator = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x = torch.randn(8, 4, 4, 4, generator=generator)
        y = torch.randint(0, 4, (8,), generator=generator)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        digest.add(loss)
    digest.add(list(model.state_dict().values()))
    digest.add(opt.state_dict())
    if hasattr(opt, "sparsity_report"):
        digest.add(opt.sparsity_report())
    return digest.hex()


def flops_lines() -> list[str]:
    from bame_apps.integrations.models import resnet32
    from bame_optim.flops import FlopsProfile, flops_breakdown, layer_flops
    from bame_optim.methods import METHODS
    from benchmarks import flops_table

    names = [*METHODS, FlopsProfile.BIMASK.value, FlopsProfile.LBC_LOWER.value]
    lines = []
    for label, model, shape in (("net", Net(), (4, 4, 4)), ("resnet32", resnet32(), (3, 32, 32))):
        for n, m in PATTERNS:
            digest = Digest()
            layers = layer_flops(model, shape, n=n, m=m, exclude=())
            digest.add([repr(layer) for layer in layers])
            for method in names:
                for t_i, t_f in ((None, None), (0, 30), (30, 30)):
                    extra = {"t_i": t_i, "t_f": t_f} if method != "asp" else {}
                    digest.add(dict(flops_breakdown(layers, method, n=n, m=m, total_steps=90,
                                                    delta_t=7, **extra)))
            lines.append(f"flops {label} {n}:{m} {digest.hex()}")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        flops_table.main()
    lines.append(f"flops_table {hashlib.sha256(out.getvalue().encode()).hexdigest()[:16]}")
    return lines


def main() -> None:
    from bame_optim.kernels import native
    from bame_optim.methods import METHODS, accepted_keywords

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    print(f"native kernels: {'loaded' if native.load() is not None else 'unavailable'}")
    for method in METHODS:
        for n, m in PATTERNS:
            print(f"{method} {n}:{m} {run(method, n, m)}")
            if "fused" in accepted_keywords(method) and METHODS[method].factory not in (
                torch.optim.SGD, torch.optim.AdamW
            ):
                print(f"{method} {n}:{m} fused=False {run(method, n, m, fused=False)}")
    for line in flops_lines():
        print(line)


if __name__ == "__main__":
    main()
