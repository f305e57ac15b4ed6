"""Power iteration against an explicit Hessian, and the Theorem 1 bound."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import hypergrad as hg
from hypergrad.bounds import (
    Theorem1,
    batch_loss,
    hessian_vector_product,
    theorem1_bound,
    top_hessian_eigenvalue,
)
from hypergrad.jobsetup import loss_fn


@pytest.fixture(scope="module")
def problem():
    """A tanh MLP (31 parameters) in float64, a batch, its explicit Hessian."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    fmodel = hg.FunctionalModel(model)
    params = fmodel.initial_params()
    g = torch.Generator().manual_seed(1)
    inputs = torch.randn(12, 3, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 3, (12,), generator=g)
    loss = batch_loss(fmodel, loss_fn, {}, inputs, targets)

    shapes = {n: p.shape for n, p in params.items()}
    sizes = [p.numel() for p in params.values()]

    def unflatten(flat):
        pieces = flat.split(sizes)
        return {n: t.reshape(shapes[n]) for n, t in zip(shapes, pieces, strict=True)}

    flat = torch.cat([p.reshape(-1) for p in params.values()])
    hessian = torch.autograd.functional.hessian(lambda f: loss(unflatten(f)), flat)
    return loss, params, hessian, unflatten


def test_hessian_vector_product_matches_explicit_hessian(problem):
    loss, params, hessian, unflatten = problem
    v = torch.randn(hessian.shape[0], generator=torch.Generator().manual_seed(2))
    v = v.double()
    ours = hessian_vector_product(loss, params, unflatten(v))
    flat = torch.cat([t.reshape(-1) for t in ours.values()])
    torch.testing.assert_close(flat, hessian @ v, rtol=1e-10, atol=1e-12)


def test_power_iteration_finds_the_dominant_eigenvalue(problem):
    loss, params, hessian, _ = problem
    eigenvalues = torch.linalg.eigvalsh(hessian)
    dominant = float(eigenvalues[eigenvalues.abs().argmax()])
    second = float(eigenvalues.abs().sort().values[-2])
    assert second < 0.9 * abs(dominant)  # a gap, so 500 iterations converge

    g = torch.Generator().manual_seed(3)
    value, vector = top_hessian_eigenvalue(
        loss, params, iters=500, tol=1e-13, generator=g
    )
    assert abs(value - dominant) <= 1e-6 * abs(dominant)
    assert math.isclose(
        math.sqrt(sum(float(t.pow(2).sum()) for t in vector.values())), 1.0
    )


def test_power_iteration_warm_start_and_early_stop(problem):
    loss, params, hessian, _ = problem
    eigenvalues = torch.linalg.eigvalsh(hessian)
    dominant = float(eigenvalues[eigenvalues.abs().argmax()])
    g = torch.Generator().manual_seed(4)
    _, vector = top_hessian_eigenvalue(loss, params, iters=300, tol=1e-13, generator=g)
    value, _ = top_hessian_eigenvalue(loss, params, iters=3, vector=vector, tol=1e-12)
    assert abs(value - dominant) <= 1e-6 * abs(dominant)


def test_power_iteration_rejects_bad_arguments(problem):
    loss, params, _, _ = problem
    with pytest.raises(ValueError, match=r"expected an int iters >= 1, got 0\."):
        top_hessian_eigenvalue(loss, params, iters=0)
    with pytest.raises(ValueError, match=r"expected tol >= 0, got -1"):
        top_hessian_eigenvalue(loss, params, tol=-1.0)


def test_theorem1_bound_values():
    assert theorem1_bound(2.0, 3.0, 0.1, 0.01, 0.5) == pytest.approx(120.0)
    assert theorem1_bound(2.0, 3.0, 0.1, 0.01, 0.0) == math.inf
    assert theorem1_bound(2.0, 3.0, 0.1, 0.0, 0.5) == math.inf
    with pytest.raises(ValueError, match=r"expected weight_decay >= 0, got -1"):
        theorem1_bound(2.0, 3.0, 0.1, 0.01, -1.0)


def test_theorem1_keeps_running_maxima(problem):
    loss, params, hessian, _ = problem
    monitor = Theorem1(weight_decay=0.5, first_lr=0.1, iters=30)
    value = monitor.observe_hessian(loss, params)
    assert monitor.hessian_norm == abs(value)
    norms = monitor.observe_tangents({"w": torch.tensor([[3.0, 4.0], [0.0, 1.0]])})
    torch.testing.assert_close(norms, torch.tensor([5.0, 1.0]))
    monitor.observe_tangents({"w": torch.tensor([[1.0, 0.0]])})
    assert monitor.tangent_norm == 5.0
    assert monitor.bound(0.05) == pytest.approx(abs(value) * 5.0 * 0.1 / 0.025)
    with pytest.raises(ValueError, match=r"Theorem1: expected an int iters >= 1"):
        Theorem1(weight_decay=0.5, first_lr=0.1, iters=0)


def test_bound_holds_for_plain_sgd_in_float64():
    """The measured error along a short run stays below the bound."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    g = torch.Generator().manual_seed(6)
    x = torch.randn(40, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=g)
    rule = hg.optim.sgd(hg.schedules.multistep(0.2, [10], 0.5), weight_decay=0.05)
    tracker = hg.Tracker(
        model, loss_fn, rule, num_train=40, tracked=torch.arange(4), mode="both"
    )
    monitor = Theorem1(weight_decay=0.05, first_lr=0.2, iters=10)
    for step in range(20):
        rows = torch.arange(8 * (step % 5), 8 * (step % 5 + 1))
        loss = batch_loss(tracker.fmodel, loss_fn, tracker.buffers, x[rows], y[rows])
        monitor.observe_hessian(loss, tracker.params)
        lr = rule.lr(tracker.state.count)
        tracker.step(x[rows], y[rows], rows)
        monitor.observe_tangents(tracker.hypergradients("exact"))
        exact = tracker.hypergradients("exact")
        approx = tracker.hypergradients("approx")
        diff = {n: exact[n] - approx[n] for n in exact}
        errors = torch.stack(
            [t.reshape(4, -1).pow(2).sum(1) for t in diff.values()]
        ).sum(0)
        assert float(errors.sqrt().max()) < monitor.bound(lr)
