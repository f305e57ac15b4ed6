"""Image loaders (CIFAR-10, 8x8 digits) and image preprocessing.

The loaders return plain tensors, ``uint8`` images and ``int64`` labels;
:func:`normalize` turns images into ``float32`` ``(n, C, H, W)`` tensors for
a model. MNIST and Fashion-MNIST are in :mod:`hypergrad.data.idx`.
"""

from __future__ import annotations

import os
import shutil
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from hypergrad.data.idx import DatasetNotFoundError

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "MNIST_MEAN",
    "MNIST_STD",
    "load_cifar10",
    "load_cifar10_folder",
    "load_digits_dataset",
    "normalize",
]

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
# Per-channel statistics of the training sets, in [0, 1] units.
MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".gif", ".tif", ".tiff"}
_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
_DONE_MARKER = ".hypergrad-extracted"


def normalize(
    images: torch.Tensor,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    *,
    channels_last: bool | None = None,
) -> torch.Tensor:
    """Turns images into a ``float32`` ``(n, C, H, W)`` tensor in [0, 1].

    ``uint8`` images are divided by 255; floating images are taken to be in
    [0, 1] already. Then, if ``mean`` and ``std`` are given, each channel
    becomes ``(x - mean[c]) / std[c]``.

    Args:
        images: Shape ``(n, H, W)`` (one channel), ``(n, C, H, W)`` or
            ``(n, H, W, C)``.
        mean: Per-channel means in [0, 1] units (one value for all channels,
            or ``C`` values), e.g. :data:`MNIST_MEAN`.
        std: Per-channel standard deviations, same form as ``mean``.
        channels_last: Whether 4-d input is ``(n, H, W, C)``. None guesses:
            channels last when the last size is 1, 3 or 4 and the second is
            not.

    Returns:
        A new ``float32`` tensor of shape ``(n, C, H, W)``.

    Raises:
        TypeError: If ``images`` is neither ``uint8`` nor floating point.
        ValueError: If the shape, ``mean`` or ``std`` is not usable.
    """
    if images.dtype == torch.uint8:
        x = images.to(torch.float32) / 255.0
    elif images.is_floating_point():
        x = images.to(torch.float32)
    else:
        raise TypeError(
            f"normalize: expected uint8 images (0-255) or floating images in "
            f"[0, 1], got dtype {images.dtype}. Convert with .to(torch.uint8) "
            "or scale to [0, 1] first."
        )

    if x.ndim == 3:
        x = x.unsqueeze(1)
    elif x.ndim == 4:
        if channels_last is None:
            channels_last = x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4)
        if channels_last:
            x = x.permute(0, 3, 1, 2)
    else:
        raise ValueError(
            f"normalize: expected images of shape (n, H, W), (n, C, H, W) or "
            f"(n, H, W, C), got {tuple(images.shape)}. Add a sample dimension "
            "with images.unsqueeze(0) for a single image."
        )

    if (mean is None) != (std is None):
        raise ValueError(
            "normalize: expected both mean and std or neither, got "
            f"mean={mean!r}, std={std!r}. Pass both, e.g. MNIST_MEAN, MNIST_STD."
        )
    if mean is not None:
        channels = x.shape[1]
        mean_t = _per_channel("mean", mean, channels)
        std_t = _per_channel("std", std, channels)
        if bool((std_t <= 0).any()):
            raise ValueError(f"normalize: expected std > 0, got {std!r}.")
        x = (x - mean_t) / std_t
    return x.contiguous()


