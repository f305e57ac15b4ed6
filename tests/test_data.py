"""Tests for hypergrad.data: IDX files, loaders, splits, label noise."""

from __future__ import annotations

import gzip
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Subset

from hypergrad.data import (
    CIFAR10_CLASSES,
    MNIST_MEAN,
    MNIST_STD,
    DatasetNotFoundError,
    IndexedDataset,
    inject_label_noise,
    load_cifar10,
    load_cifar10_folder,
    load_digits_dataset,
    load_mnist,
    normalize,
    read_idx,
    split_indices,
)

DATA_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MNIST_DIR = DATA_ROOT / "mnist"
FASHION_DIR = DATA_ROOT / "fashion-mnist"
CIFAR_ARCHIVE = DATA_ROOT / "cifar10-jpg-test" / "cifar10-test-jpg.tar.gz"

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _require(path: Path) -> Path:
    """Skips the test when a shared data file or folder is absent."""
    if not path.exists():
        pytest.skip(f"shared data not found at {path} (expected beside the repo)")
    return path


def _write_idx(path: Path, array: np.ndarray, type_code: int = 0x08) -> Path:
    """Writes ``array`` as an IDX file (gzipped when the name ends in .gz)."""
    dtypes = {0x08: ">u1", 0x0B: ">i2", 0x0D: ">f4"}
    header = bytes([0, 0, type_code, array.ndim])
    header += b"".join(d.to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(dtypes[type_code]).tobytes()
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)
    return path


