"""Stochastic gradient descent, equal to ``torch.optim.SGD`` step by step."""

from __future__ import annotations

from hypergrad.optim.base import Params, RuleState, UpdateRule, check_range
from hypergrad.schedules import Schedule, as_schedule


def sgd(
    lr: Schedule | float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
) -> UpdateRule:
    r"""SGD with PyTorch's momentum, dampening, weight decay and Nesterov rules.

    With gradient ``g``, weights ``w``, buffer ``b`` and rate ``eta_t``::

        d   = g + weight_decay * w
        b   = d                                  if count == 0
        b   = momentum * b + (1 - dampening) * d otherwise
        d   = d + momentum * b  (nesterov)   or   d = b  (momentum > 0)
        w'  = w - eta_t * d

    The tangent (``dw``, ``db``, ``dg``) follows the same lines with ``g``,
    ``w`` and ``b`` replaced by their tangents: one scalar linear map for
    every coordinate, so ``scalar_linear`` is True.

    Args:
        lr: Learning rate or schedule ``lr(step)``.
        momentum: Momentum factor in [0, 1).
        dampening: Dampening of the momentum in [0, 1].
        weight_decay: L2 penalty added to the gradient, >= 0.
        nesterov: Nesterov momentum; needs ``momentum > 0`` and no dampening.

    Returns:
        An ``UpdateRule``.
    """
    where = "hypergrad.optim.sgd"
    schedule = as_schedule(lr, where)
    check_range("momentum", momentum, 0.0, 1.0, where=where)
    check_range("dampening", dampening, 0.0, 1.0 + 1e-12, where=where)
    if weight_decay < 0:
        raise ValueError(
            f"{where}: expected weight_decay >= 0, got {weight_decay!r}. "
            "Pass a non-negative weight_decay."
        )
    if nesterov and (momentum == 0 or dampening != 0):
        raise ValueError(
            f"{where}: nesterov=True needs momentum > 0 and dampening == 0, got "
            f"momentum={momentum!r}, dampening={dampening!r}. Set a momentum, "
            "or pass nesterov=False."
        )

    def init(params: Params) -> RuleState:
        slots = {}
        if momentum != 0:
            slots["momentum_buffer"] = {
                k: v.new_zeros(v.shape) for k, v in params.items()
            }
        return RuleState(count=0, slots=slots)

    def update(grads: Params, state: RuleState, params: Params, rate: float):
        new_params, new_buffers = {}, {}
        for name, w in params.items():
            d = grads[name]
            if weight_decay != 0:
                d = d + weight_decay * w
            if momentum != 0:
                if state.count == 0:
                    b = d
                else:
                    b = momentum * state.slots["momentum_buffer"][name]
                    b = b + (1 - dampening) * d
                new_buffers[name] = b
                d = d + momentum * b if nesterov else b
            new_params[name] = w - rate * d
        slots = {"momentum_buffer": new_buffers} if momentum != 0 else {}
        return new_params, RuleState(count=state.count + 1, slots=slots)

    return UpdateRule(init, update, schedule, name="sgd", scalar_linear=True)
