"""Wrong calls raise ValueError or TypeError with a message that says how to fix it.

Every message is matched in full or in its telling part, so that a missing
space between two joined string pieces, or a wrong offending value, fails.
"""

from __future__ import annotations

import re

import pytest
import torch
from helpers_reference import (
    ce_loss,
    make_cnn,
    make_data,
    make_mlp,
    one_thread,
    run_tracker,
)
from torch import nn

import hypergrad as hg

N = 10
TRACKED = [1, 4, 8]


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    yield from one_thread()


def tracker(mode="exact", rule=None, **kwargs):
    rule = hg.optim.sgd(0.1, momentum=0.9) if rule is None else rule
    kwargs.setdefault("tracked", TRACKED)
    return hg.Tracker(make_mlp(0), ce_loss, rule, num_train=N, mode=mode, **kwargs)


@pytest.fixture(scope="module")
def data():
    return make_data(51, N, (4,))


def exact(message: str) -> str:
    return "^" + re.escape(message) + "$"


# -- the tracked indices -------------------------------------------------------


@pytest.mark.parametrize("bad, shown", [([1, 10], "[10]"), ([-1, 3], "[-1]")])
def test_tracked_out_of_range(bad, shown):
    message = (
        f"Tracker: expected tracked indices in [0, {N}) (num_train={N}), got "
        f"{shown}. Pass dataset indices, not labels or positions in a subset."
    )
    with pytest.raises(ValueError, match=exact(message)):
        tracker(tracked=bad)


def test_tracked_repeated():
    message = (
        "Tracker: expected distinct tracked indices, got repeats of [4]. Pass each "
        "index once (torch.unique(tracked))."
    )
    with pytest.raises(ValueError, match=exact(message)):
        tracker(tracked=torch.tensor([4, 1, 4]))


@pytest.mark.parametrize(
    "empty", [torch.empty(0, dtype=torch.long), []], ids=["long_tensor", "list"]
)
def test_tracked_empty(empty):
    """An empty list is empty, not a float tensor: same message as for a tensor."""
    message = (
        "Tracker: expected at least one tracked index, got none. Pass e.g. "
        "tracked=torch.arange(10)."
    )
    with pytest.raises(ValueError, match=exact(message)):
        tracker(tracked=empty)


@pytest.mark.parametrize(
    "bad, dtype",
    [
        (torch.tensor([1.0, 2.0]), "torch.float32"),
        ([1.5, 2.0], "torch.float32"),
        (torch.tensor([True, False]), "torch.bool"),
    ],
)
def test_tracked_not_integers(bad, dtype):
    message = (
        f"Tracker: expected tracked indices as integers, got dtype {dtype}. Pass a "
        "LongTensor or a list of ints."
    )
    with pytest.raises(TypeError, match=exact(message)):
        tracker(tracked=bad)


def test_tracked_not_one_dimensional():
    with pytest.raises(ValueError, match=r"as a 1-D tensor, got shape \(2, 2\)\.$"):
        tracker(tracked=torch.tensor([[0, 1], [2, 3]]))


# -- construction --------------------------------------------------------------


@pytest.mark.parametrize("mode", ["exakt", "Exact", None])
def test_unknown_mode(mode):
    message = (
        f"Tracker: expected mode to be one of 'exact', 'approx', 'both', got {mode!r}."
    )
    with pytest.raises(ValueError, match=exact(message)):
        tracker(mode=mode)


@pytest.mark.parametrize("rule", [torch.optim.SGD, "sgd", None])
def test_rule_not_an_update_rule(rule):
    name = type(rule).__name__
    message = (
        "Tracker: expected rule to be an UpdateRule (hypergrad.optim.sgd(...) or "
        f"UpdateRule(init, update, lr)), got {name}."
    )
    with pytest.raises(TypeError, match=exact(message)):
        hg.Tracker(make_mlp(0), ce_loss, rule, num_train=N, tracked=TRACKED)


def test_torch_optimizer_instance_is_not_a_rule():
    model = make_mlp(0)
    with pytest.raises(TypeError, match=r"got SGD\.$"):
        hg.Tracker(
            model,
            ce_loss,
            torch.optim.SGD(model.parameters(), lr=0.1),
            num_train=N,
            tracked=TRACKED,
        )


@pytest.mark.parametrize("chunk_size", [0, -3, True, 2.0])
def test_chunk_size_invalid(chunk_size):
    message = f"Tracker: expected chunk_size >= 1, got {chunk_size!r}."
    with pytest.raises(ValueError, match=exact(message)):
        tracker(chunk_size=chunk_size)


