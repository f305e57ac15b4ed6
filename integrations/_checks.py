"""Input checks and conversions shared by the logging integrations.

Nothing here imports a logging backend: the checks run the same way in every
mode, so a wrong call fails on the first try, with logging on or off.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


def to_step(where: str, step: Any, name: str = "step") -> int:
    """Return `step` as a non-negative Python int.

    Args:
        where: The call to name in the error message.
        step: An int, a NumPy integer or a 0-d integer tensor.
        name: What the value is, for the error message.

    Raises:
        TypeError: If `step` is not an integer.
        ValueError: If `step` is negative.
    """
    if isinstance(step, bool):
        raise TypeError(
            f"{where}: expected an int {name}, got the bool {step!r}. Pass "
            f"the {name} itself."
        )
    try:
        value = operator.index(step)
    except TypeError:
        raise TypeError(
            f"{where}: expected an int {name}, got {type(step).__name__} "
            f"{step!r}. Pass a whole number, e.g. {name}=12."
        ) from None
    if value < 0:
        raise ValueError(f"{where}: expected a {name} >= 0, got {value}. Count from 0.")
    return value


def to_scalar(where: str, name: str, value: Any) -> float:
    """Return a one-element number, array or tensor as a Python float.

    Args:
        where: The call to name in the error message.
        name: The argument's name, for the error message.
        value: A real number, or an array or tensor with one element.

    Raises:
        TypeError: If `value` is not a number.
        ValueError: If `value` holds more than one element.
    """
    if isinstance(value, (str, bytes)):
        raise TypeError(
            f"{where}: expected a number for {name}, got the string {value!r}."
        )
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.dtype.kind not in "biuf":
        raise TypeError(
            f"{where}: expected a number for {name}, got "
            f"{type(value).__name__} {value!r}."
        )
    if array.size != 1:
        raise ValueError(
            f"{where}: expected a single number for {name}, got an array of "
            f"shape {tuple(array.shape)}. Reduce it first (for example with "
            ".mean() or .norm()), or log the values with log_histogram()."
        )
    return float(array.reshape(()))


def to_vector(where: str, name: str, values: Any) -> np.ndarray:
    """Return a 1-D array-like (list, array, tensor) as a float64 array.

    Args:
        where: The call to name in the error message.
        name: The argument's name, for the error message.
        values: Numbers of shape `(n,)`.

    Raises:
        TypeError: If the values are not numbers.
        ValueError: If the values are not one-dimensional.
    """
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    if array.dtype.kind not in "biuf":
        raise TypeError(
            f"{where}: expected numbers for {name}, got values of dtype {array.dtype}."
        )
    if array.ndim != 1:
        raise ValueError(
            f"{where}: expected {name} of shape (n,), got shape "
            f"{tuple(array.shape)}. Pass one value per sample (select one "
            "test point's row of a 2-D array)."
        )
    return array.astype(np.float64)


def to_indices(where: str, indices: Any) -> np.ndarray:
    """Return training-set indices of shape `(n,)` as an int64 array.

    Raises:
        TypeError: If the indices are not integers.
        ValueError: If they are not one-dimensional or some are negative.
    """
    if hasattr(indices, "detach"):
        indices = indices.detach().cpu().numpy()
    array = np.asarray(indices)
    if array.size and array.dtype.kind not in "iu":
        raise TypeError(
            f"{where}: expected integer indices, got dtype {array.dtype}. Pass "
            "the training-set index of each tracked sample."
        )
    if array.ndim != 1 or (array.size and array.min() < 0):
        raise ValueError(
            f"{where}: expected non-negative indices of shape (n,), got shape "
            f"{tuple(array.shape)} with minimum "
            f"{array.min() if array.size else None}."
        )
    return array.astype(np.int64)


def check_key(where: str, name: Any) -> str:
    """Return `name` if it is a usable metric key.

    Raises:
        TypeError: If `name` is not a string.
        ValueError: If `name` is empty or has surrounding spaces or slashes.
    """
    if not isinstance(name, str):
        raise TypeError(
            f"{where}: expected a str name, got {type(name).__name__} {name!r}."
        )
    if not name or name != name.strip() or name.strip("/") != name:
        raise ValueError(
            f"{where}: expected a non-empty name without leading or trailing "
            f"spaces or slashes, got {name!r}. Use a key such as "
            "'diagnostics/bound'."
        )
    return name


def check_sample_count(where: str, name: str, values: Any, expected: int) -> None:
    """Check that `values` has one entry per sample.

    Raises:
        ValueError: If `len(values)` differs from `expected`.
    """
    count = len(values)
    if count != expected:
        raise ValueError(
            f"{where}: expected {expected} {name} (one per contribution), got "
            f"{count}. Pass {name} in the same order as the contributions."
        )


def as_image_data(image: Any) -> Any:
    """Turn a tensor or array image into a uint8 NumPy array W&B can show.

    Tensors move to the CPU. Channel-first arrays `(C, H, W)` with C in
    {1, 3, 4} become `(H, W, C)`, and a single channel is dropped. Values
    become uint8, since W&B casts without scaling: floats in [0, 1] are
    multiplied by 255, and other ranges (a normalized image, say) are
    stretched from their minimum to their maximum. Other objects (paths,
    PIL images, figures) are returned as they are.
    """
    if hasattr(image, "detach"):
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        return image
    if image.ndim == 3 and image.shape[0] in (1, 3, 4) and image.shape[-1] > 4:
        image = np.moveaxis(image, 0, -1)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    return _to_uint8(image)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    """Scale an image's values to 0..255 and cast them to uint8."""
    if image.dtype == np.uint8 or image.dtype.kind not in "biuf" or not image.size:
        return image
    values = np.nan_to_num(image.astype(np.float64), posinf=0.0, neginf=0.0)
    low, high = float(values.min()), float(values.max())
    if image.dtype.kind == "b" or (image.dtype.kind == "f" and 0 <= low <= high <= 1):
        values = values * 255.0
    elif image.dtype.kind in "iu" and 0 <= low <= high <= 255:
        pass
    elif high > low:
        values = (values - low) * (255.0 / (high - low))
    else:
        values = np.zeros_like(values)
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def check_image(where: str, image: Any) -> Any:
    """Return an image source after checking what can be checked early.

    Args:
        where: The call to name in the error message.
        image: A path to an image file, a matplotlib figure, a PIL image,
            or an array or tensor of shape `(H, W)`, `(H, W, C)` or
            `(C, H, W)`.

    Raises:
        FileNotFoundError: If a path is given and no file is there.
        ValueError: If an array image has the wrong number of dimensions.
    """
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{where}: no image file at {path!r}. Save the image first, or "
                "pass the matplotlib figure itself."
            )
        return path
    image = as_image_data(image)
    if isinstance(image, np.ndarray) and image.ndim not in (2, 3):
        raise ValueError(
            f"{where}: expected an image of shape (H, W), (H, W, C) or "
            f"(C, H, W), got shape {tuple(image.shape)}. Index the batch "
            "first, e.g. images[0]."
        )
    return image


