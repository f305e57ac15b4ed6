"""Checks of user input, each with a message saying what came and how to fix it."""

from __future__ import annotations

import torch
from torch import Tensor


def check_mode(mode, allowed: tuple[str, ...], where: str) -> str:
    if mode not in allowed:
        raise ValueError(
            f"{where}: expected mode to be one of {', '.join(map(repr, allowed))}, "
            f"got {mode!r}."
        )
    return mode


def _as_index_tensor(values, what: str, where: str) -> Tensor:
    if not isinstance(values, Tensor) and len(values) == 0:
        values = torch.zeros(0, dtype=torch.long)  # [] would be float32
    tensor = torch.as_tensor(values)
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise TypeError(
            f"{where}: expected {what} as integers, got dtype {tensor.dtype}. "
            "Pass a LongTensor or a list of ints."
        )
    if tensor.dim() != 1:
        raise ValueError(
            f"{where}: expected {what} as a 1-D tensor, got shape "
            f"{tuple(tensor.shape)}."
        )
    return tensor.long()


def _check_range(tensor: Tensor, num_train: int, what: str, where: str):
    bad = (tensor < 0) | (tensor >= num_train)
    if bool(bad.any()):
        raise ValueError(
            f"{where}: expected {what} in [0, {num_train}) (num_train={num_train}), "
            f"got {tensor[bad][:5].tolist()}. Pass dataset indices, not labels or "
            "positions in a subset."
        )


def check_tracked(tracked, num_train: int, where: str) -> Tensor:
    """The tracked indices as a LongTensor: distinct, in ``[0, num_train)``."""
    tensor = _as_index_tensor(tracked, "tracked indices", where)
    if tensor.numel() == 0:
        raise ValueError(
            f"{where}: expected at least one tracked index, got none. Pass e.g. "
            "tracked=torch.arange(10)."
        )
    _check_range(tensor, num_train, "tracked indices", where)
    unique, counts = torch.unique(tensor, return_counts=True)
    if bool((counts > 1).any()):
        raise ValueError(
            f"{where}: expected distinct tracked indices, got repeats of "
            f"{unique[counts > 1][:5].tolist()}. Pass each index once "
            "(torch.unique(tracked))."
        )
    return tensor


def check_batch(inputs, targets, indices, num_train: int, where: str) -> Tensor:
    """The batch indices as a LongTensor matching the batch, in range."""
    if not isinstance(inputs, Tensor) or not isinstance(targets, Tensor):
        raise TypeError(
            f"{where}: expected inputs and targets as tensors, got "
            f"{type(inputs).__name__} and {type(targets).__name__}."
        )
    tensor = _as_index_tensor(indices, "batch indices", where)
    rows = inputs.shape[0] if inputs.dim() else 0
    if tensor.numel() != rows or targets.shape[:1] != (rows,):
        raise ValueError(
            f"{where}: expected {rows} batch indices and {rows} targets for "
            f"{rows} input rows, got {tensor.numel()} indices and targets of "
            f"shape {tuple(targets.shape)}. Yield (input, target, index) from the "
            "dataset, e.g. with hypergrad.data.IndexedDataset."
        )
    if rows == 0:
        raise ValueError(f"{where}: expected a non-empty batch, got 0 rows.")
    _check_range(tensor, num_train, "batch indices", where)
    return tensor


def check_test_points(inputs, targets, where: str) -> None:
    """Test inputs and targets: tensors with the same non-zero number of rows."""
    if not isinstance(inputs, Tensor) or not isinstance(targets, Tensor):
        raise TypeError(
            f"{where}: expected inputs and targets as tensors, got "
            f"{type(inputs).__name__} and {type(targets).__name__}. Convert with "
            "torch.as_tensor."
        )
    if inputs.dim() == 0 or targets.dim() == 0 or len(inputs) != len(targets):
        raise ValueError(
            f"{where}: expected a batch of test points, inputs (n, ...) and "
            f"targets (n, ...) with the same n, got shapes {tuple(inputs.shape)} "
            f"and {tuple(targets.shape)}. Add a leading dimension for one point: "
            "x[None], y[None]."
        )
    if len(inputs) == 0:
        raise ValueError(f"{where}: expected at least one test point, got none.")
