"""IDX files (the MNIST format) and the MNIST / Fashion-MNIST loaders.

An IDX file is a 4-byte magic number, one big-endian ``uint32`` per
dimension, then the values in C order, big-endian. The magic number is
``0x00 0x00 <type code> <number of dimensions>``; MNIST images are
``0x00000803`` (``uint8``, 3 dimensions) and labels ``0x00000801``
(``uint8``, 1 dimension). Files may be gzipped (name ending in ``.gz``).
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np
import torch

__all__ = ["DatasetNotFoundError", "MNIST_KINDS", "load_mnist", "read_idx"]

# IDX type code -> (big-endian numpy dtype, name used in messages).
_IDX_TYPES: dict[int, tuple[str, str]] = {
    0x08: (">u1", "uint8"),
    0x09: (">i1", "int8"),
    0x0B: (">i2", "int16"),
    0x0C: (">i4", "int32"),
    0x0D: (">f4", "float32"),
    0x0E: (">f8", "float64"),
}

_GZIP_MAGIC = b"\x1f\x8b"
_MNIST_MAGIC_IMAGES = 0x00000803
_MNIST_MAGIC_LABELS = 0x00000801

# kind -> the folder torchvision stores the raw files in, under its root.
MNIST_KINDS: dict[str, str] = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}

_REDOWNLOAD = (
    "The file is corrupt or truncated: delete it and download it again "
    "(for example with torchvision.datasets.MNIST(root, download=True))."
)


class DatasetNotFoundError(FileNotFoundError):
    """A data set's folder or one of its files is not where it was looked for."""


def read_idx(path: str | os.PathLike[str], *, magic: int | None = None) -> torch.Tensor:
    """Reads an IDX file, gzipped (``.gz``) or not, into a tensor.

    The magic number, the dimensions and the payload length are all checked,
    so a truncated or corrupt file raises instead of giving wrong data.

    Args:
        path: The file. Gzipped files (usually named ``*.gz``) are
            decompressed; compression is recognised from the content.
        magic: If given, the magic number the file must have, for example
            ``0x00000803`` for MNIST images.

    Returns:
        A tensor of the file's shape ``(d_0, ..., d_{n-1})`` and dtype
        (``uint8`` for MNIST), in native byte order.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If the file is not a valid IDX file, names the file, what
            was expected and what was found.
    """
    path = Path(path)
    data = _read_bytes(path)

    if len(data) < 4:
        raise ValueError(
            f"{path}: expected an IDX file starting with a 4-byte magic number, "
            f"found only {len(data)} bytes. {_REDOWNLOAD}"
        )
    found_magic = int.from_bytes(data[:4], "big")
    if magic is not None and found_magic != magic:
        raise ValueError(
            f"{path}: expected IDX magic number {_describe_magic(magic)}, found "
            f"{_describe_magic(found_magic)}. Check that this is the right file "
            f"(images and labels swapped?); otherwise {_lower_first(_REDOWNLOAD)}"
        )
    type_code, ndim = data[2], data[3]
    if data[0] != 0 or data[1] != 0 or type_code not in _IDX_TYPES or ndim == 0:
        known = ", ".join(f"0x{code:02X}" for code in _IDX_TYPES)
        raise ValueError(
            f"{path}: expected an IDX magic number 0x0000TTNN (type code TT in "
            f"{known}, NN >= 1 dimensions), found 0x{found_magic:08X}. "
            f"{_REDOWNLOAD}"
        )

    header_length = 4 + 4 * ndim
    if len(data) < header_length:
        raise ValueError(
            f"{path}: expected a {header_length}-byte header for {ndim} "
            f"dimensions, found only {len(data)} bytes. {_REDOWNLOAD}"
        )
    shape = tuple(
        int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)
    )
    dtype, _ = _IDX_TYPES[type_code]
    expected = math.prod(shape) * np.dtype(dtype).itemsize
    found = len(data) - header_length
    if found != expected:
        raise ValueError(
            f"{path}: expected {expected} bytes of data for shape {shape} "
            f"({_IDX_TYPES[type_code][1]}), found {found}. {_REDOWNLOAD}"
        )

    values = np.frombuffer(data, dtype=dtype, offset=header_length)
    native = values.astype(np.dtype(dtype).newbyteorder("="), copy=True)
    return torch.from_numpy(native.reshape(shape))


