"""examples/train_cifar.py and examples/train_imagenet.py end to end, in-process, on tiny data
written here: outputs (metrics.json, plots, checkpoints), a resume from a mid-run checkpoint and
a crash during a save that both end exactly where the uninterrupted run ends, DeiT-small's
attention projections trained N:M, grayscale IDX data, and flag errors that name the flag."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("accelerate")
pytest.importorskip("matplotlib")
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

from bame_optim.core.nm import is_nm_sparse

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PNG = b"\x89PNG\r\n\x1a\n"
TIME_KEYS = {"train_seconds", "eval_seconds"}


@pytest.fixture(scope="module")
def cifar_script(load_example) -> ModuleType:
    return load_example("train_cifar")


@pytest.fixture(scope="module")
def imagenet_script(load_example) -> ModuleType:
    return load_example("train_imagenet")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The suite runs on 2 cores with 2 xdist workers: one intra-op thread each avoids
    oversubscription (spinning OpenMP threads slow these small runs several-fold)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory, write_cifar_folder) -> Path:
    folder = tmp_path_factory.mktemp("data") / "cifar"
    write_cifar_folder(folder, per_batch=8)  # 40 train, 8 test images of 32x32
    return folder


def _run(script: ModuleType, argv: list[str]):
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return script.main(argv)


def _tiny(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--data",
        str(data),
        "--model",
        "small_cnn",
        "--batch-size",
        "8",
        "--delta-t",
        "1",
        "--workers",
        "0",
        "--no-progress",
        "--output-dir",
        str(out),
        *extra,
    ]


def _strip_times(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIME_KEYS} for row in history]


def _assert_same_training(a, b) -> None:
    """Same weights, buffers, masks, momentum-driven state and step counters."""
    state_a, state_b = a.model.state_dict(), b.model.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key
    steps_a = [g["step"] for g in a.optimizer.param_groups]
    assert steps_a == [g["step"] for g in b.optimizer.param_groups]
    masks = 0
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        ma, mb = a.optimizer.kept_mask(pa), b.optimizer.kept_mask(pb)
        assert (ma is None) == (mb is None)
        if ma is not None:
            masks += 1
            assert ma.dtype == torch.bool and torch.equal(ma, mb)
    assert masks > 0
    assert _strip_times(a.metrics["history"]) == _strip_times(b.metrics["history"])
    assert a.metrics["mask_oscillation"] == b.metrics["mask_oscillation"]
    for name, sad in a.oscillation.sad.items():
        assert torch.equal(sad, b.oscillation.sad[name]), name


def test_cifar_run_writes_metrics_plots_and_checkpoints(cifar_script, cifar_dir, tmp_path):
    out = tmp_path / "run"
    result = _run(cifar_script, _tiny(cifar_dir, out, "--epochs", "2", "--keep-checkpoints", "1"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(result.metrics))
    steps_per_epoch = math.ceil(40 / 8)
    assert metrics["steps_per_epoch"] == steps_per_epoch
    assert metrics["total_steps"] == metrics["steps_done"] == 2 * steps_per_epoch
    assert [g["step"] for g in result.optimizer.param_groups] == [10, 10, 10]
    assert [row["epoch"] for row in metrics["history"]] == [1, 2]
    for row in metrics["history"]:
        assert math.isfinite(row["train_loss"]) and 0 <= row["train_accuracy"] <= 1
        assert 0 <= row["eval_accuracy"] <= 1 and math.isfinite(row["eval_loss"])
    assert metrics["history"][-1]["lr"] == pytest.approx(0.1 * (1 + math.cos(math.pi * 9 / 10)) / 2)
    assert metrics["final_eval_accuracy"] == metrics["history"][-1]["eval_accuracy"]
    assert metrics["data"]["kind"] == "cifar10" and metrics["data"]["train_samples"] == 40
    assert metrics["data"]["input_shape"] == [3, 32, 32]
    assert metrics["args"]["method"] == "bame" and metrics["args"]["n"] == 2
    assert 0 < metrics["training_flops_ratio"] < 1
    assert metrics["times"]["wall_seconds"] >= metrics["times"]["train_seconds"] > 0
    sparse = [row for row in metrics["sparsity_report"] if row["sparse"]]
    assert [row["name"] for row in sparse] == ["3.weight", "6.weight"]  # stem and head dense
    assert all(row["nm_valid"] and row["density"] == 0.5 for row in sparse)
    for _, p in result.model.named_parameters():
        if result.optimizer.kept_mask(p) is not None:
            assert is_nm_sparse(p.detach(), 2, 4)
    oscillation = metrics["mask_oscillation"]
    assert oscillation["cycles"] > 0
    assert oscillation["overall"]["blocks"] == sum(row["blocks"] for row in sparse)
    assert sum(row["mask_changes"] for row in metrics["history"]) == oscillation["overall"]["total"]
    saved = torch.load(out / "mask_oscillation.pt", weights_only=True)
    assert int(sum(t.sum() for t in saved["sad"].values())) == oscillation["overall"]["total"]
    for name in ("curves.png", "mask_oscillation.png"):
        assert (out / name).read_bytes()[:8] == PNG
        assert str(out / name) in metrics["plots"]
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["epoch_0002"]  # keep 1: epoch 1 was deleted, no temporary left
    state = json.loads((out / "checkpoints" / "epoch_0002" / "trainer_state.json").read_text())
    assert state["epoch"] == 2 and state["global_step"] == 10


def test_resume_and_crash_recovery_end_where_the_uninterrupted_run_ends(
    cifar_script, cifar_dir, tmp_path, monkeypatch, capsys
):
    """Gradient accumulation 2 (3 optimizer steps per epoch), random crops and flips from the
    global RNG, one loader worker, mask updates at every step: all must replay exactly."""
    extra = ("--epochs", "3", "--grad-accum", "2", "--workers", "1", "--keep-checkpoints", "3")
    full = _run(cifar_script, _tiny(cifar_dir, tmp_path / "full", *extra))
    assert full.metrics["steps_per_epoch"] == 3 and full.metrics["steps_done"] == 9
    assert full.metrics["mask_oscillation"]["overall"]["total"] > 0
    first = tmp_path / "full" / "checkpoints" / "epoch_0001"

    # 1. resume from the epoch-1 checkpoint into another folder
    resumed = _run(
        cifar_script, _tiny(cifar_dir, tmp_path / "resumed", *extra, "--resume", str(first))
    )
    _assert_same_training(full, resumed)

    # 2. a crash while the epoch-2 checkpoint is written: after save_state wrote its files
    original = Accelerator.save_state
    calls = []

    def crash_on_second_save(self, output_dir=None, **kwargs):
        calls.append(output_dir)
        result = original(self, output_dir, **kwargs)
        if len(calls) == 2:
            raise OSError("simulated crash: disk full")
        return result

    monkeypatch.setattr(Accelerator, "save_state", crash_on_second_save)
    crashed = tmp_path / "crashed"
    with pytest.raises(OSError, match="simulated crash"):
        _run(cifar_script, _tiny(cifar_dir, crashed, *extra))
    monkeypatch.undo()
    assert Path(calls[1]).name == ".tmp-epoch_0002"
    assert sorted(p.name for p in (crashed / "checkpoints").iterdir()) == ["epoch_0001"]
    kept = json.loads((crashed / "checkpoints" / "epoch_0001" / "trainer_state.json").read_text())
    assert kept["epoch"] == 1 and kept["global_step"] == 3
    # a hard kill would leave the temporary folder: --resume auto ignores it
    (crashed / "checkpoints" / ".tmp-epoch_0002").mkdir()
    (crashed / "checkpoints" / ".tmp-epoch_0002" / "model.safetensors").write_bytes(b"partial")
    recovered = _run(cifar_script, _tiny(cifar_dir, crashed, *extra, "--resume", "auto"))
    _assert_same_training(full, recovered)
    names = sorted(p.name for p in (crashed / "checkpoints").iterdir())
    assert names == ["epoch_0001", "epoch_0002", "epoch_0003"]  # the stale temporary is gone

    # 3. the checkpoint pins what defines the run
    capsys.readouterr()
    with pytest.raises(SystemExit):
        other = _tiny(cifar_dir, tmp_path / "other", "--epochs", "4", "--resume", str(first))
        _run(cifar_script, other)
    err = capsys.readouterr().err
    assert "argument --epochs: invalid value 4" in err and "made with epochs=3" in err


def test_imagenet_script_trains_deit_attention_n_m(imagenet_script, tmp_path):
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 2)):
        for label in ("ant", "bee", "cat"):
            (root / split / label).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / label / f"{i}.png")
    out = tmp_path / "deit"
    argv = _tiny(root, out, "--model", "deit_small", "--vit-depth", "1", "--image-size", "32")
    argv += ["--epochs", "1", "--batch-size", "4", "--cache-dir", str(tmp_path / "cache")]
    result = _run(imagenet_script, argv)
    metrics = result.metrics
    assert metrics["data"]["eval_split"] == "validation" and metrics["data"]["num_classes"] == 3
    assert metrics["data"]["input_shape"] == [3, 32, 32]
    sparse = {row["name"]: row for row in metrics["sparsity_report"] if row["sparse"]}
    qkv = "encoder.layers.encoder_layer_0.self_attention.in_proj_weight"
    assert qkv in sparse and sparse[qkv]["shape"] == [1152, 384] and sparse[qkv]["nm_valid"]
    assert "conv_proj.weight" not in sparse and "heads.head.weight" not in sparse
    weight = dict(result.model.named_parameters())[qkv].detach()
    assert is_nm_sparse(weight, 2, 4) and (weight.reshape(-1, 4) != 0).sum(-1).max() == 2
    assert 0 < metrics["training_flops_ratio"] < 1  # attention products counted too
    # DeiT's recipe by default (tests/test_deit_recipe.py): AdamW, weight decay 0.05
    assert metrics["args"]["optimizer"] == "adamw" and metrics["args"]["weight_decay"] == 0.05
    assert type(result.optimizer).__name__ == "BAMEAdamW"


def test_channels_last_run_trains_n_m_through_the_fused_kernel(
    cifar_script, cifar_dir, tmp_path, monkeypatch
):
    """--channels-last: the convolutions train in that memory format, their gradients follow
    it, so every step's sparse weights go through the fused CPU kernel, and the masks stay
    N:M."""
    from bame_optim.kernels import kept_sgd_cpu

    stepped = []
    kernel = kept_sgd_cpu.fused_kept_sgd_

    def spy(params, grads, *args, **kwargs):
        stepped.append([(p.stride(), g.stride()) for p, g in zip(params, grads, strict=True)])
        return kernel(params, grads, *args, **kwargs)

    monkeypatch.setattr(kept_sgd_cpu, "fused_kept_sgd_", spy)
    out = tmp_path / "last"
    result = _run(cifar_script, _tiny(cifar_dir, out, "--epochs", "1", "--channels-last"))
    assert result.metrics["args"]["channels_last"] is True
    sparse = [p for p in result.model.parameters() if result.optimizer.kept_mask(p) is not None]
    convs = [p for p in sparse if p.ndim == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last)
                         and not p.is_contiguous() for p in convs)
    assert all(is_nm_sparse(p.detach(), 2, 4) for p in sparse)
    assert result.metrics["steps_done"] == len(stepped) == 5
    assert all(strides == [(p.stride(), p.stride()) for p in sparse] for strides in stepped)


def test_grayscale_idx_data_with_resnet32(cifar_script, tmp_path, write_idx_folder):
    data = tmp_path / "fashion"
    write_idx_folder(data)  # 12 train, 5 test images of 28x28
    out = tmp_path / "resnet32"
    argv = _tiny(data, out, "--model", "resnet32", "--epochs", "1", "--method", "srste")
    argv += ["--max-train-samples", "8", "--max-eval-samples", "4", "--checkpoint-every", "0"]
    metrics = _run(cifar_script, argv).metrics
    assert metrics["data"]["preset"] == "fashion-mnist"
    assert metrics["data"]["input_shape"] == [1, 28, 28]
    assert metrics["data"]["train_samples"] == 8 and metrics["data"]["eval_samples"] == 4
    assert metrics["steps_done"] == 1 and metrics["args"]["method"] == "srste"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch_0001"]


def test_the_run_prints_its_schedule_summary_first(cifar_script, cifar_dir, tmp_path, capsys):
    _run(cifar_script, _tiny(cifar_dir, tmp_path / "s", "--epochs", "1", "--delta-t", "1"))
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("BAMESGD: group 0 2:4: gradual to t_i=1 (1 mask updates)"), first


def test_dense_method_has_no_masks(cifar_script, cifar_dir, tmp_path, capsys):
    result = _run(
        cifar_script, _tiny(cifar_dir, tmp_path / "d", "--epochs", "1", "--method", "dense")
    )
    header = capsys.readouterr().out.splitlines()[0]
    assert header.startswith("train_cifar: small_cnn dense on "), header  # no "2:4"
    assert ":4" not in header
    assert isinstance(result.optimizer, torch.optim.SGD)
    assert result.metrics["sparsity_report"] == [] and result.metrics["mask_oscillation"] is None
    assert result.metrics["training_flops_ratio"] == 1.0
    assert [Path(p).name for p in result.metrics["plots"]] == ["curves.png"]


@pytest.mark.parametrize(
    "extra, flag, value",
    [
        (["--n", "4"], "--n", "4"),
        (["--m", "1", "--n", "1"], "--m", "1"),
        (["--lr", "0"], "--lr", "0.0"),
        (["--lr", "nan"], "--lr", "nan"),
        (["--epochs", "0"], "--epochs", "0"),
        (["--batch-size", "-3"], "--batch-size", "-3"),
        (["--method", "sgd"], "--method", "sgd"),
        (["--model", "resnet50"], "--model", "resnet50"),
        (["--alpha", "2"], "--alpha", "2.0"),
        (["--method", "lma", "--alpha", "0.3"], "--alpha", "0.3"),
        (["--warmup-epochs", "5", "--epochs", "5"], "--warmup-epochs", "5.0"),
        (["--momentum", "1"], "--momentum", "1.0"),
        (["--exclude", "nosuchlayer"], "--exclude", "nosuchlayer"),
        (["--eval-split", "dev"], "--eval-split", "dev"),
        (["--train-split", "dev"], "--train-split", "dev"),
        (["--resume", "/no/such/checkpoint"], "--resume", "/no/such/checkpoint"),
    ],
)
def test_bad_flags_name_the_flag_and_value(
    cifar_script, cifar_dir, tmp_path, capsys, extra, flag, value
):
    with pytest.raises(SystemExit) as exit_info:
        _run(cifar_script, _tiny(cifar_dir, tmp_path / "bad", *extra))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and value in err, err


def test_bad_data_and_occupied_output_dir(
    cifar_script, imagenet_script, cifar_dir, tmp_path, capsys
):
    with pytest.raises(SystemExit):
        _run(cifar_script, _tiny(tmp_path / "missing", tmp_path / "x"))
    err = capsys.readouterr().err
    assert "argument --data" in err and "missing" in err
    with pytest.raises(SystemExit):
        _run(
            imagenet_script,
            _tiny(cifar_dir, tmp_path / "x", "--model", "deit_small", "--image-size", "40"),
        )
    assert "argument --image-size: invalid value 40" in capsys.readouterr().err
    occupied = tmp_path / "occupied"
    (occupied / "checkpoints" / "epoch_0001").mkdir(parents=True)
    (occupied / "checkpoints" / "epoch_0001" / "trainer_state.json").write_text("{}")
    with pytest.raises(SystemExit):
        _run(cifar_script, _tiny(cifar_dir, occupied))
    assert "argument --output-dir" in capsys.readouterr().err


def test_labels_out_of_range_stop_the_run_before_training(
    cifar_script, cifar_dir, tmp_path, capsys
):
    import datasets

    from bame_apps.integrations.datasets import load_image_dataset

    dd = load_image_dataset(cifar_dir)
    test = dd["test"]
    labels = [11, *list(test["label"])[1:]]
    wider = datasets.ClassLabel(names=[*test.features["label"].names, "x", "y"])
    test = test.remove_columns("label").add_column("label", labels).cast_column("label", wider)
    datasets.DatasetDict(train=dd["train"], test=test).save_to_disk(tmp_path / "wider")
    with pytest.raises(SystemExit):
        _run(cifar_script, _tiny(tmp_path / "wider", tmp_path / "o"))
    err = capsys.readouterr().err
    assert "argument --eval-split: invalid value 'test' (its labels have 12 classes" in err, err
    test = test.cast_column("label", dd["train"].features["label"])  # 11 out of 0..9
    datasets.DatasetDict(train=dd["train"], test=test).save_to_disk(tmp_path / "bad")
    with pytest.raises(SystemExit):
        _run(cifar_script, _tiny(tmp_path / "bad", tmp_path / "o"))
    err = capsys.readouterr().err
    assert "argument --data" in err and "split 'test': label 11 at index 0 is outside 0..9" in err
    assert not (tmp_path / "o").exists()


def test_script_runs_as_a_plain_python_command(tmp_path):
    """No sys.path set-up: the script imports the installed package (one fresh interpreter;
    the in-process tests cover the rest)."""
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "train_cifar.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "--resume PATH|auto" in done.stdout and "--grad-accum" in done.stdout
