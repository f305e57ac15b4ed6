"""Sample indices: datasets that report them, and random disjoint splits.

HYDRA needs to know *which* training samples are in each mini-batch, so
:class:`IndexedDataset` yields ``(input, target, index)``.
:func:`split_indices` draws the train / validation / test index sets.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

__all__ = ["IndexedDataset", "split_indices"]


class IndexedDataset(Dataset):
    """A dataset of tensors whose items carry their own position.

    Item ``i`` is ``(inputs[i], targets[i], i)``, so a training loop knows
    which samples are in each batch. Wrapped in ``torch.utils.data.Subset``,
    the index stays the position in this (the full) dataset.

    Args:
        inputs: Inputs, shape ``(n, *input_shape)``.
        targets: Targets, shape ``(n, *target_shape)``.

    Raises:
        TypeError: If either is not a tensor.
        ValueError: If their first dimensions differ.
    """

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        for name, value in (("inputs", inputs), ("targets", targets)):
            if not isinstance(value, torch.Tensor) or value.ndim == 0:
                raise TypeError(
                    f"IndexedDataset: expected {name} to be a tensor with a "
                    f"sample dimension, got {_describe(value)}. Pass tensors of "
                    "shape (n, ...), e.g. torch.as_tensor(array)."
                )
        if len(inputs) != len(targets):
            raise ValueError(
                f"IndexedDataset: expected as many inputs as targets, got "
                f"{len(inputs)} inputs and {len(targets)} targets. Pass "
                "matching tensors (same first dimension)."
            )
        self.inputs = inputs
        self.targets = targets

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        position = range(len(self))[index]  # raises IndexError when out of range
        return self.inputs[position], self.targets[position], position


def split_indices(n: int, sizes: Sequence[int], seed: int) -> list[torch.Tensor]:
    """Draws disjoint random subsets of ``range(n)`` of the given sizes.

    The same ``n``, ``sizes`` and ``seed`` always give the same splits with
    a given PyTorch version (a seeded CPU ``torch.Generator``). The sizes
    may add up to less than ``n``; the remaining indices are in no split.

    Args:
        n: Number of samples.
        sizes: Size of each split, e.g. ``[50_000, 10_000]``.
        seed: Seed of the random permutation.

    Returns:
        One ``int64`` tensor per split, of shape ``(sizes[k],)``, sorted in
        increasing order (membership is random, order is not).

    Raises:
        ValueError: If a size is negative or the sizes add up to more than
            ``n``.

    Example:
        >>> train, val = split_indices(60_000, [50_000, 10_000], seed=0)
    """
    _check_int("split_indices", "n", n, minimum=0)
    _check_int("split_indices", "seed", seed)
    sizes = list(sizes)
    for size in sizes:
        _check_int("split_indices", "each size", size, minimum=0)
    if sum(sizes) > n:
        raise ValueError(
            f"split_indices: requested sizes {sizes} (total {sum(sizes)}), but "
            f"only {n} samples are available. Make the sizes add up to at most "
            f"{n}."
        )

    generator = torch.Generator().manual_seed(seed)
    permutation = torch.randperm(n, generator=generator)
    splits = []
    start = 0
    for size in sizes:
        splits.append(permutation[start : start + size].sort().values)
        start += size
    return splits


def _check_int(
    where: str, name: str, value: object, minimum: int | None = None
) -> None:
    """Raises if ``value`` is not an int (at least ``minimum``, if given)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{where}: expected {name} to be an int, got {value!r} "
            f"({type(value).__name__}). Pass a whole number."
        )
    if minimum is not None and value < minimum:
        raise ValueError(
            f"{where}: expected {name} to be at least {minimum}, got {value}."
        )


def _describe(value: object) -> str:
    """Short description of a value for error messages."""
    if isinstance(value, torch.Tensor):
        return f"a 0-d tensor ({value!r})"
    return type(value).__name__