@pytest.mark.parametrize("num_train", [0, -1, True, 10.0])
def test_num_train_invalid(num_train):
    with pytest.raises(
        ValueError, match=exact(f"Tracker: expected num_train >= 1, got {num_train!r}.")
    ):
        hg.Tracker(
            make_mlp(0), ce_loss, hg.optim.sgd(0.1), num_train=num_train, tracked=[0]
        )


def test_loss_fn_not_callable():
    with pytest.raises(TypeError, match=r"^Tracker: expected a callable loss_fn, got"):
        hg.Tracker(make_mlp(0), "ce", hg.optim.sgd(0.1), num_train=N, tracked=[0])


def test_model_without_trainable_parameters():
    model = make_mlp(0).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter with requires_grad=True; there"):
        hg.Tracker(model, ce_loss, hg.optim.sgd(0.1), num_train=N, tracked=[0])


def test_model_not_a_module():
    with pytest.raises(
        TypeError, match=exact("hypergrad: expected an nn.Module, got function.")
    ):
        hg.Tracker(lambda x: x, ce_loss, hg.optim.sgd(0.1), num_train=N, tracked=[0])


def test_deferred_needs_scalar_linear_rule_and_approx_mode():
    message = (
        "Tracker: deferred=True needs a scalar_linear rule, got 'adam', whose tangent "
        "map has per-coordinate coefficients. Pass deferred=None."
    )
    with pytest.raises(ValueError, match=exact(message)):
        tracker(mode="approx", rule=hg.optim.adam(0.01), deferred=True)
    message = (
        "Tracker: deferred=True applies to mode='approx' only, got mode='exact'. "
        "Pass deferred=None."
    )
    with pytest.raises(ValueError, match=exact(message)):
        tracker(mode="exact", deferred=True)


# -- hyperparameters -----------------------------------------------------------


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda: hg.optim.sgd(-0.1),
            "hypergrad.optim.sgd: expected a finite learning rate >= 0, got -0.1. "
            "Pass a non-negative lr.",
        ),
        (
            lambda: hg.optim.sgd(float("nan")),
            "hypergrad.optim.sgd: expected a finite learning rate >= 0, got nan. "
            "Pass a non-negative lr.",
        ),
        (
            lambda: hg.optim.adam(-1e-3),
            "hypergrad.optim.adam: expected a finite learning rate >= 0, got -0.001. "
            "Pass a non-negative lr.",
        ),
        (
            lambda: hg.optim.sgd(0.1, momentum=1.0),
            "hypergrad.optim.sgd: expected momentum in [0.0, 1.0), got 1.0. Pass a "
            "momentum inside that range.",
        ),
        (
            lambda: hg.optim.sgd(0.1, momentum=-0.5),
            "hypergrad.optim.sgd: expected momentum in [0.0, 1.0), got -0.5. Pass a "
            "momentum inside that range.",
        ),
        (
            lambda: hg.optim.sgd(0.1, nesterov=True),
            "hypergrad.optim.sgd: nesterov=True needs momentum > 0 and dampening == "
            "0, got momentum=0.0, dampening=0.0. Set a momentum, or pass "
            "nesterov=False.",
        ),
        (
            lambda: hg.optim.sgd(0.1, weight_decay=-1e-4),
            "hypergrad.optim.sgd: expected weight_decay >= 0, got -0.0001. Pass a "
            "non-negative weight_decay.",
        ),
        (
            lambda: hg.optim.adam(betas=(1.0, 0.999)),
            "hypergrad.optim.adam: expected betas[0] in [0.0, 1.0), got 1.0. Pass a "
            "betas[0] inside that range.",
        ),
        (
            lambda: hg.optim.adamw(betas=(0.9, -0.1)),
            "hypergrad.optim.adamw: expected betas[1] in [0.0, 1.0), got -0.1. Pass a "
            "betas[1] inside that range.",
        ),
        (
            lambda: hg.optim.adam(betas=(0.9, 0.99, 0.9)),
            "hypergrad.optim.adam: expected betas as a pair, got (0.9, 0.99, 0.9).",
        ),
        (
            lambda: hg.optim.adam(eps=0.0),
            "hypergrad.optim.adam: expected eps > 0, got 0.0. Pass e.g. 1e-8.",
        ),
    ],
)
def test_bad_hyperparameters(make, message):
    with pytest.raises(ValueError, match=exact(message)):
        make()


def test_learning_rate_of_wrong_type():
    message = (
        "hypergrad.optim.sgd: expected the learning rate as a float or a schedule "
        "(a callable step -> lr), got str."
    )
    with pytest.raises(TypeError, match=exact(message)):
        hg.optim.sgd("0.1")


