"""Tracker hypergradients against independent references, in float64.

- exact mode against central finite differences of ``torch.optim`` training
  in ``eps_i`` (final weights and eval-mode test losses);
- exact mode against reverse-mode autograd through the unrolled SGD loop;
- approx mode against the paper's Hessian-free recurrence written by hand,
  and against the closed form for plain SGD;
- the first-order leave-one-out prediction ``C / N`` against retraining;
- batch accounting, the sign convention, dropout, frozen and tied
  parameters, float32, ``mode="both"`` and a user-written update rule.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers_reference import (
    DTYPE,
    assert_trees_close,
    bce_loss,
    ce_loss,
    epoch_batches,
    eval_losses,
    finite_differences,
    flat_params,
    flat_tree,
    make_cnn,
    make_data,
    make_mlp,
    one_thread,
    reinit,
    rel_error,
    run_tracker,
    train_reference,
    trainable_names,
)
from torch import nn
from torch.func import functional_call

import hypergrad as hg
from hypergrad.optim import RuleState, UpdateRule

FD_RTOL = 1e-6
REVERSE_RTOL = 1e-9
RECURRENCE_RTOL = 1e-10
MILESTONES, GAMMA = [3, 6], 0.5


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    yield from one_thread()


# -- problems ------------------------------------------------------------------


def mlp_problem():
    """N = 20 in batches of 6 (6, 6, 6, 2): the last batch of each epoch is short."""
    data = make_data(1, 20, (4,))
    test = make_data(2, 5, (4,))
    return make_mlp(0), data, test, epoch_batches(20, 6, 2, seed=3)


def cnn_problem():
    """N = 16 in batches of 6 (6, 6, 4), a conv net with BatchNorm2d and MaxPool2d."""
    data = make_data(4, 16, (1, 6, 6))
    test = make_data(5, 5, (1, 6, 6))
    return make_cnn(0), data, test, epoch_batches(16, 6, 2, seed=6)


PROBLEMS = {"mlp": mlp_problem, "cnn": cnn_problem}

OPTIMIZERS = {
    # (hypergrad rule, torch optimizer factory, torch scheduler factory)
    "sgd_momentum_multistep": (
        lambda: hg.optim.sgd(
            hg.schedules.multistep(0.2, MILESTONES, GAMMA),
            momentum=0.9,
            weight_decay=0.05,
        ),
        lambda ps: torch.optim.SGD(ps, lr=0.2, momentum=0.9, weight_decay=0.05),
        lambda opt: torch.optim.lr_scheduler.MultiStepLR(opt, MILESTONES, GAMMA),
    ),
    "nesterov": (
        lambda: hg.optim.sgd(0.1, momentum=0.9, weight_decay=0.01, nesterov=True),
        lambda ps: torch.optim.SGD(
            ps, lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True
        ),
        None,
    ),
    "sgd_dampening": (
        lambda: hg.optim.sgd(0.1, momentum=0.9, dampening=0.5),
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.5),
        None,
    ),
    "adam": (
        lambda: hg.optim.adam(0.05, weight_decay=0.01),
        lambda ps: torch.optim.Adam(ps, lr=0.05, weight_decay=0.01),
        None,
    ),
    "adamw": (
        lambda: hg.optim.adamw(0.05, weight_decay=0.1),
        lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.1),
        None,
    ),
}

TRACKED = [0, 7, 13]


def check_against_fd(tracker, model, make_opt, data, test, batches, tracked, **kw):
    """Asserts the weights' and test losses' derivatives match the tracker's."""
    dw, dloss = finite_differences(model, make_opt, data, batches, tracked, test, **kw)
    names = trainable_names(model)
    hyper = flat_tree(tracker.hypergradients("exact"), names)
    contrib = tracker.contributions(*test, mode="exact")

    weight_error = rel_error(hyper, dw)
    loss_error = rel_error(-contrib, dloss)
    assert weight_error < FD_RTOL, f"hypergradient vs FD: {weight_error:.2e}"
    assert loss_error < FD_RTOL, f"test-loss derivative vs FD: {loss_error:.2e}"


