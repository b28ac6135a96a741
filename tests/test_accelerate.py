"""BAMESGD under ``accelerate`` in one process: the step counter under gradient accumulation
and grad-scaler skips, ``save_state`` / ``load_state``, the state-dict round trip of
``prepare``, and :mod:`bame_apps.integrations.accelerate` (``verify_masks`` on a simulated
two-rank mismatch, ``MaskSync`` timing). The two-process run is in
``test_accelerate_multiprocess.py``."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from bame_optim import BAMESGD, nm_param_groups
from bame_optim.core.kept import combination_table, encode_kept

accelerate = pytest.importorskip("accelerate")
from accelerate import Accelerator  # noqa: E402
from accelerate.optimizer import AcceleratedOptimizer  # noqa: E402

from bame_apps.integrations import accelerate as integration  # noqa: E402

SCHEDULE = {"delta_t": 2, "t_i": 4, "t_f": 10, "total_steps": 14}


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def _setup(seed: int = 0, n: int = 1) -> tuple[nn.Module, BAMESGD]:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
    )
    groups = nm_param_groups(model, n=n, m=4, exclude=())
    return model, BAMESGD(groups, lr=0.1, momentum=0.9, weight_decay=1e-3, **SCHEDULE)


def _batches(count: int, size: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(123)
    return [
        (torch.randn(size, 8, generator=gen), torch.randint(0, 3, (size,), generator=gen))
        for _ in range(count)
    ]


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def _assert_same_state(a: BAMESGD, b: BAMESGD, model_a: nn.Module, model_b: nn.Module) -> None:
    for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert [g["step"] for g in a.param_groups] == [g["step"] for g in b.param_groups]
    for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
        sa, sb = a.state[pa], b.state[pb]
        assert sa.keys() == sb.keys()
        for key, value in sa.items():
            if isinstance(value, torch.Tensor):
                assert value.dtype == sb[key].dtype, key
                assert torch.equal(value, sb[key]), key
            else:
                assert value == sb[key], key


def test_step_counter_counts_real_updates_under_gradient_accumulation(monkeypatch):
    accumulation, micro = 4, 20  # 5 real steps (t = 0..4: updates at 0, 2 and t_i = 4)
    batches = _batches(micro)

    ref_model, ref_opt = _setup()
    for k in range(0, micro, accumulation):
        for batch in batches[k : k + accumulation]:
            (_loss(ref_model, batch) / accumulation).backward()
        ref_opt.step()
        ref_opt.zero_grad()

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    model, optimizer = accelerator.prepare(*_setup())
    checked_at = []
    monkeypatch.setattr(
        integration,
        "verify_masks",
        lambda opt, acc, fix: checked_at.append(opt.param_groups[0]["step"] - 1) or True,
    )
    sync = integration.MaskSync(optimizer, accelerator)
    for batch in batches:
        with accelerator.accumulate(model):
            accelerator.backward(_loss(model, batch))
            optimizer.step()
            sync.after_step()
            optimizer.zero_grad()
    bame = integration.unwrap_optimizer(optimizer)
    assert [g["step"] for g in bame.param_groups] == [micro // accumulation] * 2
    assert checked_at == [0, 2, 4]
    _assert_same_state(bame, ref_opt, accelerator.unwrap_model(model), ref_model)


def test_steps_a_cpu_grad_scaler_skips_leave_counter_masks_and_weights_alone():
    # torch.amp.GradScaler("cpu") exists and skips on inf like the CUDA one; Accelerate builds
    # no scaler for fp16 on CPU, so wrap BAMESGD the way Accelerate does on CUDA.
    batches = _batches(6)
    ref_model, ref_opt = _setup()
    model, opt = _setup()
    Accelerator(cpu=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    wrapped = AcceleratedOptimizer(opt, scaler=scaler)
    for i, batch in enumerate(batches):
        scaler.scale(_loss(model, batch)).backward()
        if i in (1, 4):  # overflow: the whole step is skipped
            before = copy.deepcopy((model.state_dict(), opt.state_dict()))
            model[2].weight.grad[0, 0] = float("inf")
            wrapped.step()
            assert wrapped.step_was_skipped
            after = (model.state_dict(), opt.state_dict())
            assert after[1]["param_groups"][0]["step"] == before[1]["param_groups"][0]["step"]
            for key, value in before[0].items():
                assert torch.equal(value, after[0][key])
            for i_state, state in before[1]["state"].items():
                for key, value in state.items():
                    if isinstance(value, torch.Tensor):
                        assert torch.equal(value, after[1]["state"][i_state][key])
        else:
            _loss(ref_model, batch).backward()
            ref_opt.step()
            ref_opt.zero_grad()
            wrapped.step()  # power-of-two scale: unscaling is exact
            assert not wrapped.step_was_skipped
        wrapped.zero_grad()
    assert opt.param_groups[0]["step"] == 4
    _assert_same_state(opt, ref_opt, model, ref_model)


def test_prepare_round_trip_keeps_mask_and_oscillation_dtypes():
    model, opt = _setup()
    for batch in _batches(7):  # into the evolve phase: masks and a non-zero oscillation EMA
        _loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
    reference = copy.deepcopy(opt.state_dict())
    accelerator = Accelerator(cpu=True)
    accelerator.prepare(model, opt)
    sparse = opt.param_groups[0]["params"]
    for p, i in zip(sparse, reference["param_groups"][0]["params"], strict=True):
        assert opt.state[p]["kept"].dtype == torch.uint8
        assert torch.equal(opt.state[p]["kept"], reference["state"][i]["kept"])
        assert opt.state[p]["oscillation"].dtype == torch.float32
        assert opt.state[p]["oscillation"].any()


@pytest.mark.parametrize("save_at", [3, 4, 7])  # gradual, t_i, evolve
def test_save_state_load_state_continues_bit_identically(tmp_path, save_at, reset_accelerate):
    more = 6
    batches = _batches(save_at + more)

    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(*_setup())
    for batch in batches[:save_at]:
        accelerator.backward(_loss(model, batch))
        optimizer.step()
        optimizer.zero_grad()
    accelerator.save_state(str(tmp_path))
    for batch in batches[save_at:]:
        accelerator.backward(_loss(model, batch))
        optimizer.step()
        optimizer.zero_grad()
    ref_model, ref_opt = accelerator.unwrap_model(model), integration.unwrap_optimizer(optimizer)

    reset_accelerate()
    accelerator = Accelerator(cpu=True)  # as a fresh process would
    model, optimizer = accelerator.prepare(*_setup(seed=1))  # other weights: load must set them
    accelerator.load_state(str(tmp_path))
    bame = integration.unwrap_optimizer(optimizer)
    assert bame.param_groups[0]["step"] == save_at
    assert all(bame.state[p]["kept"].dtype == torch.uint8 for p in bame.param_groups[0]["params"])
    for batch in batches[save_at:]:
        accelerator.backward(_loss(model, batch))
        optimizer.step()
        optimizer.zero_grad()
    _assert_same_state(bame, ref_opt, accelerator.unwrap_model(model), ref_model)


def test_saved_optimizer_state_loads_with_weights_only(tmp_path):
    model, opt = _setup()
    for batch in _batches(7):
        _loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
    torch.save(opt.state_dict(), tmp_path / "opt.bin")
    state = accelerate.utils.load(tmp_path / "opt.bin")  # weights_only=True
    fresh_model, fresh = _setup(seed=1)
    fresh.load_state_dict(state)
    fresh_model.load_state_dict(model.state_dict())
    _assert_same_state(fresh, opt, fresh_model, model)


def test_verify_masks_in_one_process_is_true_and_free():
    model, opt = _setup()
    _loss(model, _batches(1)[0]).backward()
    opt.step()
    assert integration.verify_masks(opt) is True
    assert integration.verify_masks(opt, Accelerator(cpu=True)) is True


class _Stop(Exception):
    pass


def _simulate_two_ranks(
    monkeypatch, optimizers: list[BAMESGD], fix: bool = True
) -> tuple[list[bool], list[str]]:
    """Run ``verify_masks`` as ranks 0 and 1 of a world of two, in one process: the gather
    returns both ranks' checksum rows, broadcasts replay what rank 0 sent, in order. Returns
    each rank's result and warning."""
    rows = []

    def capture(row, accelerator, world):
        rows.append(row)
        raise _Stop

    monkeypatch.setattr(integration, "_gather", capture)
    for rank, opt in enumerate(optimizers):
        monkeypatch.setattr(integration, "_world", lambda acc, rank=rank: (2, rank))
        with pytest.raises(_Stop):
            integration.verify_masks(opt)
    monkeypatch.setattr(integration, "_gather", lambda row, acc, world: torch.stack(rows))
    sent: list[torch.Tensor] = []
    sent_objects: list[list] = []
    results, messages = [], []
    for rank, opt in enumerate(optimizers):
        monkeypatch.setattr(integration, "_world", lambda acc, rank=rank: (2, rank))
        if not fix:
            broadcast = lambda tensor, acc: pytest.fail("broadcast without fix")  # noqa: E731
            objects = lambda objs, acc: pytest.fail("broadcast without fix")  # noqa: E731
        elif rank == 0:
            broadcast = lambda tensor, acc: sent.append(tensor.clone())  # noqa: E731
            objects = lambda objs, acc: sent_objects.append(copy.deepcopy(objs))  # noqa: E731
        else:
            broadcast = lambda tensor, acc: tensor.copy_(sent.pop(0))  # noqa: E731

            def objects(objs, acc):
                objs[:] = sent_objects.pop(0)

        monkeypatch.setattr(integration, "_broadcast_", broadcast)
        monkeypatch.setattr(integration, "_broadcast_objects_", objects)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results.append(integration.verify_masks(opt, fix=fix))
        assert all(w.category is RuntimeWarning for w in caught)
        messages += [str(w.message) for w in caught]
    assert not sent and not sent_objects
    return results, messages


