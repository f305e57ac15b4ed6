"""DenseNet-40 (growth rate 12) for 32x32 CIFAR images, without in-place ops.

The default network follows Huang et al., "Densely Connected Convolutional
Networks" (CVPR 2017), Section 3 and the CIFAR set-up of Section 4: a 3x3
convolution to 16 channels, three dense blocks of 12 layers each
(BN-ReLU-conv3x3, ``growth_rate`` new channels per layer, concatenated),
transitions of BN-ReLU-conv1x1 and 2x2 average pooling between the blocks,
then BN-ReLU, global average pooling and a linear classifier. Convolutions
have no bias; BatchNorm layers have their affine weight and bias.

Parameter count. With the defaults (no bottleneck, no compression) this
model has **1,019,722** parameters: 1,001,626 in the convolutions and the
classifier plus 18,096 BatchNorm affine parameters. That is the "1.0M" of
DenseNet (L=40, k=12) in Table 2 of the DenseNet paper. The HYDRA
supplement's 176,122 is not this network: it is exactly the count of the
DenseNet-BC variant of depth 40 (bottleneck 1x1 convolutions to
``4 * growth_rate`` channels, compression 0.5 in the transitions, a first
convolution to ``2 * growth_rate`` channels, BN affine parameters counted,
no convolution biases). ``densenet40(bottleneck=True, compression=0.5)``
builds that variant and has exactly 176,122 parameters.

Every operation is out of place (``F.relu``, ``torch.cat``), so the model
works under ``torch.func`` transforms, forward-mode ``jvp`` included.
BatchNorm layers are ordinary :class:`torch.nn.BatchNorm2d` modules; in train
mode they update their running statistics like any BatchNorm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hypergrad.models.lenet import _check_positive

__all__ = ["DenseNet", "densenet40"]


class _DenseLayer(nn.Module):
    """BN-ReLU-conv3x3 (optionally preceded by a BN-ReLU-conv1x1 bottleneck).

    Shapes:
        input: ``(batch, in_channels, h, w)``.
        output: ``(batch, in_channels + growth_rate, h, w)``, the input with
        the new feature maps concatenated after it.
    """

    def __init__(self, in_channels: int, growth_rate: int, bottleneck: bool) -> None:
        super().__init__()
        if bottleneck:
            inner = 4 * growth_rate
            self.bottleneck_norm = nn.BatchNorm2d(in_channels)
            self.bottleneck_conv = nn.Conv2d(in_channels, inner, 1, bias=False)
        else:
            inner = in_channels
            self.bottleneck_norm = None
            self.bottleneck_conv = None
        self.norm = nn.BatchNorm2d(inner)
        self.conv = nn.Conv2d(inner, growth_rate, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.bottleneck_conv is not None:
            h = self.bottleneck_conv(F.relu(self.bottleneck_norm(h)))
        h = self.conv(F.relu(self.norm(h)))
        return torch.cat([x, h], dim=1)


class _Transition(nn.Module):
    """BN-ReLU-conv1x1 then 2x2 average pooling (halves height and width)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.conv(F.relu(self.norm(x))), 2)


class DenseNet(nn.Module):
    """DenseNet for CIFAR: three dense blocks with transitions in between.

    Args:
        depth: Total depth ``L``; each block has ``(L - 4) / 3`` layers, or
            half of that with ``bottleneck`` (each layer is then two convs).
        num_classes: Number of output logits.
        growth_rate: Channels added by each dense layer (``k``).
        bottleneck: Put a 1x1 convolution to ``4 * growth_rate`` channels in
            front of each 3x3 convolution (the "B" of DenseNet-BC).
        compression: Fraction of channels a transition keeps (1.0 keeps all;
            0.5 is the "C" of DenseNet-BC).
        in_channels: Number of input channels.

    Shapes:
        input: ``(batch, in_channels, 32, 32)``.
        output: ``(batch, num_classes)`` logits.
    """

    def __init__(
        self,
        depth: int = 40,
        num_classes: int = 10,
        growth_rate: int = 12,
        *,
        bottleneck: bool = False,
        compression: float = 1.0,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        _check_positive(
            "DenseNet",
            num_classes=num_classes,
            growth_rate=growth_rate,
            in_channels=in_channels,
        )
        layers_per_block = _layers_per_block(depth, bottleneck)
        if not 0.0 < compression <= 1.0:
            raise ValueError(
                f"DenseNet: expected compression in (0, 1], got {compression!r}. "
                "Use 1.0 for no compression or 0.5 for DenseNet-BC."
            )

        channels = 2 * growth_rate if bottleneck else 16
        self.stem = nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)
        stages: list[nn.Module] = []
        for block in range(3):
            for _ in range(layers_per_block):
                stages.append(_DenseLayer(channels, growth_rate, bottleneck))
                channels += growth_rate
            if block < 2:
                out_channels = int(channels * compression)
                stages.append(_Transition(channels, out_channels))
                channels = out_channels
        self.features = nn.Sequential(*stages)
        self.final_norm = nn.BatchNorm2d(channels)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Computes the logits.

        Args:
            x: Images, shape ``(batch, in_channels, 32, 32)``.

        Returns:
            Logits, shape ``(batch, num_classes)``.
        """
        x = self.features(self.stem(x))  # (batch, channels, 8, 8)
        x = F.relu(self.final_norm(x))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)  # (batch, channels)
        return self.classifier(x)


def densenet40(
    num_classes: int = 10,
    growth_rate: int = 12,
    *,
    bottleneck: bool = False,
    compression: float = 1.0,
) -> DenseNet:
    """Builds DenseNet-40 for 32x32 RGB images.

    With the defaults (``growth_rate=12``, no bottleneck, no compression) the
    model has 1,019,722 parameters. ``bottleneck=True, compression=0.5`` gives
    DenseNet-BC-40 with 176,122 parameters, the count of the HYDRA supplement
    (see the module docstring).

    Args:
        num_classes: Number of output logits.
        growth_rate: Channels added by each dense layer (``k``).
        bottleneck: Use 1x1 bottleneck convolutions (DenseNet-BC).
        compression: Fraction of channels kept by each transition.

    Returns:
        A freshly initialised :class:`DenseNet` of depth 40.
    """
    return DenseNet(
        40,
        num_classes,
        growth_rate,
        bottleneck=bottleneck,
        compression=compression,
    )


def _layers_per_block(depth: int, bottleneck: bool) -> int:
    """Number of dense layers per block for a given depth."""
    step = 3 * (2 if bottleneck else 1)
    valid = isinstance(depth, int) and not isinstance(depth, bool)
    per_block, remainder = divmod(depth - 4, step) if valid else (0, 1)
    if remainder != 0 or per_block < 1:
        raise ValueError(
            f"DenseNet: expected depth = 4 + {step} * n with n >= 1 "
            f"(bottleneck={bottleneck}), got depth={depth!r}. "
            f"Use for example depth={4 + step * 2} or 40."
        )
    return per_block