# -- exact mode against finite differences -------------------------------------


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("problem_name", list(PROBLEMS))
def test_exact_matches_finite_differences(problem_name, opt_name):
    model, data, test, batches = PROBLEMS[problem_name]()
    make_rule, make_opt, make_sched = OPTIMIZERS[opt_name]

    tracker = run_tracker(model, make_rule(), data, batches, TRACKED, mode="exact")

    check_against_fd(
        tracker,
        model,
        make_opt,
        data,
        test,
        batches,
        TRACKED,
        make_scheduler=make_sched,
    )


def test_exact_primal_matches_torch_optim():
    """The trajectory under the hypergradients is torch.optim's, BN stats too."""
    model, data, _, batches = cnn_problem()
    make_rule, make_opt, make_sched = OPTIMIZERS["sgd_momentum_multistep"]
    ref_losses: list[float] = []

    # three chunks per step: the running statistics must still move once
    tracker = hg.Tracker(
        model,
        ce_loss,
        make_rule(),
        num_train=16,
        tracked=TRACKED,
        mode="exact",
        chunk_size=1,
    )
    losses = [tracker.step(data[0][i], data[1][i], i) for i in batches]
    ref = train_reference(
        model,
        make_opt,
        data,
        batches,
        make_scheduler=make_sched,
        losses_out=ref_losses,
    )

    assert losses == pytest.approx(ref_losses, rel=1e-12)
    for name, value in ref.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(
                tracker.state_dict()[name], value, rtol=1e-12, atol=1e-14
            )
        else:
            assert torch.equal(tracker.state_dict()[name], value), name
    assert int(tracker.buffers["bn.num_batches_tracked"]) == len(batches)
    # the Tracker trained a copy: the module it was given is untouched
    fresh = cnn_problem()[0]
    for name, value in fresh.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


# -- exact mode against reverse mode through the unrolled loop -----------------


def unrolled_sgd(model, data, batches, tracked, lr, momentum, weight_decay):
    """``sample_weight (K,) -> w_T (P,)``: PyTorch's SGD written with autograd."""
    x, y = data
    n = len(x)
    names = trainable_names(model)
    start = {
        k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()
    }
    tracked = torch.as_tensor(tracked)

    def final_weights(sample_weight):
        params, buffers = dict(start), {}
        for t, idx in enumerate(batches):
            hits = (tracked[:, None] == idx[None, :]).to(DTYPE)  # (K, B)
            weights = 1 + n * (sample_weight[:, None] * hits).sum(0)
            losses = ce_loss(functional_call(model, params, (x[idx],)), y[idx])
            loss = (weights * losses).sum() / len(idx)
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
            new = {}
            for (name, w), g in zip(params.items(), grads, strict=True):
                d = g + weight_decay * w
                b = d if t == 0 else momentum * buffers[name] + d
                buffers[name] = b
                new[name] = w - lr(t) * b
            params = new
        return torch.cat([params[k].reshape(-1) for k in names])

    return final_weights


def test_exact_matches_reverse_mode_unrolled_loop():
    model, data, _, batches = mlp_problem()
    lr = hg.schedules.multistep(0.2, MILESTONES, GAMMA)
    rule = hg.optim.sgd(lr, momentum=0.9, weight_decay=0.05)
    final_weights = unrolled_sgd(model, data, batches, TRACKED, lr, 0.9, 0.05)

    tracker = run_tracker(model, rule, data, batches, TRACKED, mode="exact")
    jacobian = torch.autograd.functional.jacobian(
        final_weights, torch.zeros(len(TRACKED), dtype=DTYPE)
    )  # (P, K)

    hyper = flat_tree(tracker.hypergradients(), trainable_names(model))
    torch.testing.assert_close(
        final_weights(torch.zeros(len(TRACKED), dtype=DTYPE)).detach(),
        torch.cat([p.reshape(-1) for p in tracker.params.values()]),
        rtol=1e-12,
        atol=1e-14,
    )
    error = rel_error(hyper, jacobian.T)
    assert error < REVERSE_RTOL, f"exact vs reverse mode: {error:.2e}"


