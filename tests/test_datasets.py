"""Finding and loading image sources (``integrations/datasets/detect.py`` and ``load.py``):
round trips from every local source, named errors for missing and corrupt files, offline Hub
names, the real Fashion-MNIST. Transforms: test_datasets_transforms.py; torch loaders:
test_datasets_torch_data.py."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from bame_apps.integrations.datasets import (
    CIFAR10_CLASSES,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    MNIST_CLASSES,
    DatasetUnavailableError,
    TorchImageDataset,
    detect_kind,
    image_transforms,
    load_image_dataset,
    make_loaders,
)
from bame_apps.integrations.idx import load_idx_dataset

SHARED_FASHION = Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion-mnist"
CLASSES = ("cat", "ant", "dog")


def write_image_folder(root: Path, per_class: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """``root/{train,test}/<class>/<i>.png`` of random 8x8 RGB images; returns path -> pixels."""
    rng = np.random.default_rng(seed)
    written = {}
    for split in ("train", "test"):
        for name in CLASSES:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
                written[str(folder / f"{i}.png")] = pixels
    return written


def pixels(ds: datasets.Dataset) -> np.ndarray:
    return np.stack([np.asarray(image) for image in ds["image"]])


def labels(ds: datasets.Dataset) -> np.ndarray:
    return np.asarray(list(ds["label"]))


@pytest.fixture
def cifar(tmp_path, write_cifar_folder) -> tuple[Path, datasets.DatasetDict]:
    write_cifar_folder(tmp_path / "cifar")
    return tmp_path / "cifar", load_image_dataset(tmp_path / "cifar")


def test_imagefolder_round_trip_in_cache_dir(tmp_path):
    written = write_image_folder(tmp_path / "images")
    assert detect_kind(tmp_path / "images") == "imagefolder"
    dd = load_image_dataset(tmp_path / "images", cache_dir=tmp_path / "cache")
    assert set(dd) == {"train", "test"}
    names = sorted(CLASSES)
    for split in ("train", "test"):
        ds = dd[split]
        assert ds.features["label"].names == names
        assert len(ds) == 6 and sorted(labels(ds).tolist()) == [0, 0, 1, 1, 2, 2]
        paths = ds.cast_column("image", datasets.Image(decode=False))["image"]
        for value, image, label in zip(paths, ds["image"], ds["label"], strict=True):
            path = Path(value["path"])
            assert path.parts[-3] == split and names[label] == path.parent.name
            np.testing.assert_array_equal(np.asarray(image), written[str(path)])
    # the Arrow cache went to cache_dir, next to nothing else
    assert list((tmp_path / "cache").rglob("*.arrow"))


def test_imagefolder_corrupt_image_is_named(tmp_path):
    write_image_folder(tmp_path / "images")
    bad = tmp_path / "images" / "train" / "dog" / "1.png"
    bad.write_bytes(bad.read_bytes()[:60])
    with pytest.raises(ValueError, match=r"dog/1\.png: corrupt or truncated image"):
        load_image_dataset(tmp_path / "images", cache_dir=tmp_path / "cache")
    # without the up-front check, decoding in the torch dataset names the file
    dd = load_image_dataset(tmp_path / "images", cache_dir=tmp_path / "cache", verify_images=False)
    view = TorchImageDataset(dd["train"])
    with pytest.raises(ValueError, match=r"dog/1\.png: cannot decode image train\[\d+\]"):
        [view[i] for i in range(len(view))]


def test_imagefolder_without_class_folders(tmp_path):
    (tmp_path / "flat" / "train").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "flat" / "train" / "a.png")
    with pytest.raises(ValueError, match=r"0 ClassLabel columns.*train/<class>/\*\.png"):
        load_image_dataset(tmp_path / "flat", cache_dir=tmp_path / "cache")


def test_cifar_round_trip(cifar):
    folder, dd = cifar
    assert detect_kind(folder) == "cifar10"
    assert len(dd["train"]) == 20 and len(dd["test"]) == 4
    assert dd["train"].features["label"].names == list(CIFAR10_CLASSES)
    with open(folder / "data_batch_2", "rb") as f:
        raw = pickle.load(f)
    expected = raw[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(pixels(dd["train"].select(range(4, 8))), expected)
    np.testing.assert_array_equal(labels(dd["train"].select(range(4, 8))), raw[b"labels"])
    assert dd["test"][0]["image"].mode == "RGB"


def test_idx_round_trip_and_class_names(tmp_path, write_idx_folder):
    arrays = write_idx_folder(tmp_path / "digits")
    assert detect_kind(tmp_path / "digits") == "mnist"
    dd = load_image_dataset(tmp_path / "digits")
    assert dd["train"].features["label"].names == list(MNIST_CLASSES)
    np.testing.assert_array_equal(pixels(dd["train"]), arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(labels(dd["test"]), arrays["t10k-labels-idx1-ubyte"])
    assert dd["test"][0]["image"].mode == "L"
    fashion = load_image_dataset(tmp_path / "digits", kind="fashion-mnist")
    assert fashion["test"].features["label"].names == list(FASHION_MNIST_CLASSES)


def test_idx_missing_and_corrupt_files_are_named(tmp_path, write_idx_folder):
    write_idx_folder(tmp_path)
    gz = tmp_path / "t10k-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:40])
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte\.gz: cannot decompress"):
        load_image_dataset(tmp_path)
    gz.unlink()
    with pytest.raises(FileNotFoundError, match=r"missing IDX file .*t10k-images-idx3-ubyte"):
        load_image_dataset(tmp_path)


def test_cifar_corrupt_batch_is_named(tmp_path, write_cifar_folder):
    write_cifar_folder(tmp_path)
    (tmp_path / "test_batch").write_bytes((tmp_path / "test_batch").read_bytes()[:50])
    with pytest.raises(ValueError, match=r"test_batch is not a readable CIFAR-10 batch"):
        load_image_dataset(tmp_path)


def test_save_to_disk_parquet_and_arrow_round_trips(tmp_path, cifar):
    _, dd = cifar
    dd.save_to_disk(tmp_path / "disk")
    dd["test"].save_to_disk(tmp_path / "single")
    (tmp_path / "pq").mkdir()
    for split in dd:
        dd[split].to_parquet(tmp_path / "pq" / f"{split}-00000-of-00001.parquet")
        (tmp_path / "arrow" / split).mkdir(parents=True)
        for file in (tmp_path / "disk" / split).glob("*.arrow"):
            shutil.copy(file, tmp_path / "arrow" / split / file.name)
    sources = {"disk": "disk", "pq": "parquet", "arrow": "arrow"}
    for folder, kind in sources.items():
        assert detect_kind(tmp_path / folder) == kind
        loaded = load_image_dataset(tmp_path / folder, cache_dir=tmp_path / "cache")
        assert set(loaded) == {"train", "test"}, folder
        for split in dd:
            assert loaded[split].features == dd[split].features, folder
            np.testing.assert_array_equal(pixels(loaded[split]), pixels(dd[split]))
            np.testing.assert_array_equal(labels(loaded[split]), labels(dd[split]))
    single = load_image_dataset(tmp_path / "single")
    assert list(single) == ["test"] and len(single["test"]) == 4
    one_file = tmp_path / "pq" / "test-00000-of-00001.parquet"
    assert len(load_image_dataset(one_file, cache_dir=tmp_path / "cache")["train"]) == 4


def test_corrupt_parquet_and_arrow_are_named(tmp_path, cifar):
    _, dd = cifar
    (tmp_path / "pq").mkdir()
    for split in dd:
        dd[split].to_parquet(tmp_path / "pq" / f"{split}-00000-of-00001.parquet")
    bad = tmp_path / "pq" / "test-00000-of-00001.parquet"
    bad.write_bytes(bad.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"test-00000-of-00001\.parquet: not a readable parquet"):
        load_image_dataset(tmp_path / "pq", cache_dir=tmp_path / "cache")
    dd.save_to_disk(tmp_path / "disk")
    (arrow,) = (tmp_path / "disk" / "train").glob("*.arrow")
    arrow.write_bytes(arrow.read_bytes()[:300])
    with pytest.raises(ValueError, match=r"disk: cannot read this save_to_disk folder"):
        load_image_dataset(tmp_path / "disk")


def test_detection_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty: no dataset found; expected IDX files"):
        load_image_dataset(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"no such file or folder: .*nowhere"):
        load_image_dataset(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"cifar10 dataset path not found"):
        load_image_dataset(tmp_path / "nowhere", kind="cifar10")
    with pytest.raises(ValueError, match=r"Invalid kind value: 'tfds'"):
        load_image_dataset(tmp_path, kind="tfds")
    assert detect_kind("uoft-cs/cifar10") == "hub"
    assert detect_kind("fashion_mnist") == "hub"


def test_hub_name_offline_fails_fast_with_a_clear_error(tmp_path):
    """With HF_HUB_OFFLINE=1, ``datasets`` raises a ConnectionError at once: no connection
    attempt and no name lookup (which retries would make). The env var is read when
    ``datasets`` is imported, hence the fresh interpreter, which counts the socket calls."""
    script = textwrap.dedent(
        f"""
        import socket

        calls = []
        for name in ("connect", "connect_ex"):
            def counted(self, address, _name=name, _original=getattr(socket.socket, name)):
                calls.append((_name, address))
                return _original(self, address)
            setattr(socket.socket, name, counted)
        _getaddrinfo = socket.getaddrinfo
        def lookup(*args, **kwargs):
            calls.append(("getaddrinfo", args[:2]))
            return _getaddrinfo(*args, **kwargs)
        socket.getaddrinfo = lookup

        from bame_apps.integrations.datasets import DatasetUnavailableError, load_image_dataset
        try:
            load_image_dataset("uoft-cs/cifar10", cache_dir={str(tmp_path / "cache")!r})
        except DatasetUnavailableError as err:
            print("RAISED", err)
        print("SOCKET CALLS", calls)
        """
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf_home"),
    }
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "RAISED cannot load dataset 'uoft-cs/cifar10'" in result.stdout
    assert "HF_HUB_OFFLINE is set" in result.stdout
    assert "Pass a local path instead" in result.stdout
    assert "SOCKET CALLS []" in result.stdout, result.stdout
    assert issubclass(DatasetUnavailableError, ConnectionError)


@pytest.mark.skipif(not SHARED_FASHION.is_dir(), reason="shared Fashion-MNIST not present")
def test_real_fashion_mnist():
    dd = load_image_dataset(SHARED_FASHION)
    assert detect_kind(SHARED_FASHION) == "fashion-mnist"
    assert dd["test"].features["label"].names == list(FASHION_MNIST_CLASSES)
    assert len(dd["train"]) == 60_000 and len(dd["test"]) == 10_000
    assert np.bincount(labels(dd["test"]), minlength=10).tolist() == [1000] * 10
    assert labels(dd["train"].select(range(10))).tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    (train_images, _), (test_images, _) = load_idx_dataset(SHARED_FASHION)
    np.testing.assert_array_equal(np.asarray(dd["test"][1234]["image"]), test_images[1234])
    scaled = train_images / 255.0
    assert round(float(scaled.mean()), 4) == FASHION_MNIST_MEAN[0]
    assert round(float(scaled.std()), 4) == FASHION_MNIST_STD[0]
    _, test = make_loaders(
        dd,
        batch_size=256,
        train_transform=image_transforms("fashion-mnist", train=True),
        test_transform=image_transforms("fashion-mnist", train=False),
    )
    x, y = next(iter(test))
    assert x.shape == (256, 1, 28, 28) and y.shape == (256,)


def _with_labels(split: datasets.Dataset, values: list[int]) -> datasets.Dataset:
    """``split`` with its labels replaced by ``values`` (``cast_column`` does not check them)."""
    feature = split.features["label"]
    return split.remove_columns("label").add_column("label", values).cast_column("label", feature)


@pytest.mark.parametrize("bad, hint", [(10, ""), (-1, r" \(-1 is datasets' 'no label'\)")])
def test_saved_labels_out_of_range_are_named(tmp_path, cifar, bad, hint):
    _, dd = cifar
    broken = datasets.DatasetDict(train=dd["train"], test=_with_labels(dd["test"], [0, 1, bad, 2]))
    broken.save_to_disk(tmp_path / "disk")
    (tmp_path / "pq").mkdir()
    for split in broken:
        broken[split].to_parquet(tmp_path / "pq" / f"{split}-00000-of-00001.parquet")
    for folder in ("disk", "pq"):
        pattern = (
            rf"{folder}: split 'test': label {bad} at index 2 is outside 0\.\.9 \(10 classes\)"
            rf"{hint}; 1 label\(s\) out of range"
        )
        with pytest.raises(ValueError, match=pattern):
            load_image_dataset(tmp_path / folder, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize(
    "source, reason",
    [
        ("./dat/fashion-mnist", r"it starts with '\.'"),
        ("~/no-such-dataset-folder", r"it starts with '~'"),
        ("/no/such/folder", r"it starts with '/'"),
        ("data/fashion-mnst", r"'data' exists here"),
        ("dat/", r"it ends with '/'"),
        ("some/deep/folder", r"it has more than one '/'"),
        ("dat\\fashion", "it contains a backslash"),
        ("my data", r"it is not of the form 'name' or 'owner/name'"),
    ],
)
def test_a_missing_local_path_is_not_taken_as_a_hub_name(tmp_path, monkeypatch, source, reason):
    """Rule of :func:`detect_kind`: such a string fails at once, naming the path; the Hub
    loader is never called (no network, no retries)."""
    import bame_apps.integrations.datasets.load as image_datasets

    def no_hub(*args, **kwargs):
        pytest.fail(f"the Hub loader was called with {args} {kwargs}")

    monkeypatch.setattr(image_datasets, "_load_hub", no_hub)
    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    pattern = (
        rf"no such file or folder: .*\({reason}, so not a Hugging Face Hub name\); "
        r"a Hub dataset name looks like 'owner/name'"
    )
    with pytest.raises(FileNotFoundError, match=pattern):
        detect_kind(source)
    with pytest.raises(FileNotFoundError, match=pattern):
        load_image_dataset(source)


def test_hub_names_stay_hub_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for name in ("uoft-cs/cifar10", "fashion_mnist", "zalando-datasets/fashion_mnist"):
        assert detect_kind(name) == "hub", name
    with pytest.raises(ValueError, match="data: no dataset found"):  # it exists: local
        detect_kind("data")