def _move_kept_entries(opt: BAMESGD, p: torch.Tensor, block: int) -> None:
    """Roll the kept entries of one block of ``p``'s mask (N:M stays valid): a drifted rank."""
    mask = opt.kept_mask(p)
    mask[block] = mask[block].roll(1)
    opt.state[p]["kept"] = encode_kept(mask, opt.state[p]["kept_count"])


def _trained(steps: int = 7, n: int = 1) -> tuple[nn.Module, BAMESGD, nn.Module, BAMESGD]:
    """A model and optimizer (``n``:4) after ``steps`` steps, and an exact copy ("the other
    rank")."""
    model, opt = _setup(n=n)
    for batch in _batches(steps):
        _loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
    other_model = copy.deepcopy(model)
    other = BAMESGD(nm_param_groups(other_model, n=n, m=4, exclude=()), **SCHEDULE)
    other.load_state_dict(copy.deepcopy(opt.state_dict()))  # load_state_dict aliases tensors
    _assert_same_state(other, opt, other_model, model)
    return model, opt, other_model, other


def test_verify_masks_detects_and_repairs_a_simulated_mismatch(monkeypatch):
    model, opt, other_model, other = _trained()
    assert integration.verify_masks(other) is True  # one process: nothing to compare
    assert _simulate_two_ranks(monkeypatch, [opt, other], fix=True) == ([True, True], [])

    # Rank 1 drifts: one oscillation bit, a moved kept entry (its weights not re-zeroed), a
    # parameter without mask state or momentum, a step counter.
    osc = other.state[other_model[0].weight]["oscillation"]
    osc[3] = torch.nextafter(osc[3], torch.tensor(2.0))
    w = other_model[2].weight
    _move_kept_entries(other, w, block=0)
    w.data[0, :4] += 1.0
    for key in ("kept", "oscillation", "momentum_buffer"):
        del other.state[other_model[4].weight][key]
    other.param_groups[1]["step"] += 1

    results, messages = _simulate_two_ranks(monkeypatch, [opt, other])
    assert results == [False, False]
    for rank, message in enumerate(messages):
        assert message.startswith(
            f"verify_masks (rank {rank}): ranks [1] differ from rank 0 in the step counter of "
            "param group 1 (ranks [1]); '0.weight': the oscillation EMA (ranks [1]); "
            "'2.weight': the mask (ranks [1]), the weights (ranks [1]); "
            "'4.weight': the mask (ranks [1]), the oscillation EMA (ranks [1]); repaired: "
        )
    _assert_same_state(other, opt, other_model, model)