# -- approx mode against hand-written recurrences ------------------------------


def sample_grad(model, params, x_row, y_row):
    """``grad l_i(w)`` of one training row, by name."""
    loss = ce_loss(functional_call(model, params, (x_row[None],)), y_row[None]).sum()
    grads = torch.autograd.grad(loss, list(params.values()))
    return dict(zip(params, grads, strict=True))


def batch_grad(model, params, x, y):
    loss = ce_loss(functional_call(model, params, (x,)), y).mean()
    grads = torch.autograd.grad(loss, list(params.values()))
    return dict(zip(params, grads, strict=True))


def hand_recurrence(model, data, batches, tracked, lr, momentum, weight_decay):
    """The paper's Hessian-free recurrence, PyTorch convention.

    ``dv = p dv + lambda nabla + [i in S_t] (N / B_t) grad l_i(w_{t-1})``,
    ``nabla -= lr_t dv``; on the first step the buffer is ``d`` itself.

    Returns:
        ``(nabla, dv)`` by name, each ``(K, *param.shape)``.
    """
    x, y = data
    n = len(x)
    params = {
        k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()
    }
    buffers = {}
    nabla = {
        k: torch.zeros(len(tracked), *v.shape, dtype=DTYPE) for k, v in params.items()
    }
    dv = {k: torch.zeros_like(v) for k, v in nabla.items()}
    for t, idx in enumerate(batches):
        scale = n / len(idx)
        inject = {k: torch.zeros_like(v) for k, v in nabla.items()}
        for row, i in enumerate(tracked):
            for j in (idx == i).nonzero().flatten().tolist():
                g = sample_grad(model, params, x[idx[j]], y[idx[j]])
                for k in inject:
                    inject[k][row] += scale * g[k]
        for k in nabla:
            dv[k] = momentum * dv[k] + weight_decay * nabla[k] + inject[k]
            nabla[k] = nabla[k] - lr(t) * dv[k]
        # the primal step, torch.optim.SGD's update
        grads = batch_grad(model, params, x[idx], y[idx])
        new = {}
        for k, w in params.items():
            d = grads[k] + weight_decay * w.detach()
            b = d if t == 0 else momentum * buffers[k] + d
            buffers[k] = b
            new[k] = (w.detach() - lr(t) * b).requires_grad_(True)
        params = new
    return nabla, dv


@pytest.mark.parametrize("deferred", [True, False])
def test_approx_matches_hand_recurrence(deferred):
    model, data, _, batches = mlp_problem()
    lr = hg.schedules.multistep(0.2, MILESTONES, GAMMA)
    rule = hg.optim.sgd(lr, momentum=0.9, weight_decay=0.05)
    nabla, dv = hand_recurrence(model, data, batches, TRACKED, lr, 0.9, 0.05)

    tracker = run_tracker(
        model, rule, data, batches, TRACKED, mode="approx", deferred=deferred
    )
    t_params, t_buffers, t_slots = tracker.tangents("approx")

    assert (tracker._deferred is not None) == deferred
    assert t_buffers == {}
    names = list(nabla)
    error = rel_error(flat_tree(t_params, names), flat_tree(nabla, names))
    slot_error = rel_error(
        flat_tree(t_slots["momentum_buffer"], names), flat_tree(dv, names)
    )
    assert error < RECURRENCE_RTOL, f"approx vs hand recurrence: {error:.2e}"
    assert slot_error < RECURRENCE_RTOL, f"momentum tangent: {slot_error:.2e}"


