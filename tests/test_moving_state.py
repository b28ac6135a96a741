"""Moving optimizer state between a dense ``torch.optim`` run and a BAME run (issue 16).

* sparse into dense: ``opt.torch_state_dict()`` of BAMESGD / BAMEAdamW loads into
  ``torch.optim.SGD`` / ``AdamW`` over the same groups in every phase (gradual, evolve,
  frozen), and the torch run from it equals a dense continuation from the BAME state read in
  the parameter's layout;
* dense into sparse: ``opt.load_dense_state_dict(sgd.state_dict(), model.parameters())``
  starts ``BAMESGD(nm_param_groups(model, ...))`` from an ``SGD(model.parameters())`` run;
* what cannot work says so.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from bame_optim import BAMESGD, BAMEAdamW, nm_param_groups
from bame_optim.core.nm import param_to_blocks

SCHEDULE = {"n": 1, "m": 4, "total_steps": 24, "delta_t": 2}  # t_i 8, t_f 16
PHASES = {"gradual": 5, "evolve": 12, "frozen": 20}
KINDS = {
    "sgd": (BAMESGD, torch.optim.SGD,
            {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-3, "nesterov": True}),
    # fused=False: the eager path is torch's own arithmetic, so equality is bit for bit (the
    # native kernel's weights agree within torch's fused-vs-for-loop tolerance only)
    "adamw": (BAMEAdamW, torch.optim.AdamW,
              {"lr": 0.01, "betas": (0.8, 0.99), "weight_decay": 0.05, "amsgrad": True,
               "fused": False}),
}
BUFFERS = {"sgd": ("momentum_buffer",), "adamw": ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")}


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, 3))


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, start: int = 0) -> None:
    for t in range(start, start + steps):
        generator = torch.Generator().manual_seed(t)
        x = torch.randn(16, 8, generator=generator)
        y = torch.randint(0, 3, (16,), generator=generator)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def _same_order_groups(opt: torch.optim.Optimizer, model: nn.Module,
                       source: nn.Module) -> list[dict]:
    """``opt``'s groups (over ``source``'s parameters) mapped onto ``model``'s parameters."""
    mapping = {id(p): q for p, q in zip(source.parameters(), model.parameters(), strict=True)}
    return [{"params": [mapping[id(p)] for p in g["params"]], "weight_decay": g["weight_decay"]}
            for g in opt.param_groups]


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("kind", KINDS)
def test_torch_state_dict_loads_and_continues_densely(kind, phase):
    bame_class, torch_class, hyper = KINDS[kind]
    model = _model()
    opt = bame_class(nm_param_groups(model, 1, 4), **hyper, **SCHEDULE)
    _train(model, opt, PHASES[phase])
    assert opt.phase_name(opt.param_groups[0]) == phase

    saved = opt.torch_state_dict()
    sparse = [p for g in opt.param_groups for p in g["params"] if opt._is_sparse(p, g)]
    assert sparse
    flat = [p for g in opt.param_groups for p in g["params"]]
    for i, p in enumerate(flat):
        state = saved["state"][i]
        assert not {"kept", "kept_count", "oscillation"} & set(state)
        for name in BUFFERS[kind]:
            assert state[name].shape == p.shape, (i, name)
        if any(p is q for q in sparse):
            pruned = ~opt.kept_mask(p)
            for name in BUFFERS[kind]:
                assert not param_to_blocks(state[name], 4)[pruned].any()
    assert all("n" not in g and "t_i" not in g and "step" not in g for g in saved["param_groups"])

    # The torch run from it ...
    loaded_model = copy.deepcopy(model)
    loaded = torch_class(_same_order_groups(opt, loaded_model, model), lr=1.0)
    loaded.load_state_dict(copy.deepcopy(saved))
    # ... against a dense continuation built by hand from the BAME state in the parameter's
    # layout and the hyper-parameters the BAME run was given.
    dense_model = copy.deepcopy(model)
    reference = torch_class(_same_order_groups(opt, dense_model, model), **hyper)
    for p, q in zip(flat, [p for g in reference.param_groups for p in g["params"]], strict=True):
        if kind == "sgd":
            reference.state[q]["momentum_buffer"] = opt.momentum_buffer(p)
        else:
            reference.state[q] = {
                "step": opt.state[p]["step"].clone(),
                "exp_avg": opt.exp_avg(p), "exp_avg_sq": opt.exp_avg_sq(p),
                "max_exp_avg_sq": opt._dense_view(p, "max_exp_avg_sq"),
            }
    _train(loaded_model, loaded, 4, start=PHASES[phase])
    _train(dense_model, reference, 4, start=PHASES[phase])
    for a, b in zip(loaded_model.parameters(), dense_model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(loaded_model.parameters(),
                                                     model.parameters(), strict=True))


