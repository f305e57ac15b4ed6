"""Learning-rate schedules: ``schedule(step) -> lr`` for step 0, 1, 2, ...

Step ``t`` gets the rate that ``torch.optim.lr_scheduler``'s scheduler gives
to the ``t``-th optimizer step when ``scheduler.step()`` is called after every
optimizer step (so milestones and periods count optimizer steps, not epochs).
Rates are constants of the trajectory: the Tracker evaluates them on the host
and never differentiates them.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence

Schedule = Callable[[int], float]


def _check_lr(value: float, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"{where}: expected the learning rate as a float or a schedule "
            f"(a callable step -> lr), got {type(value).__name__}."
        )
    if not math.isfinite(value) or value < 0:
        raise ValueError(
            f"{where}: expected a finite learning rate >= 0, got {value!r}. "
            "Pass a non-negative lr."
        )
    return float(value)


def as_schedule(lr: Schedule | float, where: str = "hypergrad") -> Schedule:
    """Returns ``lr`` if it is a schedule, else a constant schedule of it."""
    if callable(lr):
        return lr
    return constant(_check_lr(lr, where))


def constant(lr: float) -> Schedule:
    """The same rate at every step."""
    lr = _check_lr(lr, "hypergrad.schedules.constant")
    return lambda step: lr


def multistep(base: float, milestones: Sequence[int], gamma: float = 0.1) -> Schedule:
    """``base * gamma ** (number of milestones <= step)``, like ``MultiStepLR``."""
    base = _check_lr(base, "hypergrad.schedules.multistep")
    marks = sorted(int(m) for m in milestones)
    if any(m < 0 for m in marks):
        raise ValueError(
            f"hypergrad.schedules.multistep: expected milestones >= 0, got "
            f"{list(milestones)!r}."
        )
    return lambda step: base * gamma ** bisect.bisect_right(marks, step)


def exponential(base: float, gamma: float) -> Schedule:
    """``base * gamma ** step``, like ``ExponentialLR``."""
    base = _check_lr(base, "hypergrad.schedules.exponential")
    if not 0 < gamma:
        raise ValueError(
            f"hypergrad.schedules.exponential: expected gamma > 0, got {gamma!r}."
        )
    return lambda step: base * gamma**step


def cosine(base: float, total_steps: int, min_lr: float = 0.0) -> Schedule:
    """Cosine annealing from ``base`` to ``min_lr`` over ``total_steps``.

    ``min_lr + (base - min_lr) * (1 + cos(pi * step / total_steps)) / 2``, the
    closed form of ``CosineAnnealingLR(T_max=total_steps, eta_min=min_lr)``.
    """
    base = _check_lr(base, "hypergrad.schedules.cosine")
    if total_steps <= 0:
        raise ValueError(
            "hypergrad.schedules.cosine: expected total_steps > 0, got "
            f"{total_steps!r}."
        )

    def schedule(step: int) -> float:
        return (
            min_lr + (base - min_lr) * (1 + math.cos(math.pi * step / total_steps)) / 2
        )

    return schedule


def linear_warmup(
    base: float,
    warmup_steps: int,
    start_factor: float = 1.0 / 3,
    end_factor: float = 1.0,
    then: Schedule | None = None,
) -> Schedule:
    """Linear warm-up, like ``LinearLR(start_factor, end_factor, warmup_steps)``.

    The rate goes from ``base * start_factor`` to ``base * end_factor`` over
    ``warmup_steps`` steps; after that it is ``then(step - warmup_steps)`` if
    a schedule is given (as ``SequentialLR`` would chain them), else constant.
    """
    base = _check_lr(base, "hypergrad.schedules.linear_warmup")
    if warmup_steps <= 0 or not 0 < start_factor <= 1 or not 0 <= end_factor <= 1:
        raise ValueError(
            "hypergrad.schedules.linear_warmup: expected warmup_steps > 0, "
            "0 < start_factor <= 1 and 0 <= end_factor <= 1, got "
            f"{warmup_steps!r}, {start_factor!r}, {end_factor!r}."
        )

    def schedule(step: int) -> float:
        if then is not None and step >= warmup_steps:
            return then(step - warmup_steps)
        done = min(step, warmup_steps) / warmup_steps
        return base * (start_factor + (end_factor - start_factor) * done)

    return schedule


class ReduceOnPlateau:
    """Multiplies the rate by ``factor`` when a metric stops improving.

    Feed it one metric per epoch with :meth:`step`, as ``ReduceLROnPlateau``;
    calling it with a step number returns the current rate. The paper's rule
    for Fashion-MNIST ("x0.5 when train + validation loss has not decreased by
    more than 0.01% of the best for two epochs") is
    ``ReduceOnPlateau(0.01, factor=0.5, patience=2, threshold=1e-4)`` fed with
    ``train_loss + val_loss``.

    Args:
        base: Initial rate.
        factor: Multiplier in (0, 1) applied on a plateau.
        patience: Epochs without improvement tolerated before reducing.
        threshold: Relative (``"rel"``) or absolute (``"abs"``) improvement
            needed to count as better.
        threshold_mode: ``"rel"`` or ``"abs"``.
        mode: ``"min"`` (lower metric is better) or ``"max"``.
        cooldown: Epochs to wait after a reduction before counting again.
        min_lr: Lower bound of the rate.
        eps: Smallest change of the rate that is applied, as in torch.
    """

    def __init__(
        self,
        base: float,
        factor: float = 0.1,
        patience: int = 10,
        threshold: float = 1e-4,
        threshold_mode: str = "rel",
        mode: str = "min",
        cooldown: int = 0,
        min_lr: float = 0.0,
        eps: float = 1e-8,
    ):
        where = "hypergrad.schedules.ReduceOnPlateau"
        self.lr = _check_lr(base, where)
        if not 0 < factor < 1:
            raise ValueError(f"{where}: expected factor in (0, 1), got {factor!r}.")
        if mode not in ("min", "max") or threshold_mode not in ("rel", "abs"):
            raise ValueError(
                f"{where}: expected mode 'min' or 'max' and threshold_mode 'rel' or "
                f"'abs', got {mode!r} and {threshold_mode!r}."
            )
        self.factor, self.patience, self.threshold = factor, patience, threshold
        self.threshold_mode, self.mode = threshold_mode, mode
        if eps < 0:
            raise ValueError(f"{where}: expected eps >= 0, got {eps!r}.")
        self.cooldown, self.min_lr, self.eps = cooldown, min_lr, eps
        self.best = math.inf if mode == "min" else -math.inf
        self.num_bad_epochs = 0
        self.cooldown_counter = 0

    def __call__(self, step: int) -> float:
        return self.lr

    def _improves(self, metric: float) -> bool:
        if self.mode == "min":
            scale = 1 - self.threshold if self.threshold_mode == "rel" else 1.0
            shift = 0.0 if self.threshold_mode == "rel" else -self.threshold
            return metric < self.best * scale + shift
        scale = 1 + self.threshold if self.threshold_mode == "rel" else 1.0
        shift = 0.0 if self.threshold_mode == "rel" else self.threshold
        return metric > self.best * scale + shift

    def step(self, metric: float) -> float:
        """Records one epoch's metric and returns the rate for what follows."""
        metric = float(metric)
        if not math.isfinite(metric):
            raise ValueError(
                "ReduceOnPlateau.step: expected a finite metric, got "
                f"{metric!r}. Check the loss that feeds it."
            )
        if self._improves(metric):
            self.best = metric
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0
        if self.num_bad_epochs > self.patience:
            new_lr = max(self.lr * self.factor, self.min_lr)
            if self.lr - new_lr > self.eps:
                self.lr = new_lr
            self.cooldown_counter = self.cooldown
            self.num_bad_epochs = 0
        return self.lr