@pytest.mark.parametrize("deferred", [True, False])
def test_approx_plain_sgd_closed_form(deferred):
    """``nabla_T = -sum_{t: i in S_t} lr_t (N / B_t) grad l_i(w_{t-1})``."""
    model, data, _, batches = mlp_problem()
    x, y = data
    lr = hg.schedules.multistep(0.3, MILESTONES, GAMMA)
    rule = hg.optim.sgd(lr)

    tracker = run_tracker(
        model, rule, data, batches, TRACKED, mode="approx", deferred=deferred
    )

    params = {
        k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()
    }
    expected = {
        k: torch.zeros(len(TRACKED), *v.shape, dtype=DTYPE) for k, v in params.items()
    }
    for t, idx in enumerate(batches):
        for row, i in enumerate(TRACKED):
            if bool((idx == i).any()):
                g = sample_grad(model, params, x[i], y[i])
                for k in expected:
                    expected[k][row] -= lr(t) * len(x) / len(idx) * g[k]
        grads = batch_grad(model, params, x[idx], y[idx])
        params = {
            k: (w.detach() - lr(t) * grads[k]).requires_grad_(True)
            for k, w in params.items()
        }
    names = list(expected)
    error = rel_error(
        flat_tree(tracker.hypergradients(), names), flat_tree(expected, names)
    )
    assert error < RECURRENCE_RTOL, f"approx vs closed form: {error:.2e}"


# -- batch accounting ----------------------------------------------------------


def test_short_last_batch_uses_its_real_size():
    """Samples of the 2-row and 4-row batches are scaled by N / 2 and N / 4."""
    model, data, test, batches = mlp_problem()
    short = [int(b[0]) for b in batches if len(b) < 6]
    tracked = [*short, int(batches[0][0])]
    make_rule, make_opt, make_sched = OPTIMIZERS["sgd_momentum_multistep"]

    tracker = run_tracker(model, make_rule(), data, batches, tracked, mode="exact")

    assert [len(b) for b in batches] == [6, 6, 6, 2] * 2
    check_against_fd(
        tracker,
        model,
        make_opt,
        data,
        test,
        batches,
        tracked,
        make_scheduler=make_sched,
    )


def never_and_late_batches():
    """Samples 12 and 13 never appear; sample 11 first appears at step 4."""
    first = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 0]])
    second = torch.tensor([[1, 2, 3, 4], [11, 5, 6, 7], [8, 9, 10, 11]])
    return list(first) + list(second)


@pytest.mark.parametrize(
    "mode, deferred",
    [("exact", None), ("approx", True), ("approx", False), ("both", None)],
)
def test_tangent_zero_before_first_batch_and_never_seen(mode, deferred):
    model = make_cnn(1)
    data = make_data(7, 14, (1, 6, 6))
    batches = never_and_late_batches()
    tracked = [12, 11, 0, 13]
    first_step = {12: None, 11: 4, 0: 0, 13: None}
    rule = hg.optim.sgd(0.1, momentum=0.9, weight_decay=0.01)
    tracker = hg.Tracker(
        model,
        ce_loss,
        rule,
        num_train=14,
        tracked=tracked,
        mode=mode,
        deferred=deferred,
    )

    for t, idx in enumerate(batches):
        tracker.step(data[0][idx], data[1][idx], idx)
        for m in tracker.modes:
            t_params, t_buffers, t_slots = tracker.tangents(m)
            leaves = [t_params, t_buffers, *t_slots.values()]
            for row, i in enumerate(tracked):
                nonzero = sum(
                    int(torch.count_nonzero(v[row]))
                    for tr in leaves
                    for v in tr.values()
                )
                seen = first_step[i] is not None and first_step[i] <= t
                assert (nonzero > 0) == seen, (m, t, i, nonzero)

    if "exact" in tracker.modes:
        assert set(tracker.tangents("exact")[1]) == {
            "bn.running_mean",
            "bn.running_var",
        }


# -- leave-one-out -------------------------------------------------------------


def logistic_problem(seed: int, n: int, n_test: int, d: int = 5):
    gen = torch.Generator().manual_seed(seed)
    w_true = torch.randn(d, generator=gen, dtype=DTYPE)

    def draw(m):
        x = torch.randn(m, d, generator=gen, dtype=DTYPE)
        p = torch.sigmoid(1.5 * x @ w_true)
        return x, torch.bernoulli(p, generator=gen)

    model = reinit(nn.Linear(d, 1), seed)
    return model, draw(n), draw(n_test)


