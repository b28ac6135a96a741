"""IDX reading: exact round trip on a fixture, every corruption named, the real data's facts."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from bame_apps.integrations.idx import IMAGES_MAGIC, LABELS_MAGIC, load_idx_dataset, read_idx

SHARED_FASHION = Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion-mnist"


def test_round_trip(tmp_path, write_idx_folder):
    arrays = write_idx_folder(tmp_path)
    (xs, ys), (xt, yt) = load_idx_dataset(tmp_path)
    np.testing.assert_array_equal(xs, arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(ys, arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(xt, arrays["t10k-images-idx3-ubyte"])
    np.testing.assert_array_equal(yt, arrays["t10k-labels-idx1-ubyte"])


def test_uncompressed_files_without_checksums(tmp_path, write_idx_folder):
    arrays = write_idx_folder(tmp_path, checksums=False)
    for gz in tmp_path.glob("*.gz"):
        gz.with_suffix("").write_bytes(gzip.decompress(gz.read_bytes()))
        gz.unlink()
    (xs, _), _ = load_idx_dataset(tmp_path)
    np.testing.assert_array_equal(xs, arrays["train-images-idx3-ubyte"])


def _rewrite(path: Path, raw: bytes) -> None:
    path.write_bytes(gzip.compress(raw))


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda raw: raw[:-10], "MD5"),
        (lambda raw: raw[:2] + b"\x00\x00" + raw[4:], "MD5"),
    ],
)
def test_checksum_mismatch_is_named(tmp_path, corrupt, message, write_idx_folder):
    write_idx_folder(tmp_path)
    target = tmp_path / "t10k-images-idx3-ubyte.gz"
    _rewrite(target, corrupt(gzip.decompress(target.read_bytes())))
    with pytest.raises(ValueError, match=rf"t10k-images-idx3-ubyte.gz: {message}"):
        load_idx_dataset(tmp_path)


def test_truncated_payload_and_wrong_magic_without_checksums(tmp_path, write_idx_folder):
    write_idx_folder(tmp_path, checksums=False)
    target = tmp_path / "train-labels-idx1-ubyte.gz"
    raw = gzip.decompress(target.read_bytes())
    _rewrite(target, raw[:-3])
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte.gz: header says \(12,\)"):
        load_idx_dataset(tmp_path)
    _rewrite(target, IMAGES_MAGIC.to_bytes(4, "big") + raw[4:])
    with pytest.raises(ValueError, match=r"IDX magic 2051, expected 2049"):
        load_idx_dataset(tmp_path)


def test_truncated_gzip_stream(tmp_path, write_idx_folder):
    write_idx_folder(tmp_path)
    target = tmp_path / "train-images-idx3-ubyte.gz"
    target.write_bytes(target.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.gz: cannot decompress"):
        load_idx_dataset(tmp_path)


def test_missing_file_and_folder(tmp_path, write_idx_folder):
    write_idx_folder(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"t10k-labels-idx1-ubyte"):
        load_idx_dataset(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"folder not found"):
        load_idx_dataset(tmp_path / "nowhere")


def test_count_mismatch(tmp_path, write_idx_folder, idx_bytes):
    write_idx_folder(tmp_path, checksums=False)
    _rewrite(tmp_path / "t10k-labels-idx1-ubyte.gz", idx_bytes(np.zeros(4), LABELS_MAGIC))
    with pytest.raises(ValueError, match=r"test split has 5 images but 4 labels"):
        load_idx_dataset(tmp_path)


def test_real_fashion_mnist_labels_match_the_readme():
    sums = dict(reversed(line.split()) for line in (SHARED_FASHION / "MD5SUMS.decompressed").open())
    train = read_idx(
        SHARED_FASHION / "train-labels-idx1-ubyte.gz", LABELS_MAGIC, sums["train-labels-idx1-ubyte"]
    )
    test = read_idx(
        SHARED_FASHION / "t10k-labels-idx1-ubyte.gz", LABELS_MAGIC, sums["t10k-labels-idx1-ubyte"]
    )
    assert train[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert np.bincount(train).tolist() == [6000] * 10
    assert np.bincount(test).tolist() == [1000] * 10


def test_bad_deflate_data_is_named(tmp_path, write_idx_folder):
    """A gzip header followed by garbage: zlib's 'invalid block type', not a bare zlib.error."""
    write_idx_folder(tmp_path)
    target = tmp_path / "train-images-idx3-ubyte.gz"
    data = bytearray(target.read_bytes())
    data[10:30] = b"\xff" * 20  # the deflate stream starts after the 10-byte gzip header
    target.write_bytes(bytes(data))
    with pytest.raises(
        ValueError, match=r"train-images-idx3-ubyte\.gz: cannot decompress .*corrupt"
    ):
        load_idx_dataset(tmp_path)


@pytest.mark.parametrize("split, bad", [("train", 10), ("t10k", 255)])
def test_labels_out_of_range_are_named(tmp_path, write_idx_folder, idx_bytes, split, bad):
    arrays = write_idx_folder(tmp_path, checksums=False)
    name = f"{split}-labels-idx1-ubyte"
    labels = arrays[name].copy()
    labels[3] = bad
    _rewrite(tmp_path / f"{name}.gz", idx_bytes(labels, LABELS_MAGIC))
    pattern = rf"{name}\.gz: label {bad} at index 3 is outside 0\.\.9 \(10 classes\)"
    with pytest.raises(ValueError, match=pattern):
        load_idx_dataset(tmp_path)
    load_idx_dataset(tmp_path, num_classes=bad + 1)  # in range for more classes


@pytest.mark.parametrize(
    "line, shown",
    [("0123abcd", "'0123abcd'"), ("not-an-md5  train-images-idx3-ubyte", "'not-an-md5  ")],
)
def test_malformed_checksum_line_is_named(tmp_path, write_idx_folder, line, shown):
    write_idx_folder(tmp_path)
    sums = tmp_path / "MD5SUMS.decompressed"
    lines = sums.read_text().splitlines()
    sums.write_text("\n".join([lines[0], "", line, *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=rf"MD5SUMS\.decompressed, line 3: expected .*{shown}"):
        load_idx_dataset(tmp_path)
