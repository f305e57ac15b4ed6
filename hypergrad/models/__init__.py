"""Models used in the HYDRA experiments, all free of in-place operations.

Every model here runs under ``torch.func`` transforms (``functional_call``,
``jvp``, ``vmap``) and never reads ``self.parameters()`` inside ``forward``.
"""

from hypergrad.models.densenet import DenseNet, densenet40
from hypergrad.models.lenet import LeNet5, lenet5
from hypergrad.models.mobilenet import make_out_of_place, mobilenetv2
from hypergrad.models.small import MLP, SmallCNN, mlp, small_cnn

__all__ = [
    "MLP",
    "DenseNet",
    "LeNet5",
    "SmallCNN",
    "densenet40",
    "lenet5",
    "make_out_of_place",
    "mlp",
    "mobilenetv2",
    "small_cnn",
]