def test_leave_one_out_first_order_prediction(capsys):
    """Retraining without sample i changes the test loss by about ``C / N``."""
    n, batch, epochs, lr = 40, 8, 4, 0.1
    model, data, test = logistic_problem(11, n, 30)
    batches = epoch_batches(n, batch, epochs, seed=12)
    tracked = list(range(0, n, 3))
    make_opt = lambda ps: torch.optim.SGD(ps, lr=lr)  # noqa: E731

    tracker = run_tracker(
        model, hg.optim.sgd(lr), data, batches, tracked, mode="exact", loss_fn=bce_loss
    )
    contrib = tracker.contributions(*test)  # (n_test, K)
    full = train_reference(model, make_opt, data, batches, loss_fn=bce_loss)
    base = eval_losses(full, *test, loss_fn=bce_loss)
    actual = torch.stack(
        [
            eval_losses(
                train_reference(
                    model,
                    make_opt,
                    data,
                    batches,
                    loss_fn=bce_loss,
                    sample=i,
                    sample_weight=-1.0,
                ),
                *test,
                loss_fn=bce_loss,
            )
            - base
            for i in tracked
        ],
        dim=1,
    )

    predicted = contrib / n
    pair = torch.stack([predicted.flatten(), actual.flatten()])
    corr = float(torch.corrcoef(pair)[0, 1])
    slope = float((predicted * actual).sum() / (predicted**2).sum())
    with capsys.disabled():
        print(
            f"\nleave-one-out: Pearson r = {corr:.5f}, slope = {slope:.4f} over "
            f"{actual.numel()} pairs (retraining replays the batches; noise 0)"
        )
    assert corr > 0.9
    assert 0.5 < slope < 1.5


def test_sign_convention_near_copy_helps_flipped_copy_hurts():
    n = 40
    model, (x, y), _ = logistic_problem(21, n - 2, 1)
    z = torch.tensor([[0.6, -0.4, 0.3, 0.2, -0.5]], dtype=DTYPE)
    with torch.no_grad():
        y_z = (model(z).squeeze(-1) < 0).to(DTYPE)  # the label the init gets wrong
    gen = torch.Generator().manual_seed(22)
    copies = z + 0.01 * torch.randn(2, 5, generator=gen, dtype=DTYPE)
    x = torch.cat([x, copies])
    y = torch.cat([y, y_z, 1 - y_z])
    copy_idx, flipped_idx = n - 2, n - 1
    batches = epoch_batches(n, 8, 3, seed=23)

    for mode in ("exact", "approx"):
        tracker = run_tracker(
            model,
            hg.optim.sgd(0.1, momentum=0.5),
            (x, y),
            batches,
            torch.arange(n),
            mode=mode,
            loss_fn=bce_loss,
        )
        contrib = tracker.contributions(z, y_z)[0]
        assert contrib[copy_idx] > 0, mode
        assert contrib[flipped_idx] < 0, mode


# -- dropout -------------------------------------------------------------------


def test_dropout_exact_matches_finite_differences_with_replayed_rng():
    model = make_mlp(3, dropout=0.3)
    data = make_data(8, 20, (4,))
    test = make_data(9, 6, (4,))
    batches = epoch_batches(20, 6, 2, seed=10)
    rule = hg.optim.sgd(0.1, momentum=0.9, weight_decay=0.01)
    make_opt = lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01)  # noqa: E731
    ref_losses: list[float] = []
    seed = 1234

    tracker = hg.Tracker(
        model, ce_loss, rule, num_train=20, tracked=TRACKED, mode="exact", chunk_size=2
    )
    torch.manual_seed(seed)
    losses = [tracker.step(data[0][i], data[1][i], i) for i in batches]
    ref = train_reference(
        model, make_opt, data, batches, seed=seed, losses_out=ref_losses
    )

    # the primal trajectories must agree first, or the FD check means nothing
    assert losses == pytest.approx(ref_losses, rel=1e-12)
    torch.testing.assert_close(
        torch.cat([p.reshape(-1) for p in tracker.params.values()]),
        flat_params(ref),
        rtol=1e-12,
        atol=1e-14,
    )
    check_against_fd(tracker, model, make_opt, data, test, batches, TRACKED, seed=seed)


