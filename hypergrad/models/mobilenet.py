"""torchvision's MobileNetV2 with every in-place operation made out of place.

torchvision builds MobileNetV2 with ``ReLU6(inplace=True)``. In-place
activations break forward-mode AD under ``torch.func.jvp`` (and confuse other
``torch.func`` transforms), so :func:`mobilenetv2` walks the modules and turns
``inplace`` off on every activation and dropout layer. The architecture and
the parameters are torchvision's: 2,236,682 parameters for 10 classes.

torchvision is an optional dependency (``pip install "hypergrad[vision]"``).
"""

from __future__ import annotations

from torch import nn

from hypergrad.models.lenet import _check_positive

__all__ = ["make_out_of_place", "mobilenetv2"]


def make_out_of_place(model: nn.Module) -> nn.Module:
    """Sets ``inplace=False`` on every submodule that has an ``inplace`` flag.

    This covers ``ReLU``, ``ReLU6``, ``Hardswish``, ``Dropout`` and the like.
    The model is changed in place and returned, for chaining.

    Args:
        model: Any module.

    Returns:
        The same module, now free of in-place activations and dropout.
    """
    for module in model.modules():
        if isinstance(getattr(module, "inplace", None), bool):
            module.inplace = False
    return model


def mobilenetv2(num_classes: int = 10) -> nn.Module:
    """Builds torchvision's MobileNetV2 (width 1.0) with out-of-place ops only.

    The model takes ``(batch, 3, h, w)`` images (32x32 CIFAR images work; the
    feature map is then 1x1 before global pooling) and returns
    ``(batch, num_classes)`` logits. Weights are freshly initialised (no
    download). It has 2,236,682 parameters for 10 classes.

    Args:
        num_classes: Number of output logits.

    Returns:
        A ``torchvision.models.MobileNetV2`` with no in-place operations.

    Raises:
        ImportError: If torchvision is not installed.
    """
    _check_positive("mobilenetv2", num_classes=num_classes)
    try:
        from torchvision.models import mobilenet_v2
    except ImportError as error:
        raise ImportError(
            "mobilenetv2 needs torchvision, which is not installed. Install it "
            'with `pip install "hypergrad[vision]"` (or `pip install torchvision`).'
        ) from error
    return make_out_of_place(mobilenet_v2(weights=None, num_classes=num_classes))