@dataclass(frozen=True)
class RankedRow:
    """One training sample in an influence ranking.

    Attributes:
        rank: Position in the ranking, starting at 1.
        index: Index of the sample in the training set.
        contribution: `C(z, i)`; positive means the sample helps.
        label: The sample's training label, or None when unknown.
        image: The sample's image source, or None when not given.
    """

    rank: int
    index: int
    contribution: float
    label: Any = None
    image: Any = None


def _rows_to_columns(where: str, rows: Sequence[Mapping[str, Any]]) -> tuple:
    """Split row mappings into index, contribution, label and image lists."""
    indices, contributions, labels, images = [], [], [], []
    for position, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise TypeError(
                f"{where}: expected each row to be a mapping, got "
                f"{type(row).__name__} at position {position}."
            )
        missing = {"index", "contribution"} - set(row)
        if missing:
            raise ValueError(
                f"{where}: row {position} lacks the keys {sorted(missing)}. "
                "Each row needs 'index' and 'contribution' and may have "
                "'label' and 'image'."
            )
        indices.append(to_step(f"{where} (row {position})", row["index"], "index"))
        contributions.append(to_scalar(where, "contribution", row["contribution"]))
        labels.append(row.get("label"))
        images.append(row.get("image"))
    has_labels = any(label is not None for label in labels)
    has_images = any(image is not None for image in images)
    return (
        np.asarray(indices, dtype=np.int64),
        np.asarray(contributions, dtype=np.float64),
        labels if has_labels else None,
        images if has_images else None,
    )