def _write_mnist_like(folder: Path, prefix: str, n: int, gz: bool = False) -> None:
    """Writes a small, valid pair of MNIST-style IDX files into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    images = np.arange(n * 28 * 28, dtype=np.int64).reshape(n, 28, 28) % 256
    _write_idx(folder / f"{prefix}-images-idx3-ubyte{ext}", images)
    _write_idx(folder / f"{prefix}-labels-idx1-ubyte{ext}", np.arange(n) % 10)


# --- IDX files ------------------------------------------------------------------


def test_read_idx_real_mnist_train():
    images = read_idx(_require(MNIST_DIR / "train-images-idx3-ubyte.gz"))
    labels = read_idx(_require(MNIST_DIR / "train-labels-idx1-ubyte.gz"))

    assert images.shape == (60000, 28, 28)
    assert images.dtype == torch.uint8
    assert labels.shape == (10000 * 6,)
    assert torch.bincount(labels.long(), minlength=10).tolist() == MNIST_TRAIN_COUNTS


def test_load_mnist_real_files():
    _require(MNIST_DIR)
    train_images, train_labels = load_mnist(MNIST_DIR, train=True)
    test_images, test_labels = load_mnist(MNIST_DIR, train=False)

    assert train_images.shape == (60000, 28, 28)
    assert test_images.shape == (10000, 28, 28)
    assert train_images.dtype == test_images.dtype == torch.uint8
    assert train_labels.dtype == test_labels.dtype == torch.int64
    assert torch.bincount(train_labels).tolist() == MNIST_TRAIN_COUNTS
    assert torch.bincount(test_labels).tolist() == MNIST_TEST_COUNTS


def test_load_fashion_mnist_test_set():
    _require(FASHION_DIR)
    images, labels = load_mnist(FASHION_DIR, train=False, kind="fashion-mnist")

    assert images.shape == (10000, 28, 28)
    assert torch.bincount(labels).tolist() == [1000] * 10
    assert images.double().mean().item() == pytest.approx(73.1, abs=0.05)


@pytest.mark.parametrize("name", ["values.idx", "values.idx.gz"])
@pytest.mark.parametrize(
    ("type_code", "dtype"), [(0x08, np.uint8), (0x0B, np.int16), (0x0D, np.float32)]
)
def test_read_idx_round_trip(tmp_path, name, type_code, dtype):
    array = (np.arange(2 * 3 * 4).reshape(2, 3, 4) * 7 % 200).astype(dtype)
    path = _write_idx(tmp_path / name, array, type_code)

    result = read_idx(path)

    assert result.shape == (2, 3, 4)
    assert result.numpy().dtype == dtype
    np.testing.assert_array_equal(result.numpy(), array)


def test_read_idx_truncated_payload(tmp_path):
    path = _write_idx(tmp_path / "images.idx", np.zeros((3, 28, 28)))
    path.write_bytes(path.read_bytes()[:-100])

    with pytest.raises(
        ValueError,
        match=r"images\.idx: expected 2352 bytes of data for shape \(3, 28, 28\) "
        r"\(uint8\), found 2252\. .*download it again",
    ):
        read_idx(path)


def test_read_idx_truncated_gzip(tmp_path):
    path = tmp_path / "images.idx.gz"
    _write_idx(path, np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256)
    path.write_bytes(path.read_bytes()[:-20])

    with pytest.raises(
        ValueError, match=r"images\.idx\.gz: expected a complete gzip stream"
    ):
        read_idx(path)


def test_read_idx_real_file_truncated(tmp_path):
    source = _require(MNIST_DIR / "t10k-labels-idx1-ubyte.gz")
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.write_bytes(gzip.decompress(source.read_bytes())[:5000])

    with pytest.raises(ValueError, match=r"expected 10000 bytes .* found 4992"):
        read_idx(path)


def test_read_idx_bad_magic(tmp_path):
    path = tmp_path / "junk.idx"
    path.write_bytes(b"\x12\x34\x56\x78" + bytes(16))

    with pytest.raises(
        ValueError,
        match=r"junk\.idx: expected an IDX magic number 0x0000TTNN .* found "
        r"0x12345678\. .*download it again",
    ):
        read_idx(path)


def test_read_idx_unknown_type_code(tmp_path):
    path = tmp_path / "odd.idx"
    path.write_bytes(bytes([0, 0, 0x07, 1]) + (4).to_bytes(4, "big") + bytes(4))

    with pytest.raises(ValueError, match=r"found 0x00000701"):
        read_idx(path)


def test_read_idx_expected_magic_mismatch(tmp_path):
    path = _write_idx(tmp_path / "labels.idx", np.arange(5))

    with pytest.raises(
        ValueError,
        match=r"expected IDX magic number 0x00000803 \(uint8, 3 dims\), found "
        r"0x00000801 \(uint8, 1 dims\)\. .*images and labels swapped",
    ):
        read_idx(path, magic=0x00000803)


@pytest.mark.parametrize("content", [b"", b"\x00\x00", b"\x00\x00\x08\x03\x00"])
def test_read_idx_too_short(tmp_path, content):
    path = tmp_path / "short.idx"
    path.write_bytes(content)

    with pytest.raises(ValueError, match=r"short\.idx: expected .*found only"):
        read_idx(path)


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_idx(tmp_path / "absent.idx")


# --- MNIST loader -------------------------------------------------------------


def test_load_mnist_torchvision_layout_real_files(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (raw / name).symlink_to(_require(MNIST_DIR / name))

    images, labels = load_mnist(tmp_path, train=False)

    assert images.shape == (10000, 28, 28)
    assert torch.bincount(labels).tolist() == MNIST_TEST_COUNTS


def test_load_mnist_torchvision_layout_uncompressed(tmp_path):
    _write_mnist_like(tmp_path / "FashionMNIST" / "raw", "train", n=7)

    images, labels = load_mnist(tmp_path, train=True, kind="fashion-mnist")

    assert images.shape == (7, 28, 28)
    assert images.dtype == torch.uint8
    assert labels.tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert labels.dtype == torch.int64


def test_load_mnist_missing_files_lists_folders(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_mnist(tmp_path, train=True)

    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert "\n" not in message
    assert "train-images-idx3-ubyte" in message
    assert str(tmp_path) in message
    assert str(tmp_path / "MNIST" / "raw") in message


def test_load_mnist_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"found no t10k-images-idx3-ubyte"):
        load_mnist(tmp_path / "nowhere", train=False)


def test_load_mnist_count_mismatch(tmp_path):
    _write_mnist_like(tmp_path, "t10k", n=4)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(3))

    with pytest.raises(ValueError, match=r"expected \(n, 28, 28\) images and n labels"):
        load_mnist(tmp_path, train=False)


def test_load_mnist_swapped_files(tmp_path):
    _write_mnist_like(tmp_path, "t10k", n=2)
    labels = tmp_path / "t10k-labels-idx1-ubyte"
    images = tmp_path / "t10k-images-idx3-ubyte"
    images.write_bytes(labels.read_bytes())

    with pytest.raises(ValueError, match=r"expected IDX magic number 0x00000803"):
        load_mnist(tmp_path, train=False)


def test_load_mnist_unknown_kind(tmp_path):
    with pytest.raises(ValueError, match=r"expected kind to be one of .*'mnist'"):
        load_mnist(tmp_path, kind="kmnist")


# --- CIFAR-10 and image folders -------------------------------------------------


def _write_png_tree(root: Path, classes: dict[str, int], size=(4, 3)) -> None:
    """Writes ``count`` solid-colour PNGs per class; colour encodes the class."""
    from PIL import Image

    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            colour = (ord(name[0]), i, 200)
            Image.new("RGB", size, colour).save(root / name / f"{i:03d}.png")


def test_cifar_archive_subset(tmp_path):
    archive = _require(CIFAR_ARCHIVE)

    images, labels = load_cifar10_folder(archive, cache_dir=tmp_path, max_per_class=3)

    assert images.shape == (30, 3, 32, 32)
    assert images.dtype == torch.uint8
    assert labels.tolist() == [c for c in range(10) for _ in range(3)]
    extracted = sorted(
        p.name for p in (tmp_path / "cifar10-test-jpg" / "test").iterdir()
    )
    assert extracted == list(CIFAR10_CLASSES)


def test_cifar_archive_full_and_cached(tmp_path, monkeypatch):
    archive = _require(CIFAR_ARCHIVE)
    images, labels = load_cifar10_folder(archive, cache_dir=tmp_path)

    def no_extraction(*args, **kwargs):
        raise AssertionError("the archive was extracted a second time")

    monkeypatch.setattr(tarfile, "open", no_extraction)
    again, _ = load_cifar10_folder(
        archive, cache_dir=tmp_path, channels_last=True, max_per_class=2
    )

    assert images.shape == (10000, 3, 32, 32)
    assert torch.bincount(labels).tolist() == [1000] * 10
    assert again.shape == (20, 32, 32, 3)
    torch.testing.assert_close(again[0], images[0].permute(1, 2, 0))


def test_image_folder_labels_follow_sorted_names(tmp_path):
    _write_png_tree(tmp_path / "data", {"bee": 2, "ant": 1, "cow": 3})

    images, labels = load_cifar10_folder(tmp_path / "data", channels_last=True)

    assert images.shape == (6, 3, 4, 3)
    assert labels.tolist() == [0, 1, 1, 2, 2, 2]
    assert (
        images[:, 0, 0, 0].tolist() == [ord("a"), ord("b"), ord("b")] + [ord("c")] * 3
    )
    assert images[:, 0, 0, 1].tolist() == [0, 0, 1, 0, 1, 2]


def test_image_folder_split_and_wrapper(tmp_path):
    _write_png_tree(tmp_path / "both" / "train", {"a": 2, "b": 2})
    _write_png_tree(tmp_path / "both" / "test", {"a": 1, "b": 1})
    _write_png_tree(tmp_path / "wrapped" / "test", {"a": 1, "b": 1})

    _, train_labels = load_cifar10_folder(tmp_path / "both", split="train")
    _, wrapped_labels = load_cifar10_folder(tmp_path / "wrapped")

    assert train_labels.tolist() == [0, 0, 1, 1]
    assert wrapped_labels.tolist() == [0, 1]
    with pytest.raises(DatasetNotFoundError, match=r"for split='val'"):
        load_cifar10_folder(tmp_path / "both", split="val")


def test_image_folder_synthetic_archive(tmp_path):
    _write_png_tree(tmp_path / "tree" / "test", {"x": 2, "y": 1})
    archive = tmp_path / "tiny.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "tree" / "test", arcname="test")

    images, labels = load_cifar10_folder(archive, cache_dir=tmp_path / "cache")

    assert images.shape == (3, 3, 3, 4)  # PIL sizes are (width, height)
    assert labels.tolist() == [0, 0, 1]
    assert (tmp_path / "cache" / "tiny" / "test" / "x").is_dir()


def test_image_folder_errors(tmp_path):
    _write_png_tree(tmp_path / "mixed", {"a": 1})
    _write_png_tree(tmp_path / "mixed2", {"b": 1}, size=(5, 5))
    (tmp_path / "mixed2" / "b").rename(tmp_path / "mixed" / "b")
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(b"not an archive")

    with pytest.raises(ValueError, match=r"expected every image to be 4x3 .* got 5x5"):
        load_cifar10_folder(tmp_path / "mixed")
    with pytest.raises(DatasetNotFoundError, match=r"does not exist"):
        load_cifar10_folder(tmp_path / "absent")
    with pytest.raises(ValueError, match=r"needs a folder .*pass cache_dir="):
        load_cifar10_folder(broken)
    with pytest.raises(ValueError, match=r"could not extract .*download it again"):
        load_cifar10_folder(broken, cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match=r"expected max_per_class to be None or"):
        load_cifar10_folder(tmp_path / "mixed", max_per_class=0)
    with pytest.raises(ValueError, match=r"expected class sub-folders of images"):
        load_cifar10_folder(tmp_path / "cache")
    (tmp_path / "cache" / "broken").mkdir()
    with pytest.raises(ValueError, match=r"found something else there .*Remove it"):
        load_cifar10_folder(broken, cache_dir=tmp_path / "cache")


def test_image_folder_undecodable_file(tmp_path):
    _write_png_tree(tmp_path / "data", {"a": 1})
    (tmp_path / "data" / "a" / "zzz.jpg").write_bytes(b"not a jpeg")

    with pytest.raises(ValueError, match=r"could not decode .*zzz\.jpg"):
        load_cifar10_folder(tmp_path / "data")


def test_load_cifar10_pickle_layout_missing(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"found no folder cifar-10-batches"):
        load_cifar10(tmp_path)


# --- scikit-learn digits --------------------------------------------------------


def test_load_digits_dataset():
    images, labels = load_digits_dataset()

    assert images.shape == (1797, 1, 8, 8)
    assert images.dtype == torch.float32
    assert images.min().item() == 0.0
    assert images.max().item() == 1.0
    assert labels.dtype == torch.int64
    assert sorted(labels.unique().tolist()) == list(range(10))


# --- IndexedDataset -------------------------------------------------------------


def test_indexed_dataset_items_and_loader():
    inputs = torch.arange(12.0).view(6, 2)
    targets = torch.tensor([3, 1, 4, 1, 5, 9])
    dataset = IndexedDataset(inputs, targets)

    x, y, index = dataset[4]
    batches = list(DataLoader(dataset, batch_size=4))
    subset_item = Subset(dataset, [5, 2])[1]

    assert len(dataset) == 6
    assert type(index) is int and index == 4
    torch.testing.assert_close(x, inputs[4])
    assert y.item() == 5
    assert dataset[-1][2] == 5
    assert batches[0][2].tolist() == [0, 1, 2, 3]
    assert batches[1][2].tolist() == [4, 5]
    assert subset_item[2] == 2
    with pytest.raises(IndexError):
        dataset[6]


def test_indexed_dataset_validates():
    with pytest.raises(ValueError, match=r"got 3 inputs and 2 targets"):
        IndexedDataset(torch.zeros(3, 2), torch.zeros(2))
    with pytest.raises(TypeError, match=r"expected targets to be a tensor .* got list"):
        IndexedDataset(torch.zeros(3), [0, 1, 2])


# --- splits ---------------------------------------------------------------------


def test_split_indices_deterministic_and_disjoint():
    first = split_indices(100, [50, 30, 20], seed=7)
    second = split_indices(100, [50, 30, 20], seed=7)
    other = split_indices(100, [50, 30, 20], seed=8)

    assert [len(s) for s in first] == [50, 30, 20]
    assert all(s.dtype == torch.int64 for s in first)
    assert torch.cat(first).sort().values.tolist() == list(range(100))
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], other[0])
    assert all(torch.equal(s, s.sort().values) for s in first)


def test_split_indices_partial_cover():
    train, val = split_indices(10, [3, 2], seed=0)

    assert len(set(train.tolist()) | set(val.tolist())) == 5
    assert set(train.tolist()).isdisjoint(val.tolist())


def test_split_indices_too_large():
    with pytest.raises(
        ValueError,
        match=r"requested sizes \[8, 5\] \(total 13\), but only 10 samples are "
        r"available\. Make the sizes add up to at most 10\.",
    ):
        split_indices(10, [8, 5], seed=0)


def test_split_indices_bad_arguments():
    with pytest.raises(ValueError, match=r"expected each size to be at least 0"):
        split_indices(10, [3, -1], seed=0)
    with pytest.raises(TypeError, match=r"expected seed to be an int, got 1.5"):
        split_indices(10, [3], seed=1.5)


# --- label noise ----------------------------------------------------------------


@pytest.mark.parametrize(("n", "fraction"), [(1000, 0.5), (999, 0.3), (5, 0.5)])
def test_label_noise_exact_count_and_all_differ(n, fraction):
    targets = torch.arange(n) % 10

    noisy, flipped = inject_label_noise(targets, fraction, num_classes=10, seed=1)

    changed = (noisy != targets).nonzero().flatten()
    assert len(flipped) == round(fraction * n)
    assert flipped.dtype == torch.int64
    assert torch.equal(flipped, flipped.sort().values)
    assert torch.equal(changed, flipped)
    assert int(noisy.min()) >= 0 and int(noisy.max()) < 10
    assert noisy.dtype == targets.dtype


def test_label_noise_seeded_and_uniform_over_other_classes():
    targets = torch.zeros(2000, dtype=torch.int64)

    first = inject_label_noise(targets, 0.5, 4, seed=3)
    second = inject_label_noise(targets, 0.5, 4, seed=3)
    other = inject_label_noise(targets, 0.5, 4, seed=4)

    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[1], other[1])
    counts = torch.bincount(first[0][first[1]], minlength=4).tolist()
    assert counts[0] == 0
    assert all(250 < c < 420 for c in counts[1:])
    assert torch.equal(targets, torch.zeros(2000, dtype=torch.int64))  # untouched


def test_label_noise_edges():
    targets = torch.tensor([0, 1, 1, 0])

    none, flipped_none = inject_label_noise(targets, 0.0, 2, seed=0)
    every, flipped_all = inject_label_noise(targets, 1.0, 2, seed=0)

    assert torch.equal(none, targets) and flipped_none.numel() == 0
    assert torch.equal(every, 1 - targets) and flipped_all.tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("fraction", [-0.1, 1.5, float("nan"), 50])
def test_label_noise_bad_fraction(fraction):
    with pytest.raises(ValueError, match=r"expected fraction in \[0, 1\]"):
        inject_label_noise(torch.tensor([0, 1]), fraction, 2, seed=0)


def test_label_noise_bad_targets():
    with pytest.raises(ValueError, match=r"expected labels in \[0, 3\), got labels"):
        inject_label_noise(torch.tensor([0, 3]), 0.5, 3, seed=0)
    with pytest.raises(TypeError, match=r"expected targets to be an integer tensor"):
        inject_label_noise(torch.tensor([0.0, 1.0]), 0.5, 2, seed=0)
    with pytest.raises(ValueError, match=r"expected targets of shape \(n,\)"):
        inject_label_noise(torch.zeros(2, 2, dtype=torch.int64), 0.5, 2, seed=0)
    with pytest.raises(ValueError, match=r"expected num_classes >= 2"):
        inject_label_noise(torch.tensor([0, 0]), 0.5, 1, seed=0)


# --- normalize ------------------------------------------------------------------


def test_normalize_scales_and_adds_channel():
    images = torch.tensor([[[0, 255], [51, 102]]], dtype=torch.uint8)

    x = normalize(images)

    assert x.shape == (1, 1, 2, 2)
    assert x.dtype == torch.float32
    torch.testing.assert_close(x.flatten(), torch.tensor([0.0, 1.0, 0.2, 0.4]))


def test_normalize_channels_last_and_mean_std():
    images = torch.randint(0, 256, (2, 5, 6, 3), dtype=torch.uint8)

    x = normalize(images, mean=(0.5, 0.4, 0.3), std=(0.1, 0.2, 0.3))

    expected = (images.permute(0, 3, 1, 2).float() / 255 - 0.4) / 0.2
    assert x.shape == (2, 3, 5, 6)
    torch.testing.assert_close(x[:, 1], expected[:, 1])
    assert x.is_contiguous()


def test_normalize_mnist_statistics():
    images, _ = load_mnist(_require(MNIST_DIR), train=False)

    x = normalize(images, MNIST_MEAN, MNIST_STD)

    assert abs(x.mean().item()) < 0.02
    assert x.std().item() == pytest.approx(1.0, abs=0.02)


def test_normalize_errors():
    with pytest.raises(TypeError, match=r"expected uint8 images .* got dtype"):
        normalize(torch.zeros(1, 2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"expected images of shape \(n, H, W\)"):
        normalize(torch.zeros(4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"expected both mean and std or neither"):
        normalize(torch.zeros(1, 2, 2, dtype=torch.uint8), mean=0.5)
    with pytest.raises(ValueError, match=r"expected mean to have 1 or 3 values"):
        normalize(torch.zeros(1, 3, 2, 2), mean=(0.1, 0.2), std=(1.0, 1.0))
    with pytest.raises(ValueError, match=r"expected std > 0"):
        normalize(torch.zeros(1, 1, 2, 2), mean=0.1, std=0.0)
