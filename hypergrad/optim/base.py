"""The update-rule protocol shared by every optimizer in hypergrad.

An update rule is a pair of pure functions, as in optax:

- ``init(params) -> RuleState`` builds the optimizer state;
- ``update(grads, state, params, lr) -> (new_params, new_state)`` takes one
  step with the learning rate ``lr`` of that step.

Neither may modify its inputs in place, and all state lives in the returned
``RuleState``: the step count included, so that PyTorch's "first step" rules
are a function of ``state.count`` rather than a hidden flag. Under these two
conditions ``torch.func.jvp`` through ``update`` gives the tangent recurrence
of the optimizer, which is all the Tracker needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from torch import Tensor

from hypergrad.schedules import Schedule, as_schedule

Params = dict[str, Tensor]


class RuleState(NamedTuple):
    """Optimizer state: a step count and named slots of per-parameter tensors.

    Attributes:
        count: Number of steps taken so far (0 before the first step).
        slots: Slot name -> parameter name -> tensor of ``param.shape``, for
            example ``{"momentum_buffer": {"fc.weight": ...}}``.
    """

    count: int
    slots: dict[str, Params]


InitFn = Callable[[Params], RuleState]
UpdateFn = Callable[[Params, RuleState, Params, float], tuple[Params, RuleState]]


@dataclass(frozen=True)
class UpdateRule:
    """A pure optimizer: ``init`` and ``update`` plus a learning-rate schedule.

    Attributes:
        init: ``init(params) -> RuleState``.
        update: ``update(grads, state, params, lr) -> (new_params, new_state)``.
        lr: Learning rate per step, ``lr(step) -> float``; a float is made a
            constant schedule.
        name: A short name for messages and logs.
        scalar_linear: True when the tangent map of ``update`` (in params,
            grads and slots) is one scalar linear map shared by every
            coordinate and independent of the primal values, as for SGD with
            momentum and weight decay. The Tracker then defers the
            approximate tangents and applies them in closed form. Leave it
            False unless that holds exactly.
    """

    init: InitFn
    update: UpdateFn
    lr: Schedule | float
    name: str = "custom"
    scalar_linear: bool = False

    def __post_init__(self):
        if not callable(self.init) or not callable(self.update):
            raise TypeError(
                "UpdateRule: expected callables for init and update, got "
                f"{type(self.init).__name__} and {type(self.update).__name__}."
            )
        object.__setattr__(self, "lr", as_schedule(self.lr, "UpdateRule"))

    def step(self, grads: Params, state: RuleState, params: Params):
        """Applies ``update`` with the rate the schedule gives at ``state.count``."""
        return self.update(grads, state, params, self.lr(state.count))


def check_range(name: str, value: float, low: float, high: float, *, where: str):
    """Raises ValueError unless ``low <= value < high``."""
    if not low <= value < high:
        raise ValueError(
            f"{where}: expected {name} in [{low}, {high}), got {value!r}. "
            f"Pass a {name} inside that range."
        )