def test_schedule_giving_negative_rate(data):
    x, y = data
    t = tracker(rule=hg.optim.sgd(lambda step: 0.1 - 0.1 * step))
    idx = torch.arange(4)
    t.step(x[idx], y[idx], idx)
    t.step(x[idx], y[idx], idx)
    message = "Tracker.step (step 2): the schedule gave lr=-0.1; expected >= 0."
    with pytest.raises(ValueError, match=exact(message)):
        t.step(x[idx], y[idx], idx)
    assert t.step_count == 2


# -- the step ------------------------------------------------------------------


MODES = [("exact", None), ("approx", True), ("approx", False), ("both", None)]


@pytest.mark.parametrize("mode, deferred", MODES)
def test_loss_fn_returning_a_scalar(data, mode, deferred):
    x, y = data
    t = hg.Tracker(
        make_mlp(0),
        lambda out, target: nn.functional.cross_entropy(out, target),
        hg.optim.sgd(0.1),
        num_train=N,
        tracked=TRACKED,
        mode=mode,
        deferred=deferred,
    )
    message = (
        "hypergrad: loss_fn must return one loss per sample, shape (4,), got (). "
        "Use reduction='none', e.g. "
        "lambda out, y: F.cross_entropy(out, y, reduction='none')."
    )
    idx = torch.arange(4)
    with pytest.raises(ValueError, match=exact(message)):
        t.step(x[idx], y[idx], idx)
    assert t.step_count == 0


def test_batch_indices_of_wrong_length(data):
    x, y = data
    message = (
        "Tracker.step (step 0): expected 4 batch indices and 4 targets for 4 input "
        "rows, got 3 indices and targets of shape (4,). Yield (input, target, "
        "index) from the dataset, e.g. with hypergrad.data.IndexedDataset."
    )
    with pytest.raises(ValueError, match=exact(message)):
        tracker().step(x[:4], y[:4], torch.arange(3))


def test_targets_of_wrong_length(data):
    x, y = data
    with pytest.raises(ValueError, match=r"got 4 indices and targets of shape \(3,\)"):
        tracker().step(x[:4], y[:3], torch.arange(4))


@pytest.mark.parametrize(
    "bad, shown", [([0, 1, 2, 10], "[10]"), ([0, -2, 1, 3], "[-2]")]
)
def test_batch_indices_out_of_range(data, bad, shown):
    x, y = data
    message = (
        f"Tracker.step (step 0): expected batch indices in [0, {N}) (num_train={N}), "
        f"got {shown}. Pass dataset indices, not labels or positions in a subset."
    )
    with pytest.raises(ValueError, match=exact(message)):
        tracker().step(x[:4], y[:4], torch.tensor(bad))


def test_batch_indices_as_floats(data):
    x, y = data
    with pytest.raises(TypeError, match="expected batch indices as integers"):
        tracker().step(x[:4], y[:4], torch.arange(4.0))


def test_inputs_not_a_tensor(data):
    _, y = data
    with pytest.raises(TypeError, match="expected inputs and targets as tensors"):
        tracker().step([[0.0] * 4] * 4, y[:4], torch.arange(4))


def snapshot(t: hg.Tracker):
    """Deep copies of everything a failed step must leave alone."""
    out = {
        "params": {k: v.clone() for k, v in t.params.items()},
        "buffers": {k: v.clone() for k, v in t.buffers.items()},
        "count": (t.step_count, t.state.count),
    }
    for m in t.modes:
        for part, tree in zip(("params", "buffers"), t.tangents(m)[:2], strict=True):
            out[f"{m}/{part}"] = {k: v.clone() for k, v in tree.items()}
        for slot, tree in t.tangents(m)[2].items():
            out[f"{m}/{slot}"] = {k: v.clone() for k, v in tree.items()}
    return out


def assert_snapshot_equal(a, b, rtol=0.0):
    """Bitwise by default; ``rtol`` allows for the deferred closed form, whose
    rounding depends on when its products were last brought up to date."""
    assert a.keys() == b.keys()
    for key in a:
        if key == "count":
            assert a[key] == b[key]
            continue
        assert a[key].keys() == b[key].keys(), key
        for name in a[key]:
            torch.testing.assert_close(
                a[key][name], b[key][name], rtol=rtol, atol=rtol * 1e-3
            )


