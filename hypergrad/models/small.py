"""Small models for tests, quick checks and the 8x8 digits demo.

Both models are written with out-of-place operations only, so they work
under every ``torch.func`` transform, forward-mode ``jvp`` included.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from hypergrad.models.lenet import _check_positive

__all__ = ["MLP", "SmallCNN", "mlp", "small_cnn"]


class MLP(nn.Module):
    """Multi-layer perceptron with ReLU between linear layers.

    Inputs of any shape ``(batch, *features)`` are flattened to
    ``(batch, in_features)`` first, so images can be passed directly.

    Args:
        in_features: Number of input features after flattening.
        hidden: Width of each hidden layer; empty for a linear model.
        num_classes: Number of output logits.

    Shapes:
        input: ``(batch, *features)`` with ``prod(features) == in_features``.
        output: ``(batch, num_classes)`` logits.
    """

    def __init__(
        self, in_features: int, hidden: Sequence[int], num_classes: int
    ) -> None:
        super().__init__()
        _check_positive("MLP", in_features=in_features, num_classes=num_classes)
        for width in hidden:
            _check_positive("MLP", hidden_width=width)
        widths = [in_features, *hidden, num_classes]
        self.layers = nn.ModuleList(
            nn.Linear(w_in, w_out) for w_in, w_out in pairwise(widths)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Computes the logits.

        Args:
            x: Inputs, shape ``(batch, *features)``.

        Returns:
            Logits, shape ``(batch, num_classes)``.
        """
        x = torch.flatten(x, 1)
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)


class SmallCNN(nn.Module):
    """Two conv-BatchNorm-ReLU-maxpool stages and a linear classifier.

    The convolutions are 3x3 with padding 1, to 8 and then 16 channels; each
    2x2 max-pooling halves the height and width (rounding down). For 8x8
    single-channel digits and 10 classes this has 1,946 parameters.

    Args:
        in_channels: Number of input channels.
        num_classes: Number of output logits.
        image_size: Input height and width, an int for square images.

    Shapes:
        input: ``(batch, in_channels, height, width)``.
        output: ``(batch, num_classes)`` logits.
    """

    def __init__(
        self, in_channels: int, num_classes: int, image_size: int | tuple[int, int]
    ) -> None:
        super().__init__()
        _check_positive("SmallCNN", in_channels=in_channels, num_classes=num_classes)
        height, width = _pair(image_size)
        if height < 4 or width < 4:
            raise ValueError(
                f"SmallCNN: expected image_size of at least 4x4 (two 2x2 poolings), "
                f"got {image_size!r}. Pass the real height and width of the inputs."
            )
        self.conv1 = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.norm1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.norm2 = nn.BatchNorm2d(16)
        self.classifier = nn.Linear(16 * (height // 4) * (width // 4), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Computes the logits.

        Args:
            x: Images, shape ``(batch, in_channels, height, width)``.

        Returns:
            Logits, shape ``(batch, num_classes)``.
        """
        x = F.max_pool2d(F.relu(self.norm1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.norm2(self.conv2(x))), 2)
        return self.classifier(torch.flatten(x, 1))


def mlp(in_features: int, hidden: int | Sequence[int], num_classes: int) -> MLP:
    """Builds a ReLU multi-layer perceptron.

    Args:
        in_features: Number of input features after flattening.
        hidden: Width of the single hidden layer, or a sequence of widths
            (empty for a linear model).
        num_classes: Number of output logits.

    Returns:
        A freshly initialised :class:`MLP`.

    Example:
        >>> model = mlp(64, [32], 10)  # 64*32+32 + 32*10+10 = 2,410 parameters
    """
    widths = [hidden] if isinstance(hidden, int) else list(hidden)
    return MLP(in_features, widths, num_classes)


def small_cnn(
    in_channels: int = 1, num_classes: int = 10, image_size: int | tuple[int, int] = 8
) -> SmallCNN:
    """Builds a small CNN with BatchNorm and max-pooling (a few thousand params).

    Args:
        in_channels: Number of input channels.
        num_classes: Number of output logits.
        image_size: Input height and width, an int for square images.

    Returns:
        A freshly initialised :class:`SmallCNN`.
    """
    return SmallCNN(in_channels, num_classes, image_size)


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    """Turns an int or a pair into a (height, width) pair, validating it."""
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in pair
    ):
        raise ValueError(
            f"expected image_size to be an int or a (height, width) pair of ints, "
            f"got {size!r}. Pass for example 8 or (28, 28)."
        )
    return pair
