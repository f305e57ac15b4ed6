"""Results that must not depend on how the Tracker organises its work.

Chunk size, batching with ``vmap`` versus one tracked sample per Tracker,
the order of ``tracked``, the deferred closed form versus the general
approximate path, and batches drawn with replacement.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers_reference import (
    ce_loss,
    epoch_batches,
    finite_differences,
    flat_tree,
    make_cnn,
    make_data,
    make_mlp,
    one_thread,
    rel_error,
    run_tracker,
    trainable_names,
)

import hypergrad as hg

RTOL = 1e-12
ATOL = 1e-14
TRACKED = [2, 9, 0, 14, 5]  # K = 5, not sorted

MODES = [("exact", None), ("approx", True), ("approx", False), ("both", None)]


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    yield from one_thread()


def cnn_setup():
    data = make_data(31, 16, (1, 6, 6))
    test = make_data(32, 4, (1, 6, 6))
    batches = epoch_batches(16, 5, 2, seed=33)  # 5, 5, 5, 1 per epoch
    rule = hg.optim.sgd(
        hg.schedules.multistep(0.1, [3, 5], 0.5), momentum=0.9, weight_decay=0.01
    )
    return make_cnn(3), rule, data, test, batches


def assert_same_results(a: hg.Tracker, b: hg.Tracker, test, columns=None):
    """Tangents and contributions of ``a`` equal ``b``'s (rows ``columns`` of a)."""
    columns = slice(None) if columns is None else columns
    assert a.modes == b.modes
    for m in a.modes:
        for tree_a, tree_b in zip(a.tangents(m)[:2], b.tangents(m)[:2], strict=True):
            assert tree_a.keys() == tree_b.keys()
            for name in tree_a:
                torch.testing.assert_close(
                    tree_a[name][columns], tree_b[name], rtol=RTOL, atol=ATOL
                )
        slots_a, slots_b = a.tangents(m)[2], b.tangents(m)[2]
        assert slots_a.keys() == slots_b.keys()
        for slot in slots_a:
            for name in slots_a[slot]:
                torch.testing.assert_close(
                    slots_a[slot][name][columns],
                    slots_b[slot][name],
                    rtol=RTOL,
                    atol=ATOL,
                )
        torch.testing.assert_close(
            a.contributions(*test, mode=m)[:, columns],
            b.contributions(*test, mode=m),
            rtol=RTOL,
            atol=ATOL,
        )


@pytest.mark.parametrize("mode, deferred", MODES)
def test_chunk_size_does_not_matter(mode, deferred):
    model, rule, data, test, batches = cnn_setup()
    kw = dict(mode=mode, deferred=deferred)

    runs = [
        run_tracker(model, rule, data, batches, TRACKED, chunk_size=c, **kw)
        for c in (1, 3, len(TRACKED))
    ]

    assert_same_results(runs[0], runs[1], test)
    assert_same_results(runs[0], runs[2], test)


@pytest.mark.parametrize("mode, deferred", MODES)
def test_vmap_equals_one_tracker_per_sample(mode, deferred):
    model, rule, data, test, batches = cnn_setup()
    kw = dict(mode=mode, deferred=deferred)

    together = run_tracker(model, rule, data, batches, TRACKED, **kw)

    for row, i in enumerate(TRACKED):
        alone = run_tracker(model, rule, data, batches, [i], **kw)
        assert_same_results(together, alone, test, columns=slice(row, row + 1))


@pytest.mark.parametrize("mode, deferred", MODES)
def test_order_of_tracked_permutes_columns(mode, deferred):
    model, rule, data, test, batches = cnn_setup()
    perm = torch.tensor([3, 0, 4, 2, 1])
    kw = dict(mode=mode, deferred=deferred)

    base = run_tracker(model, rule, data, batches, TRACKED, **kw)
    permuted = run_tracker(
        model, rule, data, batches, torch.tensor(TRACKED)[perm], **kw
    )

    assert torch.equal(permuted.tracked, torch.tensor(TRACKED)[perm])
    assert_same_results(base, permuted, test, columns=perm)


def test_tracked_as_list_tensor_or_numpy():
    model, rule, data, test, batches = cnn_setup()

    runs = [
        run_tracker(model, rule, data, batches, t, mode="exact")
        for t in (TRACKED, torch.tensor(TRACKED), np.array(TRACKED))
    ]

    for other in runs[1:]:
        assert torch.equal(other.tracked, runs[0].tracked)
        assert_same_results(runs[0], other, test)