def load_digits_dataset() -> tuple[torch.Tensor, torch.Tensor]:
    """Loads scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes).

    These are UCI optdigits, not MNIST: pixel values 0-16, scaled here to
    [0, 1]. They ship with scikit-learn, so no download is needed.

    Returns:
        ``(images, labels)``: ``float32`` images of shape ``(1797, 1, 8, 8)``
        in [0, 1] and ``int64`` labels of shape ``(1797,)``.

    Raises:
        ImportError: If scikit-learn is not installed.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError(
            "load_digits_dataset needs scikit-learn, which is not installed. "
            'Install it with `pip install "hypergrad[data]"`.'
        ) from error
    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32) / 16.0
    labels = torch.as_tensor(digits.target, dtype=torch.int64)
    return images.unsqueeze(1), labels


def load_cifar10_folder(
    root: str | os.PathLike[str],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    split: str | None = None,
    channels_last: bool = False,
    max_per_class: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loads images stored as one sub-folder per class, e.g. CIFAR-10 JPEGs.

    Labels are the positions of the class folders in sorted order, which for
    CIFAR-10 gives the standard indices (:data:`CIFAR10_CLASSES`). Within a
    class, files are read in sorted order. ``root`` may also be a ``.tar.gz``,
    ``.tgz`` or ``.tar`` archive of such a tree: it is extracted once into
    ``cache_dir`` and read from there afterwards.

    If the folder holds a single sub-folder with no images (for example
    ``test/`` around the class folders), it is descended into; use ``split``
    to choose one of several (``"train"`` or ``"test"``).

    Args:
        root: A folder of class folders, or an archive of one.
        cache_dir: Where an archive is extracted (required for archives).
        split: Name of the sub-folder holding the class folders, if any.
        channels_last: Return ``(n, H, W, 3)`` instead of ``(n, 3, H, W)``.
        max_per_class: Read at most this many images per class (the first in
            sorted order), for quick runs.

    Returns:
        ``(images, labels)``: ``uint8`` RGB images of shape ``(n, 3, H, W)``
        (or ``(n, H, W, 3)``; 32x32 for CIFAR-10) and ``int64`` labels of
        shape ``(n,)``, class by class.

    Raises:
        DatasetNotFoundError: If ``root`` or ``split`` does not exist.
        ValueError: If there are no class folders, an image cannot be
            decoded, images differ in size, or an archive has no
            ``cache_dir``.
        ImportError: If Pillow is not installed.
    """
    if max_per_class is not None and (
        isinstance(max_per_class, bool)
        or not isinstance(max_per_class, int)
        or max_per_class < 1
    ):
        raise ValueError(
            f"load_cifar10_folder: expected max_per_class to be None or a "
            f"positive int, got {max_per_class!r}."
        )
    folder = _class_root(_resolve_tree(Path(root), cache_dir), split)
    classes = sorted(
        p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")
    )
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        found = sorted(
            p for p in (folder / name).iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES
        )
        files += found[:max_per_class]
        labels += [label] * len(found[:max_per_class])
    if not files:
        raise ValueError(
            f"load_cifar10_folder: expected class sub-folders of images in "
            f"{folder}, found {len(classes)} folders and no images. Point root at "
            "the folder whose sub-folders are the classes."
        )

    images = torch.from_numpy(_decode_images(files))  # (n, H, W, 3)
    if not channels_last:
        images = images.permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor(labels, dtype=torch.int64)


