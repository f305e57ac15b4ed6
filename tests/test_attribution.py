"""Contributions, their blocking over test points, and the rankings built on them."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from helpers_reference import (
    DTYPE,
    ce_loss,
    epoch_batches,
    flat_tree,
    make_cnn,
    make_data,
    one_thread,
    run_tracker,
)

import hypergrad as hg
from hypergrad.attribution import contributions

TRACKED = torch.tensor([10, 3, 7, 22, 5])


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def contrib():
    """``(3, 5)`` with distinct values and a known order per row."""
    return torch.tensor(
        [
            [0.5, -1.0, 2.0, 0.0, -0.25],
            [-3.0, -2.0, -1.0, -4.0, -5.0],
            [1.0, 4.0, 3.0, 5.0, 2.0],
        ],
        dtype=DTYPE,
    )


# -- top_k -----------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 5])
def test_top_k_shapes_and_order(contrib, k):
    ranking = hg.top_k(contrib, TRACKED, k=k)

    assert set(ranking) == {"helpful", "helpful_values", "harmful", "harmful_values"}
    for value in ranking.values():
        assert value.shape == (3, k)
    order = contrib.argsort(dim=1, descending=True)
    assert torch.equal(ranking["helpful"], TRACKED[order[:, :k]])
    assert torch.equal(ranking["harmful"], TRACKED[order.flip(1)[:, :k]])
    assert torch.equal(ranking["helpful_values"], contrib.gather(1, order[:, :k]))
    assert torch.equal(
        ranking["harmful_values"], contrib.gather(1, order.flip(1)[:, :k])
    )
    # largest first, most negative first
    assert bool((ranking["helpful_values"].diff(dim=1) <= 0).all())
    assert bool((ranking["harmful_values"].diff(dim=1) >= 0).all())


def test_top_k_known_rows(contrib):
    ranking = hg.top_k(contrib, TRACKED, k=2)

    assert ranking["helpful"].tolist() == [[7, 10], [7, 3], [22, 3]]
    assert ranking["harmful"].tolist() == [[3, 5], [5, 22], [10, 5]]
    assert ranking["helpful_values"].tolist() == [[2.0, 0.5], [-1.0, -2.0], [5.0, 4.0]]
    assert ranking["harmful_values"].tolist() == [
        [-1.0, -0.25],
        [-5.0, -4.0],
        [1.0, 2.0],
    ]


def test_top_k_default_k_is_five(contrib):
    assert hg.top_k(contrib, TRACKED)["helpful"].shape == (3, 5)


@pytest.mark.parametrize("k", [0, -1, 6])
def test_top_k_bad_k(contrib, k):
    message = f"top_k: expected 1 <= k <= 5, got {k}."
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        hg.top_k(contrib, TRACKED, k=k)


@pytest.mark.parametrize(
    "shape, shown", [((5,), "(5,)"), ((3, 4), "(3, 4)"), ((2, 3, 5), "(2, 3, 5)")]
)
def test_top_k_bad_shape(shape, shown):
    message = f"top_k: expected contributions of shape (n_test, 5), got {shown}."
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        hg.top_k(torch.zeros(shape, dtype=DTYPE), TRACKED, k=1)


# -- total_contribution -----------------------------------------------------------


def test_total_contribution(contrib):
    total = hg.total_contribution(contrib)

    assert total.shape == (5,)
    assert total.tolist() == [-1.5, 1.0, 4.0, 1.0, -3.25]


@pytest.mark.parametrize(
    "rows", [torch.tensor([0, 2]), torch.tensor([True, False, True])]
)
def test_total_contribution_over_some_test_rows(contrib, rows):
    total = hg.total_contribution(contrib, rows)

    assert total.tolist() == [1.5, 3.0, 5.0, 5.0, 1.75]


# -- contributions -----------------------------------------------------------------


@pytest.fixture(scope="module")
def trained():
    """A CNN with BatchNorm after 6 steps; both modes on one trajectory."""
    model = make_cnn(5)
    data = make_data(61, 16, (1, 6, 6))
    batches = epoch_batches(16, 6, 2, seed=62)
    rule = hg.optim.sgd(0.1, momentum=0.9, weight_decay=0.01)
    tracker = run_tracker(model, rule, data, batches, [0, 4, 9, 15], mode="both")
    return model, tracker, make_data(63, 10, (1, 6, 6))


@pytest.mark.parametrize("mode", ["exact", "approx"])
def test_contributions_do_not_depend_on_blocking(trained, mode):
    _, tracker, (x, y) = trained

    full = tracker.contributions(x, y, mode=mode, batch_size=len(x))
    blocks = [tracker.contributions(x, y, mode=mode, batch_size=b) for b in (1, 7)]
    default = tracker.contributions(x, y, mode=mode)

    assert full.shape == (10, 4)
    assert full.dtype == DTYPE
    for other in (*blocks, default):
        torch.testing.assert_close(other, full, rtol=1e-13, atol=1e-15)


def test_contributions_approx_by_hand(trained):
    """``C = -grad l(z, w_T) . nabla`` with the module's own eval-mode loss."""
    model, tracker, (x, y) = trained
    net = tracker.load_into(copy.deepcopy(model)).eval()
    names = list(tracker.params)
    named = dict(net.named_parameters())
    hyper = flat_tree(tracker.hypergradients("approx"), names)

    rows = []
    for j in range(len(x)):
        loss = ce_loss(net(x[j : j + 1]), y[j : j + 1]).sum()
        grads = torch.autograd.grad(loss, [named[n] for n in names])
        rows.append(-(hyper @ torch.cat([g.reshape(-1) for g in grads])))
    expected = torch.stack(rows)

    torch.testing.assert_close(
        tracker.contributions(x, y, mode="approx"), expected, rtol=1e-12, atol=1e-14
    )


def test_contributions_exact_includes_running_statistics(trained):
    """Exact minus the parameter-only part is the BatchNorm statistics' share."""
    _, tracker, (x, y) = trained
    t_params, t_buffers, _ = tracker.tangents("exact")

    assert set(t_buffers) == {"bn.running_mean", "bn.running_var"}
    assert all(bool(v.abs().sum() > 0) for v in t_buffers.values())
    params_only = contributions(
        tracker.fmodel,
        ce_loss,
        tracker.params,
        tracker.buffers,
        t_params,
        {},
        x,
        y,
    )
    with_stats = tracker.contributions(x, y, mode="exact")
    assert float((with_stats - params_only).abs().max()) > 1e-8


@pytest.mark.parametrize("batch_size", [0, -2])
def test_contributions_bad_batch_size(trained, batch_size):
    _, tracker, (x, y) = trained
    message = f"contributions: expected batch_size >= 1, got {batch_size}."
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        tracker.contributions(x, y, mode="exact", batch_size=batch_size)


def test_rankings_from_a_tracker(trained):
    _, tracker, (x, y) = trained
    contrib = tracker.contributions(x, y, mode="exact")

    ranking = hg.top_k(contrib, tracker.tracked, k=2)

    assert ranking["helpful"].shape == (10, 2)
    assert set(ranking["helpful"].flatten().tolist()) <= {0, 4, 9, 15}
    best = contrib.argmax(dim=1)
    assert torch.equal(ranking["helpful"][:, 0], tracker.tracked[best])
    total = hg.total_contribution(contrib)
    torch.testing.assert_close(total, contrib.sum(0), rtol=0, atol=0)