SGD_CONFIGS = {
    "momentum_wd_dampening": dict(momentum=0.9, weight_decay=0.05, dampening=0.3),
    "nesterov_wd": dict(momentum=0.8, weight_decay=0.02, nesterov=True),
    "plain_wd": dict(weight_decay=0.1),
}
SCHEDULES = {
    "multistep": lambda: hg.schedules.multistep(0.2, [2, 5, 9], 0.5),
    "cosine": lambda: hg.schedules.cosine(0.2, 12, min_lr=0.01),
}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("config", list(SGD_CONFIGS))
def test_deferred_equals_general_approx_path(config, schedule):
    model = make_mlp(5)
    data = make_data(34, 20, (4,))
    batches = epoch_batches(20, 6, 3, seed=35)
    rule = hg.optim.sgd(SCHEDULES[schedule](), **SGD_CONFIGS[config])
    tracked = [0, 3, 7, 11, 19]

    deferred = run_tracker(model, rule, data, batches, tracked, mode="approx")
    general = run_tracker(
        model, rule, data, batches, tracked, mode="approx", deferred=False
    )

    assert deferred._deferred is not None and general._deferred is None
    ours, theirs = deferred.tangents("approx"), general.tangents("approx")
    names = list(ours[0])
    error = rel_error(flat_tree(ours[0], names), flat_tree(theirs[0], names))
    assert error < 1e-12, f"hypergradients: {error:.2e}"
    assert ours[2].keys() == theirs[2].keys()
    for slot in ours[2]:
        error = rel_error(
            flat_tree(ours[2][slot], names), flat_tree(theirs[2][slot], names)
        )
        assert error < 1e-12, f"{slot}: {error:.2e}"


def with_replacement_batches():
    """Sample 3 twice in step 0, sample 7 three times in step 2."""
    return [
        torch.tensor([3, 5, 3, 1]),
        torch.tensor([0, 2, 4, 6, 8]),
        torch.tensor([7, 7, 9, 7]),
        torch.tensor([3, 9, 1]),
        torch.tensor([5, 5, 2, 8]),
    ]


def test_repeated_index_in_one_batch_matches_finite_differences():
    model = make_mlp(6)
    data = make_data(36, 10, (4,))
    test = make_data(37, 4, (4,))
    batches = with_replacement_batches()
    tracked = [3, 7, 5, 0]
    rule = hg.optim.sgd(0.1, momentum=0.9, weight_decay=0.01)
    make_opt = lambda ps: torch.optim.SGD(  # noqa: E731
        ps, lr=0.1, momentum=0.9, weight_decay=0.01
    )

    tracker = run_tracker(model, rule, data, batches, tracked, mode="both")
    deferred = run_tracker(model, rule, data, batches, tracked, mode="approx")

    dw, dloss = finite_differences(model, make_opt, data, batches, tracked, test)
    names = trainable_names(model)
    hyper = flat_tree(tracker.hypergradients("exact"), names)
    assert rel_error(hyper, dw) < 1e-6
    assert rel_error(-tracker.contributions(*test, mode="exact"), dloss) < 1e-6
    approx = flat_tree(tracker.hypergradients("approx"), names)
    assert rel_error(flat_tree(deferred.hypergradients(), names), approx) < 1e-12


def test_repeated_index_plain_sgd_closed_form_counts_occurrences():
    """One step of plain SGD: ``nabla = -lr (N / B) * count * grad l_i(w_0)``."""
    model = make_mlp(7)
    x, y = make_data(38, 10, (4,))
    idx = torch.tensor([7, 7, 9, 7])
    tracker = run_tracker(
        model, hg.optim.sgd(0.5), (x, y), [idx], [7, 9, 1], mode="exact"
    )

    params = {
        k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()
    }
    expected = []
    for i, count in ((7, 3), (9, 1), (1, 0)):
        out = torch.func.functional_call(model, params, (x[i : i + 1],))
        grads = torch.autograd.grad(
            ce_loss(out, y[i : i + 1]).sum(), list(params.values())
        )
        expected.append(
            torch.cat([-0.5 * 10 / 4 * count * g.reshape(-1) for g in grads])
        )
    expected = torch.stack(expected)

    hyper = flat_tree(tracker.hypergradients())
    torch.testing.assert_close(hyper, expected, rtol=1e-12, atol=1e-15)
    assert torch.count_nonzero(hyper[2]) == 0


@pytest.mark.parametrize("mode, deferred", MODES)
def test_results_already_returned_do_not_change_with_later_steps(mode, deferred):
    """``hypergradients()`` is a snapshot: later steps must not rewrite it."""
    model = make_mlp(8)
    data = make_data(39, 12, (4,))
    batches = epoch_batches(12, 4, 2, seed=40)
    rule = hg.optim.sgd(0.1, momentum=0.9)
    tracker = run_tracker(
        model, rule, data, batches[:3], [0, 5, 7], mode=mode, deferred=deferred
    )
    first = {m: tracker.hypergradients(m) for m in tracker.modes}
    copies = {m: {k: v.clone() for k, v in h.items()} for m, h in first.items()}

    for idx in batches[3:]:
        tracker.step(data[0][idx], data[1][idx], idx)
    later = {m: tracker.hypergradients(m) for m in tracker.modes}

    for m in tracker.modes:
        assert not all(torch.equal(later[m][k], copies[m][k]) for k in copies[m])
        for k in copies[m]:
            assert torch.equal(first[m][k], copies[m][k]), (m, k)
