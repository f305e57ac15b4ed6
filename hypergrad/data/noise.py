"""Synthetic label noise, for mislabel-detection experiments.

The HYDRA paper's debugging experiment (Table 4) makes a fraction of the
training labels wrong and asks which samples a method flags. Here each
flipped label is replaced by a *different* class drawn uniformly from the
other ``num_classes - 1``, so exactly the returned samples are mislabelled.
"""

from __future__ import annotations

import math

import torch

__all__ = ["inject_label_noise"]


def inject_label_noise(
    targets: torch.Tensor, fraction: float, num_classes: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replaces exactly ``round(fraction * n)`` labels by a different class.

    Which labels are flipped, and to what, depends only on ``targets``,
    ``fraction``, ``num_classes`` and ``seed`` (a seeded CPU generator).
    ``round`` is Python's (halves to even): 0.5 of 5 labels flips 2.

    Args:
        targets: Integer class labels in ``[0, num_classes)``, shape ``(n,)``.
        fraction: Share of labels to flip, in [0, 1].
        num_classes: Number of classes (at least 2).
        seed: Seed of the random choice.

    Returns:
        ``(noisy_targets, flipped_indices)``: a new tensor like ``targets``
        in which ``noisy_targets[i] != targets[i]`` exactly for ``i`` in
        ``flipped_indices``, and the flipped positions as a sorted ``int64``
        tensor of shape ``(round(fraction * n),)``.

    Raises:
        TypeError: If ``targets`` is not an integer tensor.
        ValueError: If ``fraction`` is outside [0, 1], ``num_classes < 2``,
            ``targets`` is not 1-d or has a label outside
            ``[0, num_classes)``.

    Example:
        >>> noisy, flipped = inject_label_noise(labels, 0.5, 10, seed=0)
    """
    _validate(targets, fraction, num_classes, seed)
    n = targets.numel()
    count = round(fraction * n)

    generator = torch.Generator().manual_seed(seed)
    flipped = torch.randperm(n, generator=generator)[:count].sort().values
    # An offset in 1 .. num_classes - 1 never maps a class onto itself.
    offsets = torch.randint(1, num_classes, (count,), generator=generator)

    flipped = flipped.to(targets.device)
    offsets = offsets.to(device=targets.device, dtype=targets.dtype)
    noisy = targets.clone()
    noisy[flipped] = (targets[flipped] + offsets) % num_classes
    return noisy, flipped


def _validate(
    targets: torch.Tensor, fraction: float, num_classes: int, seed: int
) -> None:
    """Checks the arguments of :func:`inject_label_noise`."""
    if (
        not isinstance(targets, torch.Tensor)
        or targets.is_floating_point()
        or (targets.is_complex() or targets.dtype == torch.bool)
    ):
        what = targets.dtype if isinstance(targets, torch.Tensor) else type(targets)
        raise TypeError(
            f"inject_label_noise: expected targets to be an integer tensor of "
            f"class labels, got {what}. Convert with torch.as_tensor(labels)"
            ".long()."
        )
    if targets.ndim != 1:
        raise ValueError(
            f"inject_label_noise: expected targets of shape (n,), got "
            f"{tuple(targets.shape)}. Flatten them or pass class indices, not "
            "one-hot rows."
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise TypeError(
            f"inject_label_noise: expected num_classes to be an int, got "
            f"{num_classes!r}."
        )
    if num_classes < 2:
        raise ValueError(
            f"inject_label_noise: expected num_classes >= 2 (a flipped label "
            f"needs another class), got {num_classes}."
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"inject_label_noise: expected an int seed, got {seed!r}.")
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, int | float)
        or math.isnan(fraction)
        or not 0.0 <= fraction <= 1.0
    ):
        raise ValueError(
            f"inject_label_noise: expected fraction in [0, 1], got {fraction!r}. "
            "Pass a share such as 0.5 for half of the labels, not a percentage."
        )
    if targets.numel() and (
        int(targets.min()) < 0 or int(targets.max()) >= num_classes
    ):
        raise ValueError(
            f"inject_label_noise: expected labels in [0, {num_classes}), got "
            f"labels from {int(targets.min())} to {int(targets.max())}. Check "
            "num_classes, or map the labels to 0 .. num_classes - 1 first."
        )
