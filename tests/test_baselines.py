"""Baselines against explicit references: inverses, sums, captum, signs.

Every problem is tiny and in float64: a tanh MLP or a multinomial logistic
regression on a few dozen points, with Hessians and per-sample gradients
formed explicitly by plain autograd for the references.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers_reference import one_thread
from torch import nn

from hypergrad import baselines as bl
from hypergrad.baselines import captum_adapter

DTYPE = torch.float64
N_TRAIN, N_REF, D_IN, CLASSES = 40, 7, 5, 3
DAMPING, WEIGHT_DECAY = 0.01, 0.02
needs_captum = pytest.mark.skipif(
    not captum_adapter.captum_available(), reason="captum is not installed"
)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    yield from one_thread()


def ce(outputs, targets):
    return F.cross_entropy(outputs, targets, reduction="none")


def make_data(seed: int, n: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D_IN, generator=g, dtype=DTYPE)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    return x, y


def make_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D_IN, 8), nn.Tanh(), nn.Linear(8, CLASSES)).to(DTYPE)


def flat_grad(model, params, x, y):
    """Plain autograd: the gradient of ``sum loss`` over the rows, flattened."""
    loss = ce(model(x), y).sum()
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


def explicit_scores(model, params, train, ref, ridge):
    """``g_ref^T (H + ridge I)^{-1} g_i`` with H formed entry by entry."""
    x, y = train
    grads = torch.stack(
        [flat_grad(model, params, x[i : i + 1], y[i : i + 1]) for i in range(len(x))]
    )
    g_ref = flat_grad(model, params, *ref)
    loss = ce(model(x), y).mean()
    first = torch.cat(
        [g.reshape(-1) for g in torch.autograd.grad(loss, params, create_graph=True)]
    )
    rows = [
        torch.cat(
            [
                h.reshape(-1)
                for h in torch.autograd.grad(first[k], params, retain_graph=True)
            ]
        )
        for k in range(first.numel())
    ]
    hessian = torch.stack(rows) + ridge * torch.eye(first.numel(), dtype=DTYPE)
    return grads @ torch.linalg.solve(hessian, g_ref)


def rel_error(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


# ------------------------------------------------------------------ solvers


def test_conjugate_gradient_solves_a_random_spd_system():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(30, 30, generator=g, dtype=DTYPE)
    a = m @ m.T + 0.1 * torch.eye(30, dtype=DTYPE)
    b = torch.randn(30, generator=g, dtype=DTYPE)
    x, info = bl.conjugate_gradient(lambda v: a @ v, b, tol=1e-12, max_iter=300)
    assert info["converged"]
    assert rel_error(x, torch.linalg.solve(a, b)) < 1e-9


def test_conjugate_gradient_refuses_an_indefinite_matrix():
    a = torch.diag(torch.tensor([1.0, -1.0], dtype=DTYPE))
    with pytest.raises(ValueError, match="non-positive curvature .* Raise the damping"):
        bl.conjugate_gradient(lambda v: a @ v, torch.tensor([0.0, 1.0], dtype=DTYPE))


def test_hessian_vector_product_matches_the_explicit_hessian():
    model = make_mlp()
    x, y = make_data(1, N_TRAIN)
    loss = bl.FunctionalLoss(model, ce)
    v = torch.randn(
        loss.num_params, generator=torch.Generator().manual_seed(2), dtype=DTYPE
    )
    theta = loss.theta.clone()

    def objective(t):
        return loss.losses(t, x, y).mean() + 0.5 * WEIGHT_DECAY * t.dot(t)

    hessian = torch.autograd.functional.hessian(objective, theta)
    hv = bl.hessian_vector_product(
        loss, x, y, v, weight_decay=WEIGHT_DECAY, batch_size=9
    )
    assert rel_error(hv, hessian @ v) < 1e-12


def test_influence_cg_matches_an_explicit_inverse_on_the_last_layer():
    model = make_mlp()
    train, ref = make_data(1, N_TRAIN), make_data(2, N_REF)
    scores, info = bl.influence_scores(
        model, ce, train, ref, method="cg", damping=DAMPING, weight_decay=WEIGHT_DECAY
    )
    head = model[2]
    ridge = DAMPING + WEIGHT_DECAY
    features = (model[1](model[0](train[0])).detach(), train[1])
    ref_features = (model[1](model[0](ref[0])).detach(), ref[1])
    expected = explicit_scores(
        head, list(head.parameters()), features, ref_features, ridge
    )
    assert info["converged"] and info["num_params"] == 8 * CLASSES + CLASSES
    assert rel_error(scores.double(), expected) < 1e-6


def test_lissa_converges_to_the_inverse_on_a_convex_problem():
    torch.manual_seed(3)
    model = nn.Linear(D_IN, CLASSES).to(DTYPE)
    train, ref = make_data(4, N_TRAIN), make_data(5, N_REF)
    scores, info = bl.influence_scores(
        model,
        ce,
        train,
        ref,
        method="lissa",
        damping=DAMPING,
        weight_decay=WEIGHT_DECAY,
        depth=4000,
        lissa_batch_size=N_TRAIN,
    )
    expected = explicit_scores(
        model, list(model.parameters()), train, ref, DAMPING + WEIGHT_DECAY
    )
    assert info["last_relative_change"] < 1e-9
    assert rel_error(scores.double(), expected) < 1e-6


def test_lissa_with_too_small_a_scale_says_how_to_fix_it():
    a = torch.diag(torch.tensor([100.0, 1.0], dtype=DTYPE))
    with pytest.raises(ValueError, match="diverged .* raise the scale"):
        bl.lissa(
            lambda v, j: a @ v,
            torch.ones(2, dtype=DTYPE),
            damping=0.0,
            scale=1.0,
            depth=500,
        )


def test_last_layer_needs_a_linear_output():
    model = nn.Sequential(nn.Linear(D_IN, CLASSES), nn.LogSoftmax(dim=1)).to(DTYPE)
    with pytest.raises(ValueError, match="not the output of an nn.Linear.*lissa"):
        bl.last_linear_features(model, make_data(0, 4)[0])


# ------------------------------------------------------------------ TracIn


def checkpoints_of(model, count=3):
    out = []
    for c in range(count):
        net = copy.deepcopy(model)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(
                    0.3
                    * torch.randn(
                        p.shape, generator=torch.Generator().manual_seed(c), dtype=DTYPE
                    )
                )
        out.append(bl.Checkpoint(net.state_dict(), 0.1 / (c + 1)))
    return out


def test_tracin_equals_the_explicit_sum_over_checkpoints():
    model = make_mlp()
    train, ref = make_data(1, N_TRAIN), make_data(2, N_REF)
    checkpoints = checkpoints_of(model)
    expected = torch.zeros(N_TRAIN, dtype=DTYPE)
    for point in checkpoints:
        net = copy.deepcopy(model)
        net.load_state_dict(point.state_dict)
        params = list(net.parameters())
        g_ref = flat_grad(net, params, *ref)
        for i in range(N_TRAIN):
            g_i = flat_grad(net, params, train[0][i : i + 1], train[1][i : i + 1])
            expected[i] += point.learning_rate * g_ref.dot(g_i)
    scores = bl.tracin_scores(model, ce, checkpoints, train, ref, batch_size=16)
    assert rel_error(scores, expected) < 1e-12


def test_tracin_refuses_no_checkpoints_and_bad_rates():
    model, data = make_mlp(), make_data(0, 5)
    with pytest.raises(ValueError, match="at least one checkpoint"):
        bl.tracin_scores(model, ce, [], data, data)
    bad = [bl.Checkpoint(model.state_dict(), math.nan)]
    with pytest.raises(ValueError, match="learning rate nan; expected a finite"):
        bl.tracin_scores(model, ce, bad, data, data)


@needs_captum
def test_tracin_agrees_with_captum():
    model = make_mlp()
    train, ref = make_data(1, N_TRAIN), make_data(2, N_REF)
    checkpoints = checkpoints_of(model)
    ours = bl.tracin_scores(model, ce, checkpoints, train, ref)
    theirs = captum_adapter.tracin_scores_captum(model, ce, checkpoints, train, ref)
    assert rel_error(ours, theirs.double()) < 1e-9


@needs_captum
def test_influence_cg_agrees_with_captum():
    model = make_mlp()
    train, ref = make_data(1, N_TRAIN), make_data(2, N_REF)
    ours, _ = bl.influence_scores(
        model, ce, train, ref, method="cg", damping=DAMPING, weight_decay=WEIGHT_DECAY
    )
    theirs = captum_adapter.influence_scores_captum(
        model, ce, train, ref, damping=DAMPING, weight_decay=WEIGHT_DECAY
    )
    assert rel_error(ours.double(), theirs.double()) < 1e-6


# ------------------------------------------------------------------ signs


@pytest.fixture(scope="module")
def copies():
    """A trained model, a reference point, and its near-copies in the train set.

    Row 0 of the training set is the reference point plus a little noise with
    the right label, row 1 the same with a wrong label.
    """
    x, y = make_data(6, N_TRAIN)
    teacher = torch.randn(
        D_IN, CLASSES, generator=torch.Generator().manual_seed(7), dtype=DTYPE
    )
    y = (x @ teacher).argmax(1)
    ref_x, ref_y = x[:1] + 0.01, y[:1]
    x = torch.cat([ref_x + 0.001, ref_x - 0.001, x[2:]])
    y = torch.cat([ref_y, (ref_y + 1) % CLASSES, y[2:]])
    model = make_mlp(8)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    checkpoints = []
    for step in range(200):
        opt.zero_grad()
        ce(model(x), y).mean().backward()
        opt.step()
        if step % 50 == 49:
            checkpoints.append(bl.Checkpoint(copy.deepcopy(model.state_dict()), 0.5))
    return model, (x, y), (ref_x, ref_y), checkpoints


@pytest.mark.parametrize("method", ["cg", "lissa", "tracin"])
def test_near_copy_helps_and_flipped_copy_hurts(copies, method):
    model, train, ref, checkpoints = copies
    if method == "tracin":
        scores = bl.tracin_scores(model, ce, checkpoints, train, ref)
    else:
        scores, _ = bl.influence_scores(model, ce, train, ref, method=method, depth=300)
    assert scores[0] > 0 > scores[1]
    assert bl.harmful_first(scores)[0] == 1


def test_self_loss_puts_the_highest_loss_first(copies):
    model, train, _, _ = copies
    scores = bl.self_loss_scores(model, ce, *train)
    losses = ce(model(train[0]), train[1]).detach()
    assert int(bl.harmful_first(scores)[0]) == int(losses.argmax())


# ------------------------------------------------------------------ detection


def test_detection_curve_and_auc():
    flipped = torch.tensor([1, 3])
    perfect = torch.tensor([3, 1, 0, 2])
    assert bl.detection_curve(perfect, flipped, [0.0, 0.25, 0.5, 1.0]) == [
        0.0,
        0.5,
        1.0,
        1.0,
    ]
    assert bl.detection_auc(perfect, flipped) == pytest.approx(1 - 2 / (2 * 4))
    worst = torch.tensor([0, 2, 1, 3])
    assert bl.detection_auc(worst, flipped) == pytest.approx(2 / (2 * 4))
    order = bl.harmful_first(bl.random_scores(4000, seed=0))
    many = torch.arange(0, 4000, 2)
    assert bl.detection_auc(order, many) == pytest.approx(0.5, abs=0.02)


def test_detection_errors_say_what_to_do():
    with pytest.raises(ValueError, match="no label is flipped.*noise"):
        bl.detection_curve(torch.arange(3), torch.tensor([], dtype=torch.long), [0.5])
    with pytest.raises(ValueError, match="not all finite.*diverged"):
        bl.harmful_first(torch.tensor([0.0, math.inf]))
    with pytest.raises(ValueError, match="expected parameter names of the model"):
        bl.FunctionalLoss(make_mlp(), ce, names=["nope"])
