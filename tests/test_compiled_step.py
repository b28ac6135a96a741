"""``torch.compile`` of a BAME optimizer's whole ``step`` (what ``benchmarks.kept_step_cuda``
times on CUDA as "compiled"), here on the CPU: it runs, and steps as the eager optimizer does
through ordinary and mask-update steps (BAMESGD bit for bit; BAMEAdamW within
``assert_close``'s defaults, as torch's own AdamW differs by an ulp when compiled, and its
masks and step counts exactly). The step's Python (schedule, state dicts, native kernels)
breaks the graph in places; what must not happen is an error (dynamo runs a method named
``_init_group`` outside its trace and failed on the lists ours returned)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bame_optim import BAMESGD, BAMEAdamW, nm_param_groups

STEPS = 6


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(8, 16, 3), nn.Flatten(), nn.Linear(16 * 4 * 4, 32),
                         nn.ReLU(), nn.Linear(32, 8))


@pytest.mark.parametrize("optimizer", [BAMESGD, BAMEAdamW])
def test_compiled_step_runs_and_steps_as_the_eager_one(optimizer):
    import torch._dynamo

    hyper = dict(lr=0.05, momentum=0.9) if optimizer is BAMESGD else dict(lr=1e-2)
    models = {"eager": _model(), "compiled": _model()}
    optimizers = {
        name: optimizer(nm_param_groups(model, 2, 4), **hyper, total_steps=3 * STEPS,
                        t_i=0, delta_t=2)
        for name, model in models.items()
    }
    steps = {"eager": optimizers["eager"].step,
             "compiled": torch.compile(optimizers["compiled"].step, backend="eager")}
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        grads = [torch.randn(p.shape, generator=gen) for p in models["eager"].parameters()]
        for name, model in models.items():
            for p, g in zip(model.parameters(), grads, strict=True):
                p.grad = g.clone()
            steps[name]()
    eager, compiled = (copy.deepcopy(o.state_dict()) for o in optimizers.values())
    assert eager["param_groups"] == compiled["param_groups"]
    pairs = list(zip(models["eager"].parameters(), models["compiled"].parameters(), strict=True))
    pairs += [(value, compiled["state"][index][key])
              for index, state in eager["state"].items() for key, value in state.items()]
    for mine, theirs in pairs:
        if optimizer is BAMESGD or not (torch.is_tensor(mine) and mine.is_floating_point()):
            assert torch.equal(mine, theirs) if torch.is_tensor(mine) else mine == theirs
        else:  # torch's own AdamW differs so compiled (dynamo's branches): its tolerance
            torch.testing.assert_close(mine, theirs)