def test_dropout_both_mode_parts_see_the_primal_mask():
    """In mode="both" the exact chunks and the approx pass replay one mask."""
    model = make_mlp(3, dropout=0.3)
    data = make_data(8, 20, (4,))
    batches = epoch_batches(20, 6, 2, seed=10)
    rule = hg.optim.sgd(0.1, momentum=0.9)
    kw = dict(seed=77)

    both = run_tracker(model, rule, data, batches, TRACKED, mode="both", **kw)
    exact = run_tracker(
        model, rule, data, batches, TRACKED, mode="exact", chunk_size=1, **kw
    )
    approx = run_tracker(
        model, rule, data, batches, TRACKED, mode="approx", deferred=False, **kw
    )

    assert_trees_close(both.hypergradients("exact"), exact.hypergradients(), 1e-12)
    assert_trees_close(
        both.hypergradients("approx"), approx.hypergradients(), 1e-10, 1e-13
    )


# -- frozen and tied parameters, float32 ---------------------------------------


class TiedFrozen(nn.Module):
    """``fc2`` reuses ``fc1``'s weight; ``fc1.bias`` and ``out.bias`` are frozen."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 4)
        self.fc2 = nn.Linear(4, 4)
        self.fc2.weight = self.fc1.weight
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def test_frozen_and_tied_parameters():
    model = reinit(TiedFrozen(), 4)
    model.fc1.bias.requires_grad_(False)
    model.out.bias.requires_grad_(False)
    frozen = {
        "fc1.bias": model.fc1.bias.detach().clone(),
        "out.bias": model.out.bias.detach().clone(),
    }
    data = make_data(13, 20, (4,))
    test = make_data(14, 5, (4,))
    batches = epoch_batches(20, 6, 2, seed=15)
    # weight decay would move a frozen tensor that a rule wrongly treated as trainable
    rule = hg.optim.sgd(0.1, momentum=0.9, weight_decay=0.1)
    make_opt = lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1)  # noqa: E731

    tracker = run_tracker(model, rule, data, batches, TRACKED, mode="exact")

    names = ["fc1.weight", "fc2.bias", "out.weight"]
    assert list(tracker.params) == names
    assert list(tracker.hypergradients()) == names
    assert tracker.hypergradients()["fc1.weight"].shape == (3, 4, 4)
    state = tracker.state_dict()
    for name, value in frozen.items():
        assert torch.equal(state[name], value), name
    check_against_fd(tracker, model, make_opt, data, test, batches, TRACKED)


@pytest.mark.parametrize("mode", ["exact", "approx", "both"])
def test_float32_model_gives_float32_tangents(mode):
    model64 = make_cnn(2)
    model32 = make_cnn(2).float()
    x, y = make_data(16, 16, (1, 6, 6))
    batches = epoch_batches(16, 6, 2, seed=17)
    rule = hg.optim.sgd(0.1, momentum=0.9, weight_decay=0.01)

    t32 = run_tracker(model32, rule, (x.float(), y), batches, TRACKED, mode=mode)
    t64 = run_tracker(model64, rule, (x, y), batches, TRACKED, mode=mode)

    for m in t32.modes:
        t_params, t_buffers, t_slots = t32.tangents(m)
        for tree in (t_params, t_buffers, *t_slots.values()):
            for name, value in tree.items():
                assert value.dtype == torch.float32, (m, name)
        contrib = t32.contributions(x[:3].float(), y[:3], mode=m)
        assert contrib.dtype == torch.float32
        names = list(t_params)
        error = rel_error(
            flat_tree(t_params, names).double(), flat_tree(t64.tangents(m)[0], names)
        )
        assert error < 1e-3, (m, error)


# -- mode="both" ---------------------------------------------------------------


def test_both_mode_parts_equal_single_mode_trackers():
    model, data, test, batches = cnn_problem()
    rule = hg.optim.sgd(0.1, momentum=0.9, weight_decay=0.01)

    both = run_tracker(model, rule, data, batches, TRACKED, mode="both")
    exact = run_tracker(model, rule, data, batches, TRACKED, mode="exact")
    approx = run_tracker(model, rule, data, batches, TRACKED, mode="approx")
    general = run_tracker(
        model, rule, data, batches, TRACKED, mode="approx", deferred=False
    )

    assert_trees_close(both.params, exact.params, rtol=1e-13, atol=1e-15)
    assert_trees_close(both.params, approx.params, rtol=1e-12, atol=1e-14)
    for part, single in (("exact", exact), ("approx", approx), ("approx", general)):
        ours, theirs = both.tangents(part), single.tangents(part)
        for a, b in zip(ours, theirs, strict=True):
            assert_trees_close(a, b, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(
            both.contributions(*test, mode=part),
            single.contributions(*test),
            rtol=1e-10,
            atol=1e-12,
        )


def test_approximation_error_values():
    model, data, _, batches = mlp_problem()
    rule = hg.optim.sgd(0.2, momentum=0.9, weight_decay=0.01)
    tracker = run_tracker(model, rule, data, batches, TRACKED, mode="both")

    report = hg.approximation_error(tracker)

    assert set(report) == {"abs_error", "rel_error", "cosine"}
    assert all(math.isfinite(v) for v in report.values())
    assert -1.0 <= report["cosine"] <= 1.0
    exact = flat_tree(tracker.hypergradients("exact"))
    approx = flat_tree(tracker.hypergradients("approx"))
    err = (exact - approx).norm(dim=1)
    cos = (exact * approx).sum(1) / (exact.norm(dim=1) * approx.norm(dim=1))
    assert report["abs_error"] == pytest.approx(float(err.mean()), rel=1e-12)
    assert report["rel_error"] == pytest.approx(
        float((err / exact.norm(dim=1)).mean()), rel=1e-12
    )
    assert report["cosine"] == pytest.approx(float(cos.mean()), rel=1e-12)
    assert report["abs_error"] > 0


def test_approximation_error_after_one_step():
    """Before the Hessian term acts, exact and approx agree: cosine at most 1."""
    model, data, _, batches = mlp_problem()
    tracked = [int(batches[0][0]), int(batches[0][1]), int(batches[1][0])]
    tracker = run_tracker(
        model, hg.optim.sgd(0.1, momentum=0.9), data, batches[:1], tracked, mode="both"
    )

    report = hg.approximation_error(tracker)

    assert report["abs_error"] < 1e-14
    assert report["rel_error"] < 1e-14
    assert -1.0 <= report["cosine"] <= 1.0
    assert report["cosine"] == pytest.approx(1.0, abs=1e-14)


# -- a user-written update rule ------------------------------------------------


def rmsprop(lr, alpha: float = 0.99, eps: float = 1e-8, weight_decay: float = 0.0):
    """RMSprop as torch.optim.RMSprop (no momentum, not centered)."""

    def init(params):
        zeros = {k: torch.zeros_like(v) for k, v in params.items()}
        return RuleState(count=0, slots={"square_avg": zeros})

    def update(grads, state, params, rate):
        new_params, new_avg = {}, {}
        for name, w in params.items():
            g = grads[name] + weight_decay * w
            s = alpha * state.slots["square_avg"][name] + (1 - alpha) * g * g
            new_params[name] = w - rate * g / (s.sqrt() + eps)
            new_avg[name] = s
        return new_params, RuleState(state.count + 1, {"square_avg": new_avg})

    return UpdateRule(init, update, lr=lr, name="rmsprop")


def test_user_rmsprop_rule_matches_finite_differences():
    model, data, test, batches = mlp_problem()
    rule = rmsprop(0.01, alpha=0.9, eps=1e-6, weight_decay=0.01)
    make_opt = lambda ps: torch.optim.RMSprop(  # noqa: E731
        ps, lr=0.01, alpha=0.9, eps=1e-6, weight_decay=0.01
    )

    tracker = run_tracker(model, rule, data, batches, TRACKED, mode="exact")

    assert tracker._deferred is None
    assert set(tracker.tangents()[2]) == {"square_avg"}
    check_against_fd(tracker, model, make_opt, data, test, batches, TRACKED)
