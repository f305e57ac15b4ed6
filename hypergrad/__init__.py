"""hypergrad: which training samples made a network what it is.

Training-trajectory hypergradients (HYDRA) for PyTorch, on ``torch.func``.
"""

from hypergrad import optim, schedules
from hypergrad.attribution import top_k, total_contribution
from hypergrad.diagnostics import approximation_error
from hypergrad.functional import FunctionalModel
from hypergrad.optim import RuleState, UpdateRule
from hypergrad.tracker import Tracker

__version__ = "0.1.0"

__all__ = [
    "FunctionalModel",
    "RuleState",
    "Tracker",
    "UpdateRule",
    "approximation_error",
    "optim",
    "schedules",
    "top_k",
    "total_contribution",
]