def _plain_label(label: Any) -> Any:
    """Return a label as a plain Python value for a table cell."""
    if hasattr(label, "detach"):
        label = label.detach().cpu().numpy()
    if isinstance(label, np.generic) or (
        isinstance(label, np.ndarray) and label.size == 1
    ):
        return label.item()
    return label


def rank_samples(
    where: str,
    contributions: Any,
    images: Any,
    labels: Any,
    indices: Any,
    top_k: int,
) -> tuple[list[RankedRow], list[RankedRow]]:
    """Rank tracked samples into the most helpful and the most harmful.

    Args:
        where: The call to name in the error message.
        contributions: Contributions of shape `(num_tracked,)`, or a sequence
            of mappings with keys 'index', 'contribution' and optionally
            'label' and 'image'.
        images: None, or one image per contribution.
        labels: None, or one label per contribution, shape `(num_tracked,)`.
        indices: None (positions 0..num_tracked-1), or the training-set index
            of each contribution, shape `(num_tracked,)`.
        top_k: How many samples to keep on each side.

    Returns:
        The helpful rows (largest positive contributions first) and the
        harmful rows (most negative first). A side has fewer than `top_k`
        rows when fewer contributions have its sign; zeros are on neither.

    Raises:
        ValueError: On mismatched lengths, non-finite contributions or a
            `top_k` below 1.
    """
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"{where}: expected an int top_k >= 1, got {top_k!r}.")
    is_rows = isinstance(contributions, Sequence) and any(
        isinstance(row, Mapping) for row in contributions
    )
    if is_rows:
        given = [
            name
            for name, value in (
                ("images", images),
                ("labels", labels),
                ("indices", indices),
            )
            if value is not None
        ]
        if given:
            raise ValueError(
                f"{where}: got table rows together with {', '.join(given)}. "
                "With rows, put 'index', 'label' and 'image' inside each row "
                "and leave the other arguments as None."
            )
        indices, values, labels, images = _rows_to_columns(where, contributions)
    else:
        values = to_vector(where, "contributions", contributions)
        if indices is None:
            indices = np.arange(len(values))
        else:
            check_sample_count(where, "indices", indices, len(values))
            indices = to_indices(where, indices)
    if images is not None:
        check_sample_count(where, "images", images, len(values))
    if labels is not None:
        check_sample_count(where, "labels", labels, len(values))

    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        raise ValueError(
            f"{where}: expected finite contributions, got {bad.size} NaN or "
            f"infinite values (first at position {int(bad[0])}). Check the "
            "hypergradients for overflow, e.g. with a smaller learning rate."
        )

    def pick(order: np.ndarray) -> list[RankedRow]:
        rows = []
        for rank, position in enumerate(order[:top_k], start=1):
            rows.append(
                RankedRow(
                    rank=rank,
                    index=int(indices[position]),
                    contribution=float(values[position]),
                    label=None if labels is None else _plain_label(labels[position]),
                    image=None
                    if images is None or images[position] is None
                    else check_image(where, images[position]),
                )
            )
        return rows

    # Stable sorts keep the given order among equal contributions.
    helpful = np.argsort(-values, kind="stable")
    harmful = np.argsort(values, kind="stable")
    helpful = helpful[values[helpful] > 0]
    harmful = harmful[values[harmful] < 0]
    return pick(helpful), pick(harmful)