@pytest.mark.parametrize("kind", KINDS)
def test_load_dense_state_dict_starts_bame_from_a_dense_run(kind):
    bame_class, torch_class, hyper = KINDS[kind]
    hyper = hyper | {"weight_decay": 0.0}  # nm_param_groups exempts the biases from decay
    model = _model()
    dense = torch_class(model.parameters(), **hyper)
    _train(model, dense, 3)
    checkpoint = copy.deepcopy(dense.state_dict())

    sparse_model = copy.deepcopy(model)
    opt = bame_class(nm_param_groups(sparse_model, 1, 4), **hyper, **SCHEDULE)
    with pytest.raises(ValueError, match="different number of parameter groups"):
        opt.load_state_dict(copy.deepcopy(checkpoint))  # torch's own check, groups differ
    opt.load_dense_state_dict(copy.deepcopy(checkpoint), sparse_model.parameters())

    assert all(g["step"] == 0 for g in opt.param_groups)
    read = opt.momentum_buffer if kind == "sgd" else opt.exp_avg
    name = "momentum_buffer" if kind == "sgd" else "exp_avg"
    for i, p in enumerate(sparse_model.parameters()):
        assert torch.equal(read(p), checkpoint["state"][i][name]), i
    # One more step of each: at t = 0 every weight is kept, so BAME steps as the dense run.
    _train(model, dense, 1, start=3)
    _train(sparse_model, opt, 1, start=3)
    for a, b in zip(model.parameters(), sparse_model.parameters(), strict=True):
        assert torch.equal(a, b)
    _train(sparse_model, opt, 20, start=4)
    assert all(row["nm_valid"] for row in opt.sparsity_report() if row["sparse"])


def test_load_dense_state_dict_names_what_does_not_match():
    model = _model()
    dense = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _train(model, dense, 1)
    checkpoint = dense.state_dict()
    opt = BAMESGD(nm_param_groups(model, 1, 4), lr=0.1, momentum=0.9, **SCHEDULE)
    params = list(model.parameters())
    with pytest.raises(ValueError, match="the checkpoint holds 6 parameters and params gives 5"):
        opt.load_dense_state_dict(checkpoint, params[:5])
    with pytest.raises(ValueError, match=r"parameter 0 of shape \(2, 2\) is not in BAMESGD"):
        opt.load_dense_state_dict(checkpoint, [nn.Parameter(torch.ones(2, 2)), *params[1:]])
    other = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(),
                          nn.Linear(16, 3))
    other_checkpoint = torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9)
    _train(other, other_checkpoint, 1)
    with pytest.raises(ValueError, match=r"its momentum_buffer has shape \(32, 8\) but the "
                                         r"parameter has shape \(16, 8\)"):
        opt.load_dense_state_dict(other_checkpoint.state_dict(), params)


def test_a_bame_state_dict_passed_through_torch_is_refused():
    model = _model()
    opt = BAMESGD(nm_param_groups(model, 1, 4), lr=0.1, momentum=0.9, **SCHEDULE)
    _train(model, opt, 3)
    torch_opt = torch.optim.SGD([{"params": g["params"]} for g in opt.param_groups], lr=0.1)
    torch_opt.load_state_dict(opt.state_dict())  # torch accepts it, and casts the codes
    again = BAMESGD(nm_param_groups(model, 1, 4), lr=0.1, momentum=0.9, **SCHEDULE)
    with pytest.raises(ValueError, match=r"torch_state_dict\(\)"):
        again.load_state_dict(torch_opt.state_dict())