def _compare(opt: BAMESGD, p: torch.Tensor, other: BAMESGD, q: torch.Tensor) -> dict:
    """What ``verify_masks`` reports for ``q`` of ``other`` (rank 1) against ``p`` of ``opt``
    (rank 0), from the checksum rows of the two optimizers."""
    rows = [torch.stack(integration._param_row(o, x, x.device)) for o, x in ((opt, p), (other, q))]
    assert not torch.equal(rows[0], rows[1]) or not integration._differences(torch.stack(rows))
    return integration._differences(torch.stack(rows))


_PAIR = torch.tensor([[True, False, False, True], [False, True, True, False]])  # {0,3}, {1,2}


def test_mask_code_tells_the_kept_sets_0_3_and_1_2_apart():
    # The sum of kept positions (1-based) is 5 for both {0, 3} and {1, 2}: such a swap on one
    # rank went unseen by the former checksum.
    model, opt, other_model, other = _trained(n=2)
    p, q = model[2].weight, other_model[2].weight
    assert _compare(opt, p, other, q) == {}
    mask = other.kept_mask(q)
    block = next(k for k in range(mask.shape[0]) if (mask[k] == _PAIR).all(1).any())
    mask[block] = _PAIR[1] if torch.equal(mask[block], _PAIR[0]) else _PAIR[0]
    other.state[q]["kept"] = encode_kept(mask, 2)
    assert _compare(opt, p, other, q) == {"mask": [1]}


