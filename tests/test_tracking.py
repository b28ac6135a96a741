"""Live logging and the watchable metrics.json of bame_apps.integrations.training: a real tiny
run with ``--report-to tensorboard`` whose event files are read back (loss and lr per optimizer
step, mask scalars per mask update, epoch metrics), :class:`LiveLog` against a recording
tracker, ``metrics.json`` rewritten after every epoch by an atomic writer, the library
versions it records, and the errors of trackers whose package is missing."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

pytest.importorskip("accelerate")
pytest.importorskip("matplotlib")
pytest.importorskip("tensorboard")
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from bame_apps.integrations.training import (
    ConfigError,
    TrainingConfig,
    make_lr_scheduler,
    tracking,
)
from bame_apps.integrations.training import metrics as metrics_module
from bame_apps.integrations.training.config import config_dict
from bame_apps.integrations.training.metrics import (
    MetricsWriter,
    atomic_write_text,
    library_versions,
)
from bame_apps.integrations.training.tracking import LiveLog, hparams, trackers_of

EPOCHS, STEPS_PER_EPOCH = 2, 3  # 12 training images, batch 4


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def cifar_script(load_example) -> ModuleType:
    return load_example("train_cifar")


def _argv(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--data",
        str(data),
        "--model",
        "small_cnn",
        "--batch-size",
        "4",
        "--delta-t",
        "1",
        "--workers",
        "0",
        "--no-progress",
        "--output-dir",
        str(out),
        *extra,
    ]


def _read_scalars(folder: Path) -> dict[str, dict[int, float]]:
    events = EventAccumulator(str(folder), {"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


@pytest.fixture(scope="module")
def tensorboard_run(
    tmp_path_factory, write_idx_folder, cifar_script, reset_accelerate
) -> dict[str, Any]:
    """One tiny run (2 epochs of 3 optimizer steps, BAME 2:4, ΔT 1) with
    ``--report-to tensorboard``; every ``metrics.json`` write is read back as it happens."""
    root = tmp_path_factory.mktemp("tracking")
    data, out = root / "data", root / "run"
    write_idx_folder(data)
    seen: list[dict[str, Any]] = []
    original = MetricsWriter.write

    def write_and_read_back(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        seen.append(json.loads((self.config.outputs.output_dir / "metrics.json").read_text()))
        return result

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 xdist workers on 2 cores
    reset_accelerate()
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(MetricsWriter, "write", write_and_read_back)
            argv = _argv(data, out, "--epochs", str(EPOCHS), "--report-to", "tensorboard")
            result = cifar_script.main(argv)
    finally:
        torch.set_num_threads(threads)
        reset_accelerate()
    scalars = _read_scalars(out / "tensorboard" / "train_cifar")
    return {"result": result, "out": out, "seen": seen, "scalars": scalars}


def test_tensorboard_logs_loss_and_lr_of_every_optimizer_step(tensorboard_run):
    scalars, result = tensorboard_run["scalars"], tensorboard_run["result"]
    total = EPOCHS * STEPS_PER_EPOCH
    assert sorted(scalars["train/loss"]) == sorted(scalars["train/lr"]) == list(range(1, total + 1))
    assert all(math.isfinite(v) and v > 0 for v in scalars["train/loss"].values())
    # the lr each step used: the scheduler's, replayed on a dummy optimizer
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = make_lr_scheduler(opt, total)
    for step in range(1, total + 1):
        assert scalars["train/lr"][step] == pytest.approx(opt.param_groups[0]["lr"], rel=1e-6)
        opt.step()
        scheduler.step()
    history = result.metrics["history"]
    assert scalars["train/lr"][total] == pytest.approx(history[-1]["lr"], rel=1e-6)
    # per epoch: the history rows at their last step
    for row in history:
        for key in ("train_loss", "train_accuracy", "eval_loss", "eval_accuracy"):
            assert scalars[f"epoch/{key}"][row["step"]] == pytest.approx(row[key], rel=1e-6)
        assert scalars["epoch/epoch"][row["step"]] == row["epoch"]
        assert scalars["epoch/mask_changes"][row["step"]] == row["mask_changes"]
    hparams_files = list((tensorboard_run["out"] / "tensorboard" / "train_cifar").glob("*/*.yml"))
    assert len(hparams_files) == 1 and "report_to: tensorboard" in hparams_files[0].read_text()


def test_tensorboard_logs_the_masks_at_every_mask_update(tensorboard_run):
    scalars, result = tensorboard_run["scalars"], tensorboard_run["result"]
    optimizer = result.optimizer
    group = optimizer.param_groups[0]
    total = EPOCHS * STEPS_PER_EPOCH
    due = [s for s in range(1, total + 1) if optimizer.mask_update_due(group, s - 1)]
    assert due and sorted(scalars["mask/density"]) == due
    sparse = [row for row in result.metrics["sparsity_report"] if row["sparse"]]
    assert [row["name"] for row in sparse] == ["3.weight", "6.weight"]
    for key in ("flips", "frozen_blocks", "density"):
        assert sorted(scalars[f"mask/{key}"]) == due
        for row in sparse:
            assert sorted(scalars[f"mask_{key}/{row['name']}"]) == due
    assert all(0 < v <= 1 for v in scalars["mask/density"].values())
    assert scalars["mask/density"][due[-1]] == 0.5  # 2:4 once pruned
    densities = [scalars["mask/density"][s] for s in due]
    assert densities == sorted(densities, reverse=True)  # gradual pruning, never regrown
    for key in ("flips", "frozen_blocks"):
        for step in due:
            total_value = scalars[f"mask/{key}"][step]
            assert total_value >= 0 and total_value == int(total_value)
            per_layer = sum(scalars[f"mask_{key}/{row['name']}"][step] for row in sparse)
            assert per_layer == total_value
    last = due[-1]
    for row in sparse:  # the report at the end is the one of the last mask update
        assert scalars[f"mask_flips/{row['name']}"][last] == row["flips"]
        assert scalars[f"mask_frozen_blocks/{row['name']}"][last] == row["frozen_blocks"]
    assert sum(scalars["mask/flips"].values()) > 0


def test_a_resumed_run_continues_the_event_files(tensorboard_run, cifar_script, tmp_path):
    """A crash after the epoch-1 checkpoint: ``--resume auto`` logs steps 4.. again, and
    TensorBoard shows each step once, with the values of the uninterrupted run."""
    out = tmp_path / "run"
    shutil.copytree(tensorboard_run["out"], out)
    shutil.rmtree(out / "checkpoints" / f"epoch_{EPOCHS:04d}")
    data = Path(tensorboard_run["result"].config.inputs.data)
    argv = _argv(data, out, "--epochs", str(EPOCHS), "--report-to", "tensorboard")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cifar_script.main([*argv, "--resume", "auto"])
    finally:
        torch.set_num_threads(threads)
    scalars = _read_scalars(out / "tensorboard" / "train_cifar")
    original = tensorboard_run["scalars"]
    assert scalars["train/loss"] == pytest.approx(original["train/loss"], rel=1e-6)
    assert scalars["train/lr"] == pytest.approx(original["train/lr"], rel=1e-6)
    assert scalars["epoch/epoch"] == original["epoch/epoch"]


def test_metrics_json_is_complete_after_every_epoch(tensorboard_run):
    seen, out = tensorboard_run["seen"], tensorboard_run["out"]
    assert [m["epochs_done"] for m in seen] == list(range(1, EPOCHS + 1))
    assert [m["complete"] for m in seen] == [False] * (EPOCHS - 1) + [True]
    for epoch, metrics in enumerate(seen, start=1):
        assert metrics["steps_done"] == epoch * STEPS_PER_EPOCH
        assert [row["epoch"] for row in metrics["history"]] == list(range(1, epoch + 1))
        assert 0 < metrics["training_flops_ratio"] < 1
        assert metrics["args"]["report_to"] == "tensorboard"
        assert metrics["mask_oscillation"]["cycles"] >= 0
    assert seen[0]["plots"] == [] and len(seen[-1]["plots"]) == 2
    assert seen[0]["history"][0] == seen[-1]["history"][0]  # the rows do not change later
    assert json.loads((out / "metrics.json").read_text()) == seen[-1]
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_metrics_json_records_the_library_versions(tensorboard_run):
    versions = tensorboard_run["result"].metrics["versions"]
    for name in ("python", "torch", "bame_optim", "accelerate", "datasets", "torchvision"):
        assert isinstance(versions[name], str) and versions[name], name
    for name in ("numpy", "tensorboard", "safetensors", "huggingface_hub"):
        assert isinstance(versions[name], str) and versions[name], name
    assert versions["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert versions["cuda"] == torch.version.cuda
    assert versions == library_versions()
    assert library_versions()["wandb"] == (
        None if importlib.util.find_spec("wandb") is None else versions["wandb"]
    )


def test_missing_packages_are_recorded_as_none(monkeypatch):
    monkeypatch.setattr(metrics_module, "LIBRARIES", ("torch", "no-such-package-bame"))
    versions = library_versions()
    assert versions["no-such-package-bame"] is None and versions["torch"]


def test_atomic_write_never_leaves_a_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    atomic_write_text(path, '{"epoch": 1}')
    assert json.loads(path.read_text()) == {"epoch": 1}

    def crash(*args, **kwargs):
        raise OSError("simulated crash")

    for name in ("fsync", "replace"):  # after the text was written; before the rename
        with monkeypatch.context() as patch:
            patch.setattr(metrics_module.os, name, crash)
            with pytest.raises(OSError, match="simulated crash"):
                atomic_write_text(path, '{"epoch": 2, "history": [' + "0, " * 10_000 + "0]}")
        assert json.loads(path.read_text()) == {"epoch": 1}
        assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
    atomic_write_text(path, '{"epoch": 2}')
    assert json.loads(path.read_text()) == {"epoch": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_report_to_wandb_without_wandb_names_the_flag_and_package(
    cifar_script, tmp_path, capsys, monkeypatch, write_idx_folder
):
    monkeypatch.setattr(tracking, "is_wandb_available", lambda: False)
    write_idx_folder(tmp_path / "data")
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        cifar_script.main(_argv(tmp_path / "data", out, "--report-to", "wandb"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --report-to: invalid value 'wandb'" in err, err
    assert "the wandb package is not installed: pip install wandb" in err, err
    assert "Traceback" not in err and not out.exists()
    # the library raises the same before any training
    config = TrainingConfig.build(data=str(tmp_path / "data"), output_dir=out, report_to="wandb")
    with pytest.raises(ConfigError, match=r"Invalid report_to value: 'wandb' \(the wandb"):
        tracking.accelerator_kwargs(config)


def test_trackers_of_each_report_to(monkeypatch):
    monkeypatch.setattr(tracking, "is_wandb_available", lambda: False)
    monkeypatch.setattr(tracking, "is_tensorboard_available", lambda: True)
    assert trackers_of("none") == [] and trackers_of("tensorboard") == ["tensorboard"]
    assert trackers_of("all") == ["tensorboard"]
    monkeypatch.setattr(tracking, "is_wandb_available", lambda: True)
    assert trackers_of("all") == ["tensorboard", "wandb"] and trackers_of("wandb") == ["wandb"]
    monkeypatch.setattr(tracking, "is_wandb_available", lambda: False)
    monkeypatch.setattr(tracking, "is_tensorboard_available", lambda: False)
    with pytest.raises(ConfigError, match="neither tensorboard nor wandb is installed"):
        trackers_of("all")
    with pytest.raises(ConfigError, match=r"the tensorboard package is not installed: pip"):
        trackers_of("tensorboard")
    with pytest.raises(ConfigError, match="Invalid report_to value: 'neptune'"):
        trackers_of("neptune")


def test_hparams_are_plain_scalars(tmp_path):
    values = {"a": None, "b": (1, 2), "c": [], "d": tmp_path, "e": True, "f": {"g": 1.5}}
    assert hparams(values) == {"b": "1,2", "c": "", "d": str(tmp_path), "e": True, "f.g": 1.5}
    config = TrainingConfig.build(data="d", output_dir=tmp_path, exclude=("0", "fc"))
    flat = hparams(config_dict(config))
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())
    assert flat["exclude"] == "0,fc" and "eval_split" not in flat and flat["epochs"] == 300


class RecordingTracker(GeneralTracker):
    """A tracker that keeps what it is given."""

    name = "recording"
    requires_logging_directory = False

    def __init__(self) -> None:
        super().__init__()
        self.config: dict[str, Any] | None = None
        self.logs: list[tuple[int | None, dict[str, Any]]] = []

    @property
    def tracker(self) -> list[tuple[int | None, dict[str, Any]]]:
        return self.logs

    def store_init_configuration(self, values: dict) -> None:
        self.config = dict(values)

    def log(self, values: dict, step: int | None = None, **kwargs: Any) -> None:
        self.logs.append((step, dict(values)))


def _train_steps(
    model, optimizer, live: LiveLog, steps: int, skipped: tuple[int, ...] = ()
) -> list[int]:
    """Optimizer steps ``1..steps`` of 2 micro-batches each (losses ``2k`` and ``2k + 1`` at
    step ``k``; the steps in ``skipped`` do not run, as fp16 overflows); returns the steps
    whose masks changed."""
    changed = []
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    params = [p for p in model.parameters() if p.dim() == 2]
    for step in range(1, steps + 1):
        before = [optimizer.kept_mask(p) for p in params]
        model(x).square().mean().backward()
        for micro in range(2):
            live.add_loss(torch.tensor(2.0 * step + micro))
        lr = optimizer.param_groups[0]["lr"]
        if step not in skipped:
            optimizer.step()
        optimizer.zero_grad()
        live.after_step(step, lr, skipped=step in skipped)
        after = [optimizer.kept_mask(p) for p in params]
        if any(
            (a is None) != (b is None) or (a is not None and not torch.equal(a, b))
            for a, b in zip(before, after, strict=True)
        ):
            changed.append(step)
    return changed


def _logged(recorder: RecordingTracker, key: str) -> dict[int | None, Any]:
    return {step: values[key] for step, values in recorder.logs if key in values}


def test_live_log_of_a_run(model_and_optimizer, tmp_path):
    recorder = RecordingTracker()
    accelerator = Accelerator(cpu=True, log_with=[recorder])
    model, optimizer = model_and_optimizer("bame")  # 1:4, 24 steps, ΔT 2
    live = LiveLog(accelerator, optimizer, flush_every=4)
    live.start(TrainingConfig.build(data="d", output_dir=tmp_path, script="unit"))
    assert recorder.config is not None and recorder.config["script"] == "unit"
    assert recorder.config["world_size"] == 1 and recorder.config["report_to"] == "none"
    assert "eval_split" not in recorder.config  # None dropped
    changed = _train_steps(model, optimizer, live, 10, skipped=(5,))
    assert sorted(_logged(recorder, "train/loss")) == [1, 2, 3, 4, 6, 7, 8, 9]  # 10 queued
    live.end_epoch({"epoch": 1, "step": 10, "train_loss": 1.0, "eval_loss": None})
    losses = _logged(recorder, "train/loss")
    assert losses == {s: 2.0 * s + 0.5 for s in (1, 2, 3, 4, 6, 7, 8, 9, 10)}  # skipped: none
    lrs = _logged(recorder, "train/lr")
    assert lrs == {s: 0.5 for s in losses}  # the optimizer's lr (no scheduler here)
    assert _logged(recorder, "epoch/train_loss") == {10: 1.0}
    assert _logged(recorder, "epoch/epoch") == {10: 1} and not _logged(recorder, "epoch/eval_loss")
    masks = _logged(recorder, "mask/density")
    group = optimizer.param_groups[0]
    # step k ran with counter k - 1, except after the skipped step 5
    counters = {s: s - 1 if s < 5 else s - 2 for s in range(1, 11) if s != 5}
    assert sorted(masks) == [s for s, t in counters.items() if optimizer.mask_update_due(group, t)]
    assert set(changed) <= set(masks)  # every step that changed a mask was logged
    assert all(0 < d <= 1 for d in masks.values()) and masks[max(masks)] == 0.25
    flips = _logged(recorder, "mask/flips")
    assert sorted(flips) == sorted(masks) and all(f >= 0 for f in flips.values())


def test_live_log_throttles_masks_that_change_every_step(model_and_optimizer, tmp_path):
    recorder = RecordingTracker()
    accelerator = Accelerator(cpu=True, log_with=[recorder])
    model, optimizer = model_and_optimizer("srste")
    live = LiveLog(accelerator, optimizer, scheduled_masks=False, mask_interval=3)
    live.start(TrainingConfig.build(data="d", output_dir=tmp_path))
    _train_steps(model, optimizer, live, 7)
    live.flush()
    assert sorted(_logged(recorder, "mask/density")) == [3, 6]
    assert sorted(_logged(recorder, "train/loss")) == list(range(1, 8))
