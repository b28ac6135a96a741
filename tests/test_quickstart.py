"""The main job runs end to end on digits and on an IDX folder, and rejects bad flags."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from bame_optim.nm import is_nm_sparse

from .test_idx import write_idx_folder

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import quickstart


def test_digits_three_methods(capsys):
    results = quickstart.main(["--epochs", "2", "--seeds", "1", "--hidden", "64", "--delta-t", "2"])
    assert list(results) == list(quickstart.METHODS)
    for runs in results.values():
        assert 0.0 <= runs[0]["accuracy"] <= 1.0 and math.isfinite(runs[0]["seconds"])
    sparse = [row for row in results["BAME"][0]["report"] if row["sparse"]]
    assert len(sparse) == 2 and all(row["nm_valid"] and row["density"] == 1 / 16 for row in sparse)
    out = capsys.readouterr().out
    assert "dense SGD" in out and "static N:M" in out and "BAME" in out


def test_idx_folder(tmp_path):
    write_idx_folder(tmp_path)
    results = quickstart.main(
        [
            "--data",
            str(tmp_path),
            "--epochs",
            "1",
            "--seeds",
            "2",
            "--hidden",
            "32",
            "--n",
            "2",
            "--m",
            "8",
        ]
    )
    assert all(len(runs) == 2 for runs in results.values())


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--n", "4", "--m", "4"], "--n: invalid value 4"),
        (["--hidden", "100"], "--hidden: invalid value 100"),
        (["--epochs", "0"], "--epochs: invalid value 0"),
        (["--lr", "-1"], "--lr: invalid value -1.0"),
    ],
)
def test_bad_flags(argv, message, capsys):
    with pytest.raises(SystemExit):
        quickstart.main(argv)
    assert message in capsys.readouterr().err


def test_sparse_weights_are_n_m_after_training():
    args = quickstart.parse_args(["--epochs", "1", "--hidden", "32", "--n", "2", "--m", "8"])
    from bame_optim.integrations.local_data import load_split

    result = quickstart.train("BAME", load_split("digits"), args, seed=0)
    assert result["report"][0]["name"].endswith("weight")
    assert all(row["nm_valid"] for row in result["report"] if row["sparse"])
    assert is_nm_sparse
