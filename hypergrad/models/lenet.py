"""LeNet-5 with ReLU activations, as used for MNIST in the HYDRA paper.

The network has exactly 61,706 parameters for 28x28 single-channel inputs
and 10 classes, the count given in the paper's supplement (Table 3):

=========================  ===========  =======
layer                      shape        params
=========================  ===========  =======
conv1 (5x5, padding 2)     1 -> 6          156
conv2 (5x5)                6 -> 16       2,416
fc1                        400 -> 120   48,120
fc2                        120 -> 84    10,164
fc3                        84 -> 10        850
=========================  ===========  =======

Every operation is out of place, so the model works under ``torch.func``
transforms, forward-mode ``jvp`` included.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LeNet5", "lenet5"]


class LeNet5(nn.Module):
    """LeNet-5: two 5x5 convolutions with max-pooling, then three linear layers.

    Args:
        num_classes: Number of output logits.
        in_channels: Number of input channels (1 for MNIST).

    Shapes:
        input: ``(batch, in_channels, 28, 28)``.
        output: ``(batch, num_classes)`` logits.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        _check_positive("LeNet5", num_classes=num_classes, in_channels=in_channels)
        self.conv1 = nn.Conv2d(in_channels, 6, kernel_size=5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Computes the logits.

        Args:
            x: Images, shape ``(batch, in_channels, 28, 28)``.

        Returns:
            Logits, shape ``(batch, num_classes)``.
        """
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (batch, 6, 14, 14)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (batch, 16, 5, 5)
        x = torch.flatten(x, 1)  # (batch, 400)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def lenet5(num_classes: int = 10, in_channels: int = 1) -> LeNet5:
    """Builds LeNet-5 with ReLU for 28x28 inputs (61,706 parameters for MNIST).

    Args:
        num_classes: Number of output logits.
        in_channels: Number of input channels.

    Returns:
        A freshly initialised :class:`LeNet5`.

    Example:
        >>> model = lenet5()
        >>> sum(p.numel() for p in model.parameters())
        61706
    """
    return LeNet5(num_classes=num_classes, in_channels=in_channels)


def _check_positive(where: str, **values: int) -> None:
    """Raises if any of the named values is not a positive integer."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(
                f"{where}: expected {name} to be a positive integer, got "
                f"{value!r}. Pass a whole number of at least 1."
            )
