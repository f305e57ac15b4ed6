"""Pure update rules: ``init(params) -> state``, ``update(...) -> (params, state)``."""

from hypergrad.optim.adam import adam, adamw
from hypergrad.optim.base import Params, RuleState, UpdateRule
from hypergrad.optim.sgd import sgd

__all__ = ["Params", "RuleState", "UpdateRule", "adam", "adamw", "sgd"]
