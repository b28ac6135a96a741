"""bame_optim.integrations.training's parts: the per-step cosine schedule, the epoch-seeded
sampler, the accumulated SAD per block (the paper's Figure 2), checkpoint discovery, the atomic
save, and the plots."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

pytest.importorskip("accelerate")
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

from bame_optim import BAMESGD, nm_param_groups
from bame_optim.integrations.training import (
    EpochSampler,
    MaskOscillation,
    checkpoint_epoch,
    cosine_lr,
    find_checkpoint,
    plot_curves,
    plot_mask_oscillation,
    save_checkpoint,
)
from bame_optim.methods import make_optimizer

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The suite runs on 2 cores with 2 xdist workers: one intra-op thread each avoids
    oversubscription (spinning OpenMP threads slow these small runs several-fold)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def test_cosine_lr_is_torch_cosine_annealing_per_step():
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.1)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=50)
    for step in range(50):
        assert cosine_lr(step, 50, 0.1) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12)
        opt.step()
        scheduler.step()
    assert [cosine_lr(s, 20, 1.0, warmup_steps=4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert cosine_lr(4, 20, 1.0, warmup_steps=4) == 1.0
    assert cosine_lr(12, 20, 1.0, warmup_steps=4) == pytest.approx(0.5)


def test_epoch_sampler_depends_on_seed_and_epoch_only():
    a, b = EpochSampler(50, seed=3), EpochSampler(50, seed=3)
    a.set_epoch(2)
    torch.manual_seed(123)  # the global RNG plays no part
    first = list(a)
    b.set_epoch(2)
    assert list(b) == first and sorted(first) == list(range(50))
    b.set_epoch(3)
    assert list(b) != first
    assert list(EpochSampler(50, seed=4)) != list(EpochSampler(50, seed=3))


def _model_and_optimizer(method: str = "bame", **kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
    )
    schedule = {"total_steps": 24, "delta_t": 2, "n": 1, "m": 4} | kwargs
    opt = make_optimizer(method, nm_param_groups(model, 1, 4), lr=0.5, momentum=0.9, **schedule)
    return model, opt


def _step(model, opt, generator):
    x = torch.randn(16, 8, generator=generator)
    y = torch.randint(0, 3, (16,), generator=generator)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


@pytest.mark.parametrize("method, every_step", [("bame", False), ("srste", True)])
def test_mask_oscillation_accumulates_sad_of_n_m_blocks(method, every_step):
    """Against masks read after every step: SAD summed over consecutive masks, counting only
    blocks whose previous mask kept exactly N (so gradual pruning is not oscillation)."""
    model, opt = _model_and_optimizer(method)
    weight = model[2].weight
    tracker = MaskOscillation(opt, every_step=every_step)
    generator = torch.Generator().manual_seed(1)
    expected = torch.zeros(16 * 16 // 4, dtype=torch.int32)
    previous = opt.kept_mask(weight)
    reads = 0
    for _ in range(24):
        _step(model, opt, generator)
        reads += tracker.after_step()
        current = opt.kept_mask(weight)
        if previous is not None:
            expected += (previous != current).sum(-1, dtype=torch.int32) * (previous.sum(-1) == 1)
        previous = current
    assert torch.equal(tracker.sad["2.weight"], expected)
    assert int(expected.sum()) > 0, "the masks moved in the N:M phase"
    if not every_step:
        group = opt.param_groups[0]
        updates = [t for t in range(24) if t % 2 == 0 or t == group["t_i"]]
        assert reads == len([t for t in updates if t < group["t_f"] or t == group["t_i"]])
    else:
        assert reads == 24
    # the state round-trips through a fresh tracker
    fresh = MaskOscillation(opt, every_step=every_step)
    fresh.load_state_dict(tracker.state_dict())
    assert fresh.cycles == tracker.cycles and fresh.total() == tracker.total()
    summary = tracker.summary()
    assert summary["overall"]["total"] == tracker.total()
    assert summary["layers"]["2.weight"]["blocks"] == 64


def test_mask_oscillation_needs_a_mask_optimizer():
    model = nn.Linear(4, 4)
    with pytest.raises(TypeError, match="holds no BAMESGD"):
        MaskOscillation(torch.optim.SGD(model.parameters(), lr=0.1))
    opt = BAMESGD(model.parameters(), lr=0.1, n=1, m=4, t_i=0, t_f=0)
    assert MaskOscillation(opt).after_step() is False  # no step yet


def test_find_checkpoint_ignores_temporary_and_partial_folders(tmp_path):
    root = tmp_path / "checkpoints"
    for name, complete in (("epoch_0002", True), ("epoch_0010", True), ("epoch_0011", False)):
        (root / name).mkdir(parents=True)
        if complete:
            (root / name / "trainer_state.json").write_text("{}")
    (root / ".tmp-epoch_0012").mkdir()
    (root / ".tmp-epoch_0012" / "trainer_state.json").write_text("{}")
    assert find_checkpoint(tmp_path) == root / "epoch_0010"
    assert find_checkpoint(root) == root / "epoch_0010"
    assert find_checkpoint(root / "epoch_0002") == root / "epoch_0002"
    assert find_checkpoint(tmp_path / "nothing") is None
    assert checkpoint_epoch(root / "epoch_0010") == 10
    with pytest.raises(ValueError, match="Invalid checkpoint value"):
        checkpoint_epoch(root / ".tmp-epoch_0012")


def test_save_checkpoint_is_atomic_and_keeps_the_latest(tmp_path, monkeypatch):
    accelerator = Accelerator(cpu=True)
    model, opt = _model_and_optimizer()
    model, opt = accelerator.prepare(model, opt)
    root = tmp_path / "checkpoints"
    extra = {"trainer_state": {"epoch": 1}, "oscillation": {}}
    for epoch in (1, 2, 3):
        path = save_checkpoint(
            accelerator, root, epoch, extra | {"trainer_state": {"epoch": epoch}}, keep=2
        )
        assert path == root / f"epoch_{epoch:04d}"
    assert sorted(p.name for p in root.iterdir()) == ["epoch_0002", "epoch_0003"]
    assert json.loads((root / "epoch_0003" / "trainer_state.json").read_text()) == {"epoch": 3}
    # saving the same epoch again replaces it whole
    save_checkpoint(accelerator, root, 3, extra | {"trainer_state": {"epoch": 33}}, keep=2)
    assert json.loads((root / "epoch_0003" / "trainer_state.json").read_text()) == {"epoch": 33}

    def broken_write(self, *args, **kwargs):
        raise OSError("no space left on device")

    monkeypatch.setattr(type(root), "write_text", broken_write)
    with pytest.raises(OSError, match="no space"):
        save_checkpoint(accelerator, root, 4, extra, keep=2)
    monkeypatch.undo()
    assert sorted(p.name for p in root.iterdir()) == ["epoch_0002", "epoch_0003"]
    assert find_checkpoint(root) == root / "epoch_0003"


def test_plots_are_pngs(tmp_path):
    history = [
        {
            "epoch": e,
            "train_loss": 2 / e,
            "train_accuracy": 0.2 * e,
            "eval_loss": 2.1 / e,
            "eval_accuracy": 0.19 * e,
        }
        for e in (1, 2, 3)
    ]
    history[1]["eval_accuracy"] = None  # an epoch without evaluation
    assert plot_curves(history, tmp_path / "c.png", "t").read_bytes()[:8] == PNG
    sad = {
        "a": torch.tensor([0, 0, 2, 6], dtype=torch.int32),
        "b": torch.zeros(5, dtype=torch.int32),
    }
    assert plot_mask_oscillation(sad, 3, tmp_path / "s.png").read_bytes()[:8] == PNG
    assert plot_mask_oscillation({}, 0, tmp_path / "e.png").read_bytes()[:8] == PNG
    many = {"big": torch.arange(5000, dtype=torch.int32) % 700}  # > 200 distinct values
    assert plot_mask_oscillation(many, 9, tmp_path / "m.png").read_bytes()[:8] == PNG
