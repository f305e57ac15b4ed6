"""Adam and AdamW, equal to ``torch.optim.Adam`` and ``torch.optim.AdamW``."""

from __future__ import annotations

import math

import torch

from hypergrad.optim.base import Params, RuleState, UpdateRule, check_range
from hypergrad.schedules import Schedule, as_schedule


def _safe_sqrt(v: torch.Tensor) -> torch.Tensor:
    # sqrt with a zero (not NaN) tangent where v == 0: a coordinate whose
    # gradient has always been zero has a zero tangent as well.
    positive = v > 0
    return torch.where(positive, v, torch.ones_like(v)).sqrt() * positive


def _adam_family(lr, betas, eps, weight_decay, decoupled: bool, where: str):
    schedule = as_schedule(lr, where)
    if len(betas) != 2:
        raise ValueError(f"{where}: expected betas as a pair, got {betas!r}.")
    check_range("betas[0]", betas[0], 0.0, 1.0, where=where)
    check_range("betas[1]", betas[1], 0.0, 1.0, where=where)
    if eps <= 0:
        raise ValueError(f"{where}: expected eps > 0, got {eps!r}. Pass e.g. 1e-8.")
    if weight_decay < 0:
        raise ValueError(
            f"{where}: expected weight_decay >= 0, got {weight_decay!r}. "
            "Pass a non-negative weight_decay."
        )
    beta1, beta2 = betas

    def init(params: Params) -> RuleState:
        def zeros():
            return {k: v.new_zeros(v.shape) for k, v in params.items()}

        return RuleState(count=0, slots={"exp_avg": zeros(), "exp_avg_sq": zeros()})

    def update(grads: Params, state: RuleState, params: Params, rate: float):
        t = state.count + 1
        bias1 = 1 - beta1**t
        bias2_sqrt = math.sqrt(1 - beta2**t)
        new_params, m_new, v_new = {}, {}, {}
        for name, w in params.items():
            g = grads[name]
            if decoupled:
                w = w * (1 - rate * weight_decay)
            elif weight_decay != 0:
                g = g + weight_decay * w
            m = beta1 * state.slots["exp_avg"][name] + (1 - beta1) * g
            v = beta2 * state.slots["exp_avg_sq"][name] + (1 - beta2) * g * g
            denom = _safe_sqrt(v) / bias2_sqrt + eps
            new_params[name] = w - (rate / bias1) * m / denom
            m_new[name], v_new[name] = m, v
        slots = {"exp_avg": m_new, "exp_avg_sq": v_new}
        return new_params, RuleState(count=t, slots=slots)

    return init, update, schedule


def adam(
    lr: Schedule | float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> UpdateRule:
    r"""Adam with L2 weight decay coupled through the adaptive scaling.

    At step ``t = count + 1``::

        g  = grad + weight_decay * w
        m  = beta1 * m + (1 - beta1) * g
        v  = beta2 * v + (1 - beta2) * g**2
        w' = w - eta_t / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)

    The tangent has per-coordinate coefficients (through ``v``), so it takes
    the Tracker's general path.

    Args:
        lr: Learning rate or schedule ``lr(step)``.
        betas: Decay rates of the two moments, each in [0, 1).
        eps: Term added to the denominator, > 0.
        weight_decay: L2 penalty added to the gradient, >= 0.

    Returns:
        An ``UpdateRule``.
    """
    init, update, schedule = _adam_family(
        lr, betas, eps, weight_decay, decoupled=False, where="hypergrad.optim.adam"
    )
    return UpdateRule(init, update, schedule, name="adam")


def adamw(
    lr: Schedule | float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
) -> UpdateRule:
    r"""AdamW: Adam with decoupled weight decay, ``w <- w (1 - eta_t wd)`` first.

    Args:
        lr: Learning rate or schedule ``lr(step)``.
        betas: Decay rates of the two moments, each in [0, 1).
        eps: Term added to the denominator, > 0.
        weight_decay: Decoupled decay rate, >= 0.

    Returns:
        An ``UpdateRule``.
    """
    init, update, schedule = _adam_family(
        lr, betas, eps, weight_decay, decoupled=True, where="hypergrad.optim.adamw"
    )
    return UpdateRule(init, update, schedule, name="adamw")
