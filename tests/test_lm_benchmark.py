"""The causal-LM benchmark (:mod:`benchmarks.lm`, data :mod:`benchmarks.lm_data`): the split by
file, the byte caps and the packing on a folder of known files and on the real standard
library; a tiny run of every method through ``transformers.Trainer`` and the files it writes."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="the LM benchmark needs transformers")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
pytest.importorskip("datasets", reason="the LM benchmark's data is a datasets.DatasetDict")

from bame_optim import nm_param_groups
from benchmarks import lm, lm_data

TINY = [
    "--steps", "8", "--batch-size", "4", "--block-size", "32", "--n-layer", "1", "--n-embd",
    "32", "--n-head", "2", "--lr", "1e-2", "--warmup-steps", "1", "--evals", "2",
    "--train-bytes", "20000", "--val-bytes", "3000",
]
"""A run of seconds: 8 steps of a 1-layer, 32-wide GPT-2, evaluated at steps 0, 4 and 8."""


def _write(root: Path, files: dict[str, bytes]) -> None:
    for relative, content in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(content)


def test_files_exclude_third_party_packages_and_non_python_files(tmp_path):
    _write(tmp_path, {"b.py": b"b", "pkg/a.py": b"a", "site-packages/x/y.py": b"y",
                      "dist-packages/z.py": b"z", "notes.txt": b"t", "pkg/data.pyc": b"c"})
    assert lm_data.stdlib_files(tmp_path) == ["b.py", "pkg/a.py"]


def test_split_depends_on_the_path_only():
    assert lm_data.split_of("os.py", 10) == lm_data.split_of("os.py", 10)
    names = [f"pkg{i}/mod{i}.py" for i in range(400)]
    val = [name for name in names if lm_data.split_of(name, 10) == "validation"]
    assert 20 <= len(val) <= 60  # about 10 % of the files
    assert {lm_data.split_of(n, 99) for n in names} >= {"validation"}


def test_known_files_are_split_capped_and_packed_in_hash_order(tmp_path):
    files = {f"m{i:02d}.py": bytes([65 + i % 26]) * (50 + i) for i in range(40)}
    _write(tmp_path, files)
    text = lm_data.load_stdlib_text(8, train_bytes=300, val_bytes=120, val_percent=30,
                                    root=tmp_path)
    for split, cap in (("train", 300), ("validation", 120)):
        assert text.bytes[split] == cap
        assert {lm_data.split_of(p, 30) for p in text.paths[split]} == {split}
        # the packed tokens: each file's bytes then the separator, the last file cut to fit
        sep = bytes([lm_data.SEPARATOR])
        *whole, last = text.paths[split]
        stream = b"".join(files[p] + sep for p in whole)
        stream += files[last][: cap - len(stream) - 1] + sep
        assert len(stream) == cap
        blocks = text.blocks[split]
        assert len(blocks) == cap // 8
        assert all(row["input_ids"] == row["labels"] for row in blocks)
        packed = b"".join(bytes(row["input_ids"]) for row in blocks)
        assert packed == stream[: len(blocks) * 8]
    assert not set(text.paths["train"]) & set(text.paths["validation"])


def test_a_cap_below_one_block_raises_naming_it(tmp_path):
    _write(tmp_path, {f"m{i}.py": b"x" * 100 for i in range(30)})
    with pytest.raises(ValueError, match="Invalid val_bytes value: 5"):
        lm_data.load_stdlib_text(8, train_bytes=100, val_bytes=5, root=tmp_path)


def test_the_real_standard_library_fills_both_caps():
    text = lm_data.load_stdlib_text(64, train_bytes=50_000, val_bytes=10_000)
    assert text.bytes == {"train": 50_000, "validation": 10_000}
    assert len(text.blocks["train"]) == 50_000 // 64
    assert all(len(row["input_ids"]) == 64 for row in text.blocks["validation"])
    assert all(p.endswith(".py") for p in text.paths["train"] + text.paths["validation"])
    first = text.paths["train"][0]
    head = (text.root / first).read_bytes()[:64]
    if len(head) == 64:
        assert bytes(text.blocks["train"][0]["input_ids"]) == head


def _sparse_count(cfg: lm.LMConfig) -> tuple[int, int]:
    """What ``nm_param_groups`` makes sparse in the benchmark's model: (params, weights)."""
    groups = nm_param_groups(lm.build_model(cfg, 0), 2, 4, weight_decay=cfg.weight_decay)
    params = [p for g in groups if g["sparse"] for p in g["params"]]
    params = [p[1] if isinstance(p, tuple) else p for p in params]
    return len(params), sum(p.numel() for p in params)


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_tiny_run_of_every_method_writes_its_table_curves_and_plot(tmp_path, capsys):
    table = lm.main([*TINY, "--seeds", "0", "1", "--output-dir", str(tmp_path)])

    assert [row["method"] for row in table] == list(lm.DEFAULT_METHODS)
    cfg = lm.parse_args(TINY).config
    sparse_params, sparse_weights = _sparse_count(cfg)
    for row in table:
        assert math.isfinite(row["val_loss_mean"]) and row["val_loss_std"] >= 0
        assert row["val_ppl_mean"] > 1 and row["seeds"] == "0 1" and row["nm_exact"]
        assert row["train_seconds"] > 0 and 0 < row["flops_ratio"] <= 1.0
        dense = row["method"] == "dense_adamw"
        # the Conv1D projections are counted, and sparse for the sparse methods
        assert dense or row["flops_ratio"] < 0.9
        assert row["pattern"] == ("-" if dense else "2:4")
        assert (row["sparse_params"], row["sparse_weights"]) == (
            (0, 0) if dense else (sparse_params, sparse_weights)
        )
    assert table[0]["flops_ratio"] == 1.0
    assert sparse_params == 4 * cfg.n_layer, "every Conv1D projection of every block"

    with open(tmp_path / "lm.csv") as f:
        assert [r["method"] for r in csv.DictReader(f)] == list(lm.DEFAULT_METHODS)
    with open(tmp_path / "lm_runs.csv") as f:
        runs = list(csv.DictReader(f))
    assert len(runs) == 6 and {"val_loss", "val_ppl", "sparse_params", "nm_exact"} <= set(runs[0])
    with open(tmp_path / "lm_curves.csv") as f:
        curves = list(csv.DictReader(f))
    for method in lm.DEFAULT_METHODS:
        for seed in ("0", "1"):
            curve = [(int(r["step"]), float(r["val_loss"])) for r in curves
                     if r["method"] == method and r["seed"] == seed]
            assert [step for step, _ in curve] == [0, 4, 8]
            # from about ln 256 = 5.5 (the initial model) down: byte frequencies are learnt
            # within a few steps at lr 1e-2
            assert curve[-1][1] < curve[0][1] - 0.3, (method, seed, curve)
    assert (tmp_path / "lm.png").stat().st_size > 1000
    assert "| bame_adamw | 2:4 |" in (tmp_path / "lm.md").read_text()
    assert "| dense_adamw | - |" in capsys.readouterr().out


def test_quick_and_overrides_set_the_config():
    assert lm.parse_args(["--quick"]).config == lm.QUICK
    args = lm.parse_args(["--quick", "--steps", "7", "--delta-t", "2"])
    assert (args.config.steps, args.config.schedule_delta_t) == (7, 2)
    assert lm.parse_args([]).config.schedule_delta_t == lm.DEFAULT.steps // 30


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--n-embd", "30", "--n-head", "4"], "--n-head: must divide --n-embd"),
        (["--steps", "0"], "--steps: must be >= 1"),
        (["--pattern", "4:4"], "invalid N:M pattern '4:4'"),
        (["--methods", "bame"], "invalid choice: 'bame'"),
    ],
)
def test_bad_arguments_exit_naming_them(argv, message, capsys):
    with pytest.raises(SystemExit):
        lm.parse_args(argv)
    assert message in capsys.readouterr().err