@pytest.mark.parametrize("mode, deferred", MODES)
def test_non_finite_loss_names_the_step_and_keeps_the_state(mode, deferred):
    x, y = make_data(52, 12, (1, 6, 6))
    batches = [torch.arange(4 * (s % 3), 4 * (s % 3) + 4) for s in range(5)]
    rule = hg.optim.sgd(0.1, momentum=0.9, weight_decay=0.01)
    kw = dict(num_train=12, tracked=[0, 5, 9], mode=mode, deferred=deferred)
    t = hg.Tracker(make_cnn(0), ce_loss, rule, **kw)
    for idx in batches[:3]:
        t.step(x[idx], y[idx], idx)
    before = snapshot(t)
    bad = x[batches[3]].clone()
    bad[1, 0, 2, 2] = float("nan")

    message = (
        "Tracker.step (step 3): the loss is not finite. The Tracker keeps the state "
        "of the last good step; lower the learning rate or check the inputs of this "
        "batch."
    )
    with pytest.raises(ValueError, match=exact(message)):
        t.step(bad, y[batches[3]], batches[3])

    assert_snapshot_equal(snapshot(t), before)
    # and it goes on as if the bad batch had never been offered
    t.step(x[batches[3]], y[batches[3]], batches[3])
    clean = run_tracker(make_cnn(0), rule, (x, y), batches[:4], **kw)
    assert_snapshot_equal(snapshot(t), snapshot(clean), rtol=1e-12)


@pytest.mark.parametrize("mode, deferred", MODES)
def test_non_finite_update_with_a_finite_loss_is_refused(data, mode, deferred):
    """An infinite input saturates tanh: the loss stays finite, but the gradient
    of the first layer (0 * inf) and so the weights after the step do not."""
    x, y = data
    t = tracker(mode=mode, deferred=deferred)  # rows 0-3 hold no tracked sample
    start = {k: v.clone() for k, v in t.params.items()}
    bad = x[:4].clone()
    bad[0, 0] = float("inf")

    pattern = (
        r"^Tracker\.step \(step 0\): the .+ is not finite\. The Tracker keeps the "
        r"state of the last good step; lower the learning rate or check the inputs "
        r"of this batch\.$"
    )
    with pytest.raises(ValueError, match=pattern):
        t.step(bad, y[:4], torch.arange(4))

    assert t.step_count == 0
    for name, value in start.items():
        assert torch.equal(t.params[name], value), name


# -- asking for results --------------------------------------------------------


@pytest.mark.parametrize("mode, other", [("exact", "approx"), ("approx", "exact")])
def test_single_mode_tracker_asked_for_the_other_mode(data, mode, other):
    x, y = data
    t = tracker(mode=mode)
    t.step(x[:4], y[:4], torch.arange(4))

    for call, where in (
        (lambda: t.hypergradients(other), "Tracker.tangents"),
        (lambda: t.tangents(other), "Tracker.tangents"),
        (lambda: t.contributions(x[4:6], y[4:6], mode=other), "Tracker.contributions"),
    ):
        message = (
            f"{where}: this Tracker was built with mode={mode!r}, so it has no "
            f"{other!r} hypergradients. Build it with mode='both' to get both."
        )
        with pytest.raises(ValueError, match=exact(message)):
            call()
    assert set(t.hypergradients(mode)) == set(t.params)


def test_both_tracker_needs_a_mode(data):
    x, y = data
    t = tracker(mode="both")
    t.step(x[:4], y[:4], torch.arange(4))

    for call, where in (
        (t.hypergradients, "Tracker.tangents"),
        (t.tangents, "Tracker.tangents"),
        (lambda: t.contributions(x[4:6], y[4:6]), "Tracker.contributions"),
    ):
        message = (
            f"{where}: this Tracker runs mode='both'; pass mode='exact' or "
            "mode='approx' to say which hypergradients to use."
        )
        with pytest.raises(ValueError, match=exact(message)):
            call()


def test_results_asked_with_an_unknown_mode(data):
    x, y = data
    t = tracker(mode="both")
    t.step(x[:4], y[:4], torch.arange(4))
    message = (
        "Tracker.tangents: expected mode to be one of 'exact', 'approx', got 'both'."
    )
    with pytest.raises(ValueError, match=exact(message)):
        t.hypergradients("both")


@pytest.mark.parametrize("mode", ["exact", "approx"])
def test_approximation_error_needs_both(mode):
    message = (
        "approximation_error: expected a Tracker built with mode='both', got "
        f"mode={mode!r}. Build it with mode='both' to measure the error."
    )
    with pytest.raises(ValueError, match=exact(message)):
        hg.approximation_error(tracker(mode=mode))