def test_every_other_kept_set_of_any_one_block_changes_the_mask_code():
    model, opt, other_model, other = _trained(n=2)
    p, q = model[2].weight, other_model[2].weight
    sets = combination_table(2, 4)
    mask = opt.kept_mask(p)
    for block in range(mask.shape[0]):
        for kept in sets:
            if torch.equal(kept, mask[block]):
                continue
            changed = mask.clone()
            changed[block] = kept
            other.state[q]["kept"] = encode_kept(changed, 2)
            assert _compare(opt, p, other, q) == {"mask": [1]}, (block, kept)


def test_every_single_entry_difference_of_weights_or_oscillation_is_seen():
    model, opt, other_model, other = _trained(n=2)
    p, q = model[2].weight, other_model[2].weight
    oscillation = other.state[q]["oscillation"]
    assert oscillation.any()
    for tensor, what in ((q.data, "weights"), (oscillation, "oscillation EMA")):
        flat = tensor.view(-1)
        for i in range(flat.numel()):
            kept = flat[i].clone()
            for changed in (torch.nextafter(kept, torch.tensor(2.0)), -kept):  # last, sign bit
                flat[i] = changed
                assert _compare(opt, p, other, q) == {what: [1]}, (what, i)
            flat[i] = kept
    assert _compare(opt, p, other, q) == {}


def test_verify_masks_without_fix_only_reports(monkeypatch):
    _, opt, other_model, other = _trained()
    w = other_model[2].weight
    _move_kept_entries(other, w, block=1)
    drifted = copy.deepcopy(other.state[w]["kept"])
    results, messages = _simulate_two_ranks(monkeypatch, [opt, other], fix=False)
    assert results == [False, False]
    assert messages[1] == (
        "verify_masks (rank 1): ranks [1] differ from rank 0 in '2.weight': the mask "
        "(ranks [1]); not repaired (fix=False)"
    )
    assert torch.equal(other.state[w]["kept"], drifted)


def test_mask_sync_timing(monkeypatch):
    model, opt = _setup()
    calls = []
    monkeypatch.setattr(
        integration,
        "verify_masks",
        lambda o, acc, fix: calls.append(o.param_groups[0]["step"] - 1) or True,
    )
    every = integration.MaskSync(opt)
    final = integration.MaskSync(opt, every_update=False)
    results = []
    for batch in _batches(SCHEDULE["total_steps"]):
        _loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
        results.append(every.after_step())
        assert every.after_step() is None  # no new step since the last call
        final.after_step()
    # update steps: 0, 2, 4 (= t_i), 6, 8; t_f = 10; the last update is at 8. Both check at
    # their first step; `every` also every delta_t steps once the masks are final (10, 12).
    assert calls == [0, 0, 2, 4, 6, 8, 8, 10, 12]
    assert opt.last_mask_update(opt.param_groups[0]) == 8
    assert [r for r in results if r is not None] == [True] * 7


def test_unwrap_refuses_a_dense_optimizer():
    with pytest.raises(TypeError, match="holds no N:M optimizer"):
        integration.unwrap_optimizer(torch.optim.SGD([nn.Parameter(torch.ones(1))]))


def test_optimizer_steps_is_the_number_of_real_steps_under_accumulate():
    """10 batches an epoch at accumulation 4: Accelerate steps after batches 4, 8 and at the
    end of the loader, so 3 optimizer steps an epoch (not 10, not 10 // 4)."""
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=4)
    data = torch.utils.data.TensorDataset(torch.randn(20, 8), torch.randint(0, 3, (20,)))
    loader = accelerator.prepare(torch.utils.data.DataLoader(data, batch_size=2))
    model, optimizer = accelerator.prepare(*_setup())
    epochs = 2
    for _ in range(epochs):
        for batch in loader:
            with accelerator.accumulate(model):
                accelerator.backward(_loss(model, batch))
                optimizer.step()
                optimizer.zero_grad()
    steps = integration.unwrap_optimizer(optimizer).param_groups[0]["step"]
    assert steps == integration.optimizer_steps(len(loader), epochs, 4) == 6
    with pytest.raises(ValueError, match="Invalid gradient_accumulation_steps value: 0"):
        integration.optimizer_steps(10, 1, 0)