def load_cifar10(
    root: str | os.PathLike[str], train: bool = True, *, channels_last: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loads CIFAR-10 from torchvision's ``cifar-10-batches-py`` folder.

    Nothing is downloaded; torchvision checks the files' checksums.

    Args:
        root: The folder holding ``cifar-10-batches-py`` (or that folder).
        train: The 50,000 training images if True, else the 10,000 test ones.
        channels_last: Return ``(n, 32, 32, 3)`` instead of ``(n, 3, 32, 32)``.

    Returns:
        ``(images, labels)``: ``uint8`` images of shape ``(n, 3, 32, 32)``
        (or ``(n, 32, 32, 3)``) and ``int64`` labels of shape ``(n,)``.

    Raises:
        DatasetNotFoundError: If ``cifar-10-batches-py`` is not there.
        ValueError: If torchvision finds the files corrupt.
        ImportError: If torchvision is not installed.
    """
    root = Path(root)
    if root.name == "cifar-10-batches-py":
        root = root.parent
    if not (root / "cifar-10-batches-py").is_dir():
        raise DatasetNotFoundError(
            f"load_cifar10: found no folder cifar-10-batches-py in {root}. Point "
            "root at its parent, or download it with "
            "torchvision.datasets.CIFAR10(root, download=True)."
        )
    try:
        from torchvision.datasets import CIFAR10
    except ImportError as error:
        raise ImportError(
            "load_cifar10 needs torchvision, which is not installed. Install it "
            'with `pip install "hypergrad[vision]"`.'
        ) from error
    try:
        dataset = CIFAR10(str(root), train=train, download=False)
    except RuntimeError as error:
        raise ValueError(
            f"load_cifar10: expected intact CIFAR-10 batches in "
            f"{root / 'cifar-10-batches-py'}, but torchvision says: "
            f"{_one_line(error)} Delete the folder and download it again."
        ) from error
    images = torch.from_numpy(np.ascontiguousarray(dataset.data))
    if not channels_last:
        images = images.permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor(dataset.targets, dtype=torch.int64)


def _resolve_tree(root: Path, cache_dir: str | os.PathLike[str] | None) -> Path:
    """Returns the folder to read: ``root`` itself, or an extracted archive."""
    if root.is_dir():
        return root
    if not root.is_file():
        raise DatasetNotFoundError(
            f"load_cifar10_folder: {root} does not exist. Pass a folder of class "
            "folders or a .tar.gz of one."
        )
    if not root.name.endswith(_ARCHIVE_SUFFIXES):
        raise ValueError(
            f"load_cifar10_folder: expected a folder or an archive named "
            f"{' / '.join(_ARCHIVE_SUFFIXES)}, got the file {root}."
        )
    if cache_dir is None:
        raise ValueError(
            f"load_cifar10_folder: {root} is an archive and needs a folder to be "
            "extracted into; pass cache_dir=... (any writable folder)."
        )
    return _extract_once(root, Path(cache_dir))


def _extract_once(archive: Path, cache_dir: Path) -> Path:
    """Extracts ``archive`` into ``cache_dir/<archive name>``, once.

    Extraction goes to a temporary folder that is renamed when complete, so
    an interrupted run never leaves a half tree that looks finished.
    """
    stem = archive.name
    for suffix in _ARCHIVE_SUFFIXES:
        stem = stem.removesuffix(suffix)
    target = cache_dir / stem
    if (target / _DONE_MARKER).is_file():
        return target
    if target.exists():
        raise ValueError(
            f"load_cifar10_folder: expected {target} to be absent or an earlier "
            f"extraction of {archive.name}, found something else there (no "
            f"{_DONE_MARKER} marker). Remove it or pass another cache_dir."
        )

    partial = cache_dir / f".{stem}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(partial, filter="data")
    except (tarfile.TarError, EOFError, OSError) as error:
        shutil.rmtree(partial, ignore_errors=True)
        raise ValueError(
            f"load_cifar10_folder: could not extract {archive} into {cache_dir} "
            f"({_one_line(error)}). If the archive is corrupt or truncated, "
            "download it again; otherwise check that cache_dir is writable."
        ) from error
    (partial / _DONE_MARKER).touch()

    try:
        partial.rename(target)
    except OSError:
        if not (target / _DONE_MARKER).is_file():
            raise
        # Another process finished the same extraction first.
        shutil.rmtree(partial, ignore_errors=True)
    return target


def _class_root(folder: Path, split: str | None) -> Path:
    """Finds the folder whose sub-folders are the classes."""
    if split is not None:
        folder = folder / split
        if not folder.is_dir():
            raise DatasetNotFoundError(
                f"load_cifar10_folder: no folder {folder} for split={split!r}. "
                "Check the name (e.g. 'train' or 'test')."
            )
    while True:
        entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
        subdirs = [p for p in entries if p.is_dir()]
        has_images = any(p.suffix.lower() in _IMAGE_SUFFIXES for p in entries)
        if len(subdirs) != 1 or has_images:
            return folder
        if any(p.suffix.lower() in _IMAGE_SUFFIXES for p in subdirs[0].iterdir()):
            return folder  # one class folder of images: a one-class data set
        folder = subdirs[0]


def _decode_images(files: list[Path]) -> np.ndarray:
    """Decodes image files to one ``uint8`` array of shape ``(n, H, W, 3)``."""
    try:
        from PIL import Image
    except ImportError as error:
        raise ImportError(
            "load_cifar10_folder needs Pillow to decode images, which is not "
            'installed. Install it with `pip install "hypergrad[vision]"`.'
        ) from error

    out: np.ndarray | None = None
    for i, path in enumerate(files):
        try:
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
        except OSError as error:
            raise ValueError(
                f"load_cifar10_folder: could not decode {path} ({_one_line(error)}). "
                "Delete or replace the file."
            ) from error
        if out is None:
            out = np.empty((len(files), *pixels.shape), dtype=np.uint8)
        if pixels.shape != out.shape[1:]:
            raise ValueError(
                f"load_cifar10_folder: expected every image to be "
                f"{out.shape[2]}x{out.shape[1]} like {files[0]}, got "
                f"{pixels.shape[1]}x{pixels.shape[0]} for {path}. Resize the "
                "images to one size first."
            )
        out[i] = pixels
    return out


def _per_channel(
    name: str, value: float | Sequence[float], channels: int
) -> torch.Tensor:
    """Turns a scalar or per-channel sequence into a ``(1, C, 1, 1)`` tensor."""
    values = [float(value)] if isinstance(value, int | float) else list(value)
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise ValueError(
            f"normalize: expected {name} to have 1 or {channels} values (one per "
            f"channel), got {len(values)}: {value!r}."
        )
    return torch.tensor(values, dtype=torch.float32).view(1, channels, 1, 1)


def _one_line(error: BaseException) -> str:
    """An exception's message with its line breaks folded into spaces."""
    return " ".join(str(error).split())
