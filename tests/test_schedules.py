"""Schedules in ``hypergrad.schedules`` against ``torch.optim.lr_scheduler``.

Step ``t`` of a schedule must be the rate torch gives the ``t``-th optimizer
step when ``scheduler.step()`` follows every ``optimizer.step()``. Each test
reads torch's rate from the optimizer before every step.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch.optim import lr_scheduler

from hypergrad.schedules import (
    ReduceOnPlateau,
    as_schedule,
    constant,
    cosine,
    exponential,
    linear_warmup,
    multistep,
)

STEPS = 200
BASE = 0.1


# -- helpers ---------------------------------------------------------------


def make_optimizer(base: float = BASE) -> torch.optim.Optimizer:
    param = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    return torch.optim.SGD([param], lr=base)


def torch_rates(make_scheduler, steps: int = STEPS, base: float = BASE):
    """Rates of ``steps`` optimizer steps, ``scheduler.step()`` after each."""
    optimizer = make_optimizer(base)
    scheduler = make_scheduler(optimizer)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def assert_rates_close(ours, ref, rtol: float):
    assert len(ours) == len(ref)
    for t, (a, b) in enumerate(zip(ours, ref, strict=True)):
        assert isinstance(a, float), f"step {t}: {type(a).__name__}"
        assert abs(a - b) <= rtol * abs(b), f"step {t}: ours {a!r}, torch {b!r}"


# -- closed-form schedules ------------------------------------------------------


def test_constant():
    schedule = constant(0.05)

    assert [schedule(t) for t in range(STEPS)] == [0.05] * STEPS
    assert as_schedule(0.05)(17) == 0.05
    assert as_schedule(schedule) is schedule


@pytest.mark.parametrize(
    "milestones, gamma",
    [([30, 80, 150], 0.1), ([150, 30, 80, 80], 0.5), ([0, 199], 0.3)],
    ids=["sorted", "unsorted_repeated", "edges"],
)
def test_multistep_matches_torch(milestones, gamma):
    ref = torch_rates(lambda opt: lr_scheduler.MultiStepLR(opt, milestones, gamma))

    schedule = multistep(BASE, milestones, gamma)

    assert_rates_close([schedule(t) for t in range(STEPS)], ref, rtol=1e-12)


@pytest.mark.parametrize("gamma", [0.97, 0.5, 1.01])
def test_exponential_matches_torch(gamma):
    ref = torch_rates(lambda opt: lr_scheduler.ExponentialLR(opt, gamma))

    schedule = exponential(BASE, gamma)

    assert_rates_close([schedule(t) for t in range(STEPS)], ref, rtol=1e-12)


@pytest.mark.parametrize(
    "total_steps, min_lr", [(STEPS, 0.0), (STEPS, 1e-4), (50, 1e-3), (1, 0.0)]
)
def test_cosine_matches_torch_up_to_total_steps(total_steps, min_lr):
    steps = total_steps + 1  # t = 0, ..., T_max
    ref = torch_rates(
        lambda opt: lr_scheduler.CosineAnnealingLR(opt, total_steps, eta_min=min_lr),
        steps=steps,
    )

    schedule = cosine(BASE, total_steps, min_lr)

    ours = [schedule(t) for t in range(steps)]
    assert_rates_close(ours, ref, rtol=1e-10)
    assert ours[0] == BASE
    assert ours[-1] == pytest.approx(min_lr, rel=0, abs=1e-15)


@pytest.mark.parametrize(
    "warmup_steps, start_factor, end_factor",
    [(5, 1.0 / 3, 1.0), (50, 0.1, 1.0), (80, 1.0, 0.2), (1, 0.5, 0.0)],
)
def test_linear_warmup_matches_linear_lr(warmup_steps, start_factor, end_factor):
    ref = torch_rates(
        lambda opt: lr_scheduler.LinearLR(
            opt, start_factor, end_factor, total_iters=warmup_steps
        )
    )

    schedule = linear_warmup(BASE, warmup_steps, start_factor, end_factor)

    assert_rates_close([schedule(t) for t in range(STEPS)], ref, rtol=1e-12)


def test_linear_warmup_default_start_factor_matches_torch():
    defaults = lr_scheduler.LinearLR(make_optimizer(), total_iters=5)

    schedule = linear_warmup(BASE, 5)

    assert schedule(0) == pytest.approx(BASE * defaults.start_factor, rel=1e-15)
    assert schedule(5) == pytest.approx(BASE * defaults.end_factor, rel=1e-15)


@pytest.mark.parametrize("warmup_steps", [1, 20])
def test_linear_warmup_then_cosine_matches_sequential_lr(warmup_steps):
    total_steps = STEPS - warmup_steps

    def make_scheduler(opt):
        warmup = lr_scheduler.LinearLR(opt, 0.1, 1.0, total_iters=warmup_steps)
        decay = lr_scheduler.CosineAnnealingLR(opt, total_steps, eta_min=1e-5)
        return lr_scheduler.SequentialLR(opt, [warmup, decay], [warmup_steps])

    ref = torch_rates(make_scheduler, steps=STEPS + 1)

    schedule = linear_warmup(
        BASE, warmup_steps, 0.1, 1.0, then=cosine(BASE, total_steps, 1e-5)
    )

    assert_rates_close([schedule(t) for t in range(STEPS + 1)], ref, rtol=1e-10)


# -- ReduceOnPlateau ----------------------------------------------------------


def plateau_metrics(threshold: float, steps: int = STEPS):
    """A loss curve with descents, flat stretches, rises and noise.

    The "tiny" stretch improves on the previous epoch by half the relative
    threshold each epoch: no single epoch counts as better, until the total
    drift from the best passes the threshold.
    """
    g = torch.Generator().manual_seed(0)
    kinds = ["descent", "flat", "tiny", "rise", "noise", "flat", "descent", "tiny"]
    value, metrics = 1.0, []
    while len(metrics) < steps:
        kind = kinds[len(metrics) // 10 % len(kinds)]
        if kind == "descent":
            value *= 0.95
        elif kind == "tiny":
            value *= 1 - threshold / 2
        elif kind == "rise":
            value *= 1.02
        elif kind == "noise":
            value *= 1 + 0.01 * torch.randn((), generator=g, dtype=torch.float64).item()
        metrics.append(value)
    return metrics


def run_plateau(metrics, base: float = BASE, **kwargs):
    """Rates per epoch from ours and from ``ReduceLROnPlateau``, same metrics."""
    optimizer = make_optimizer(base)
    scheduler = lr_scheduler.ReduceLROnPlateau(optimizer, **kwargs)
    schedule = ReduceOnPlateau(base, **kwargs)
    ours, ref = [], []
    for epoch, metric in enumerate(metrics):
        ours.append(schedule(epoch))
        ref.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step(metric)
        returned = schedule.step(metric)
        assert returned == schedule(epoch + 1)
    return ours, ref


PLATEAU_CASES = {
    "min_rel": dict(factor=0.5, patience=3, threshold=1e-3, min_lr=1e-5),
    "min_rel_cooldown_min_lr": dict(
        factor=0.3, patience=2, threshold=1e-3, cooldown=3, min_lr=1e-3
    ),
    "min_abs": dict(
        factor=0.5, patience=2, threshold=1e-3, threshold_mode="abs", min_lr=1e-4
    ),
    "min_patience_zero": dict(factor=0.7, patience=0, threshold=1e-3, min_lr=1e-6),
    "max_rel": dict(
        mode="max", factor=0.5, patience=3, threshold=1e-3, cooldown=2, min_lr=1e-4
    ),
    "max_abs": dict(
        mode="max",
        factor=0.5,
        patience=1,
        threshold=1e-3,
        threshold_mode="abs",
        min_lr=1e-4,
    ),
}


@pytest.mark.parametrize("case", list(PLATEAU_CASES))
def test_reduce_on_plateau_matches_torch(case):
    kwargs = PLATEAU_CASES[case]
    metrics = plateau_metrics(kwargs["threshold"])
    if kwargs.get("mode") == "max":
        metrics = [1 / m for m in metrics]

    ours, ref = run_plateau(metrics, **kwargs)

    assert_rates_close(ours, ref, rtol=1e-12)
    assert len(set(ref)) >= 4, "too few reductions to test anything"


def test_reduce_on_plateau_reaches_min_lr():
    kwargs = PLATEAU_CASES["min_rel_cooldown_min_lr"]

    ours, ref = run_plateau(plateau_metrics(1e-3), **kwargs)

    assert min(ref) == kwargs["min_lr"]
    assert ours[-1] == kwargs["min_lr"]


def test_reduce_on_plateau_tiny_improvement_is_not_better():
    # best = 1.0; 0.99995 is better by 0.005% < 0.01%, so three bad epochs.
    metrics = [1.0, 0.99995, 0.99995, 0.99991, 0.5]
    kwargs = dict(factor=0.5, patience=2, threshold=1e-4)

    ours, ref = run_plateau(metrics, **kwargs)

    assert ours == ref == [BASE, BASE, BASE, BASE, BASE / 2]


def test_reduce_on_plateau_cooldown_ignores_bad_epochs():
    # Reduce after epoch 2; the two cooldown epochs do not count as bad.
    metrics = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    kwargs = dict(factor=0.5, patience=1, cooldown=2)

    ours, ref = run_plateau(metrics, **kwargs)

    expected = [BASE] * 3 + [BASE / 2] * 4 + [BASE / 4]
    assert ours == ref == pytest.approx(expected, rel=1e-15)


def test_reduce_on_plateau_paper_rule():
    # Fashion-MNIST rule: x0.5 when train + val loss has not decreased by
    # more than 0.01% of the best for two epochs.
    train = [0.90, 0.60, 0.45, 0.44998, 0.44999, 0.44997, 0.40, 0.39999, 0.39998]
    val = [0.95, 0.70, 0.55, 0.55000, 0.55000, 0.55000, 0.50, 0.50000, 0.50000]
    metrics = [t + v for t, v in zip(train, val, strict=True)]
    kwargs = dict(factor=0.5, patience=2, threshold=1e-4)

    ours, ref = run_plateau(metrics, base=0.01, **kwargs)
    schedule = ReduceOnPlateau(0.01, **kwargs)
    after = [schedule.step(train[i] + val[i]) for i in range(len(metrics))]

    assert ours == ref
    # Three epochs within 0.01% of the best 1.0: halved after the third.
    assert after == [0.01] * 5 + [0.005] * 4


@pytest.mark.parametrize(
    "base, min_lr",
    [(1e-7, 0.0), (1e-3, 1e-3 - 5e-9)],
    ids=["tiny_rate", "within_eps_of_min_lr"],
)
def test_reduce_on_plateau_skips_reductions_below_eps_like_torch(base, min_lr):
    # ReduceLROnPlateau leaves the rate alone when a reduction would change it
    # by less than eps = 1e-8.
    metrics = [1.0] * 12
    kwargs = dict(factor=0.5, patience=0, min_lr=min_lr)

    ours, ref = run_plateau(metrics, base=base, **kwargs)

    assert_rates_close(ours, ref, rtol=1e-12)


# -- bad arguments ----------------------------------------------------------


LR_MESSAGE = "expected a finite learning rate >= 0, got {!r}. Pass a non-negative lr."
WARMUP_MESSAGE = (
    "hypergrad.schedules.linear_warmup: expected warmup_steps > 0, "
    "0 < start_factor <= 1 and 0 <= end_factor <= 1, got {}."
)
PLATEAU = "hypergrad.schedules.ReduceOnPlateau"
MODE_MESSAGE = (
    f"{PLATEAU}: expected mode 'min' or 'max' and threshold_mode 'rel' or "
    "'abs', got {}."
)

BAD_VALUES = {
    "constant_negative": (
        lambda: constant(-0.1),
        "hypergrad.schedules.constant: " + LR_MESSAGE.format(-0.1),
    ),
    "constant_inf": (
        lambda: constant(math.inf),
        "hypergrad.schedules.constant: " + LR_MESSAGE.format(math.inf),
    ),
    "as_schedule_negative": (
        lambda: as_schedule(-1.0, "caller"),
        "caller: " + LR_MESSAGE.format(-1.0),
    ),
    "multistep_negative_base": (
        lambda: multistep(-0.1, [10]),
        "hypergrad.schedules.multistep: " + LR_MESSAGE.format(-0.1),
    ),
    "multistep_negative_milestone": (
        lambda: multistep(0.1, [10, -5]),
        "hypergrad.schedules.multistep: expected milestones >= 0, got [10, -5].",
    ),
    "exponential_zero_gamma": (
        lambda: exponential(0.1, 0.0),
        "hypergrad.schedules.exponential: expected gamma > 0, got 0.0.",
    ),
    "exponential_negative_gamma": (
        lambda: exponential(0.1, -0.5),
        "hypergrad.schedules.exponential: expected gamma > 0, got -0.5.",
    ),
    "cosine_zero_steps": (
        lambda: cosine(0.1, 0),
        "hypergrad.schedules.cosine: expected total_steps > 0, got 0.",
    ),
    "cosine_negative_base": (
        lambda: cosine(-0.1, 10),
        "hypergrad.schedules.cosine: " + LR_MESSAGE.format(-0.1),
    ),
    "warmup_zero_steps": (
        lambda: linear_warmup(0.1, 0),
        WARMUP_MESSAGE.format(f"0, {1.0 / 3!r}, 1.0"),
    ),
    "warmup_zero_start": (
        lambda: linear_warmup(0.1, 5, start_factor=0.0),
        WARMUP_MESSAGE.format("5, 0.0, 1.0"),
    ),
    "warmup_start_above_one": (
        lambda: linear_warmup(0.1, 5, start_factor=1.5),
        WARMUP_MESSAGE.format("5, 1.5, 1.0"),
    ),
    "warmup_end_above_one": (
        lambda: linear_warmup(0.1, 5, end_factor=1.5),
        WARMUP_MESSAGE.format(f"5, {1.0 / 3!r}, 1.5"),
    ),
    "warmup_negative_end": (
        lambda: linear_warmup(0.1, 5, end_factor=-0.1),
        WARMUP_MESSAGE.format(f"5, {1.0 / 3!r}, -0.1"),
    ),
    "plateau_negative_base": (
        lambda: ReduceOnPlateau(-0.1),
        f"{PLATEAU}: " + LR_MESSAGE.format(-0.1),
    ),
    "plateau_factor_one": (
        lambda: ReduceOnPlateau(0.1, factor=1.0),
        f"{PLATEAU}: expected factor in (0, 1), got 1.0.",
    ),
    "plateau_factor_zero": (
        lambda: ReduceOnPlateau(0.1, factor=0.0),
        f"{PLATEAU}: expected factor in (0, 1), got 0.0.",
    ),
    "plateau_bad_mode": (
        lambda: ReduceOnPlateau(0.1, mode="avg"),
        MODE_MESSAGE.format("'avg' and 'rel'"),
    ),
    "plateau_bad_threshold_mode": (
        lambda: ReduceOnPlateau(0.1, threshold_mode="relative"),
        MODE_MESSAGE.format("'min' and 'relative'"),
    ),
    "plateau_nan_metric": (
        lambda: ReduceOnPlateau(0.1).step(math.nan),
        "ReduceOnPlateau.step: expected a finite metric, got nan. "
        "Check the loss that feeds it.",
    ),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_arguments_raise_value_error(case):
    build, message = BAD_VALUES[case]

    with pytest.raises(ValueError, match=re.escape(message)):
        build()


@pytest.mark.parametrize("lr", ["0.1", True, None, torch.tensor(0.1)])
def test_lr_of_wrong_type_raises_type_error(lr):
    message = (
        "hypergrad.schedules.constant: expected the learning rate as a float or "
        f"a schedule (a callable step -> lr), got {type(lr).__name__}."
    )

    with pytest.raises(TypeError, match=re.escape(message)):
        constant(lr)


def test_plateau_metric_may_be_a_zero_dim_tensor():
    schedule = ReduceOnPlateau(0.1, factor=0.5, patience=0)

    schedule.step(torch.tensor(1.0))
    rate = schedule.step(torch.tensor(2.0))

    assert rate == 0.05
