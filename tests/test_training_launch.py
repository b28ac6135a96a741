"""The training loop's launch checks and its per-epoch counts under several processes.

* A launcher that starts several processes (``WORLD_SIZE`` / ``LOCAL_WORLD_SIZE`` > 1) while
  Accelerate sees one process each (no GPU, no ``--cpu``) is refused before any work.
* Train loss and accuracy count every sample once, not Accelerate's padding of the last round
  (two real processes, ``torchrun`` + gloo).
* The run's title shows no N:M pattern for dense training.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.nn import functional as F

pytest.importorskip("accelerate")

from bame_apps.integrations.training import TrainingConfig, run
from bame_apps.integrations.training.loop import LaunchError, check_launch
from bame_apps.integrations.training.metrics import run_title

from . import train_metrics_worker as worker
from .torchrun import run_ranks

RECIPE = "torchrun --nproc_per_node 2 examples/train_cifar.py --cpu"


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.mark.parametrize(
    "environ", [{"WORLD_SIZE": "2"}, {"LOCAL_WORLD_SIZE": "4"}, {"WORLD_SIZE": "2", "RANK": "1"}]
)
def test_a_multi_process_launch_seen_as_one_process_is_refused(environ):
    with pytest.raises(LaunchError, match=r"each would train the whole run alone") as info:
        check_launch(1, environ)
    assert RECIPE in str(info.value)
    assert "accelerate launch --multi_gpu --num_processes 2" in str(info.value)
    check_launch(2, {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"})  # a real 2-process run
    check_launch(1, {"WORLD_SIZE": "1"})
    check_launch(1, {})


def test_accelerate_cpu_with_several_processes_warns():
    """``accelerate launch --cpu --num_processes 2`` runs one process with MASTER_ADDR set."""
    environ = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1"}
    with pytest.warns(UserWarning, match=r"accelerate launch --cpu runs one process") as info:
        check_launch(1, environ)
    assert RECIPE in str(info[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_launch(1, {"ACCELERATE_USE_CPU": "True"})  # plain accelerate launch --cpu


def test_run_refuses_before_loading_data(tmp_path, monkeypatch, write_cifar_folder):
    """What ``accelerate launch --multi_gpu --num_processes 2`` (or ``torchrun`` without
    ``--cpu``) sets on a machine without GPUs, seen from one of the processes."""
    write_cifar_folder(tmp_path / "cifar")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    import bame_apps.integrations.training.loop as loop

    monkeypatch.setattr(loop, "load_training_data", lambda *a: pytest.fail("data loaded"))
    out = tmp_path / "out"
    config = TrainingConfig.build(data=str(tmp_path / "cifar"), output_dir=out, epochs=1)
    with pytest.raises(LaunchError, match=r"WORLD_SIZE=2"):
        run(config)
    assert not (tmp_path / "out").exists()


def test_script_exits_with_the_launch_message(
    tmp_path, monkeypatch, capsys, write_cifar_folder, load_example
):
    script = load_example("train_cifar")
    write_cifar_folder(tmp_path / "cifar")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    argv = [
        "--data",
        str(tmp_path / "cifar"),
        "--output-dir",
        str(tmp_path / "o"),
        "--workers",
        "0",
    ]
    with pytest.raises(SystemExit) as exit_info:
        script.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "train_cifar.py: error:" in err and RECIPE in err, err


def test_train_sums_count_each_sample_once_under_two_processes(tmp_path):
    ranks = run_ranks("train_metrics_worker.py", tmp_path, timeout=180)
    for size in worker.SIZES:
        index = torch.arange(size)
        logits = worker.logits_of(index)
        y = index % worker.CLASSES
        loss = F.cross_entropy(logits, y, reduction="none", label_smoothing=0.1)
        expected = torch.tensor([loss.sum(), (index % 2 == 0).sum(), size], dtype=torch.float64)
        padded = -(-size // (2 * worker.BATCH)) * 2 * worker.BATCH
        for sums, naive in (rank[size] for rank in ranks):
            torch.testing.assert_close(sums, expected, msg=f"size {size}")
            assert naive[2] == padded  # what the loop counted before: the padding too


def test_run_title_has_no_pattern_for_dense(tmp_path):
    config = TrainingConfig.build(data="x", output_dir=tmp_path, model="resnet32", method="dense")
    assert run_title(config) == "resnet32 dense"
    sparse = TrainingConfig.build(data="x", output_dir=tmp_path, method="srste", n=1, m=16)
    assert run_title(sparse) == "resnet32 srste 1:16"