def load_mnist(
    root: str | os.PathLike[str], train: bool = True, kind: str = "mnist"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loads MNIST or Fashion-MNIST from the four standard IDX files.

    The files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each plain or
    ``.gz``) are looked for in ``root`` itself and in torchvision's layout,
    ``root/MNIST/raw`` or ``root/FashionMNIST/raw``. Nothing is downloaded.

    Args:
        root: The folder holding the files, or torchvision's root folder.
        train: The 60,000 training images if True, else the 10,000 test ones.
        kind: ``"mnist"`` or ``"fashion-mnist"`` (only changes which
            torchvision sub-folder is searched).

    Returns:
        ``(images, labels)``: ``uint8`` images of shape ``(n, 28, 28)`` and
        ``int64`` labels of shape ``(n,)``.

    Raises:
        DatasetNotFoundError: If a file is in none of the searched folders
            (the message lists them).
        ValueError: If ``kind`` is unknown, or a file is corrupt or its
            images and labels disagree.
    """
    if kind not in MNIST_KINDS:
        raise ValueError(
            f"load_mnist: expected kind to be one of {sorted(MNIST_KINDS)}, got "
            f"{kind!r}. Use kind='fashion-mnist' for Fashion-MNIST."
        )
    root = Path(root)
    folders = [root, root / MNIST_KINDS[kind] / "raw"]
    prefix = "train" if train else "t10k"

    image_path = _find_file(folders, f"{prefix}-images-idx3-ubyte", kind)
    label_path = _find_file(folders, f"{prefix}-labels-idx1-ubyte", kind)
    images = read_idx(image_path, magic=_MNIST_MAGIC_IMAGES)
    labels = read_idx(label_path, magic=_MNIST_MAGIC_LABELS).long()

    if images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise ValueError(
            f"load_mnist: expected (n, 28, 28) images and n labels, found images "
            f"{tuple(images.shape)} in {image_path} and {len(labels)} labels in "
            f"{label_path}. Make sure both files come from the same data set "
            "and split."
        )
    return images, labels


def _read_bytes(path: Path) -> bytes:
    """Reads a file's bytes, decompressing gzip; a damaged gzip -> ValueError.

    Compression is detected from the content (gzip's two magic bytes), not
    the name: an IDX file always starts with two zero bytes.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file. Check the path.")
    data = path.read_bytes()
    if data[:2] != _GZIP_MAGIC:
        return data
    try:
        return gzip.decompress(data)
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise ValueError(
            f"{path}: expected a complete gzip stream, found a damaged one "
            f"({error}). {_REDOWNLOAD}"
        ) from error


def _find_file(folders: list[Path], name: str, kind: str) -> Path:
    """Returns the first of ``folder/name`` and ``folder/name.gz`` that exists."""
    candidates = [folder / (name + ext) for folder in folders for ext in ("", ".gz")]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(folder) for folder in folders)
    raise DatasetNotFoundError(
        f"load_mnist({kind!r}): found no {name} or {name}.gz in any of: {looked}. "
        "Point root at the folder holding the four IDX files, or download them "
        "with torchvision.datasets.MNIST / FashionMNIST(root, download=True)."
    )


def _describe_magic(magic: int) -> str:
    """Formats a magic number as ``0x00000803 (uint8, 3 dims)``."""
    type_code, ndim = (magic >> 8) & 0xFF, magic & 0xFF
    type_name = _IDX_TYPES.get(type_code, (None, f"unknown type 0x{type_code:02X}"))
    return f"0x{magic:08X} ({type_name[1]}, {ndim} dims)"


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]
