"""Update rules in ``hypergrad.optim`` against ``torch.optim``, step by step.

Every rule is run for ``STEPS`` steps on a small MLP in float64, with the
gradient taken from the real loss at the current weights, so that a wrong
rule sends the two trajectories apart. The learning rate changes during the
run (a multistep schedule, applied to torch through ``MultiStepLR``), which
separates PyTorch's "rate outside the buffer" momentum from the textbook one.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch.func import grad, jvp

from hypergrad.optim import RuleState, UpdateRule, adam, adamw, sgd
from hypergrad.schedules import multistep

DTYPE = torch.float64
STEPS = 50
MILESTONES = [10, 25, 40]
GAMMA = 0.5
TRAJECTORY_RTOL = 1e-10

# torch 2.14 scripts its forward-mode decompositions on the first jvp and
# warns that torch.jit.script is deprecated; that is torch's, not ours.
jvp_warning = pytest.mark.filterwarnings(
    r"ignore:`torch\.jit\.script` is deprecated:FutureWarning"
)


# -- problem ---------------------------------------------------------------


def make_problem(seed: int = 0):
    """Fixed data and initial weights of a 5-8-2 tanh MLP, plus a dead tensor."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 5, generator=g, dtype=DTYPE)
    y = torch.randn(32, 2, generator=g, dtype=DTYPE)
    params = {
        "fc1.weight": torch.randn(8, 5, generator=g, dtype=DTYPE) / math.sqrt(5),
        "fc1.bias": 0.1 * torch.randn(8, generator=g, dtype=DTYPE),
        "fc2.weight": torch.randn(2, 8, generator=g, dtype=DTYPE) / math.sqrt(8),
        "fc2.bias": 0.1 * torch.randn(2, generator=g, dtype=DTYPE),
        # Enters the loss with weight zero: its gradient is exactly zero.
        "dead": torch.randn(3, generator=g, dtype=DTYPE),
    }
    return x, y, params


def loss_fn(params, x, y):
    hidden = torch.tanh(x @ params["fc1.weight"].T + params["fc1.bias"])
    out = hidden @ params["fc2.weight"].T + params["fc2.bias"]
    return ((out - y) ** 2).mean() + 0.0 * params["dead"].sum()


@pytest.fixture(scope="module")
def problem():
    return make_problem()


# -- runners ---------------------------------------------------------------


def run_torch(make_optimizer, problem, steps: int = STEPS):
    """Trains with a torch.optim optimizer and ``MultiStepLR``; returns weights."""
    x, y, params0 = problem
    params = {k: v.clone().requires_grad_(True) for k, v in params0.items()}
    optimizer = make_optimizer(list(params.values()))
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, MILESTONES, GAMMA)
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn(params, x, y).backward()
        optimizer.step()
        scheduler.step()
    return {k: v.detach() for k, v in params.items()}


def run_rule(rule: UpdateRule, problem, steps: int = STEPS):
    """Trains with a hypergrad rule through ``rule.step``; returns weights, state."""
    x, y, params = problem
    state = rule.init(params)
    grad_fn = grad(loss_fn)
    for _ in range(steps):
        params, state = rule.step(grad_fn(params, x, y), state, params)
    return params, state


def displacement_error(ours, ref, start) -> float:
    """``||w_T^ours - w_T^ref|| / ||w_T^ref - w_0||`` over all tensors."""
    diff = sum(((ours[k] - ref[k]) ** 2).sum() for k in ref)
    moved = sum(((ref[k] - start[k]) ** 2).sum() for k in ref)
    assert moved > 1e-4, "the reference run barely moved; the test is too weak"
    return math.sqrt(diff / moved)


def assert_same_trajectory(rule, make_optimizer, problem):
    ours, state = run_rule(rule, problem)
    ref = run_torch(make_optimizer, problem)

    assert state.count == STEPS
    assert set(ours) == set(ref)
    for name, value in ours.items():
        assert torch.isfinite(value).all(), name
        assert value.dtype == DTYPE, name
    error = displacement_error(ours, ref, problem[2])
    assert error < TRAJECTORY_RTOL, f"relative displacement error {error:.3e}"
    return ours


def lr_schedule(base: float):
    return multistep(base, MILESTONES, GAMMA)


# -- SGD -------------------------------------------------------------------


SGD_GRID = [
    (momentum, dampening, weight_decay, nesterov)
    for momentum in (0.0, 0.9)
    for dampening in (0.0, 0.5)
    for weight_decay in (0.0, 1e-2)
    for nesterov in (False, True)
]


def nesterov_is_valid(momentum, dampening, nesterov) -> bool:
    return not nesterov or (momentum > 0 and dampening == 0)


@pytest.mark.parametrize(
    "momentum, dampening, weight_decay, nesterov",
    [c for c in SGD_GRID if nesterov_is_valid(c[0], c[1], c[3])],
)
def test_sgd_matches_torch(problem, momentum, dampening, weight_decay, nesterov):
    kwargs = dict(
        momentum=momentum,
        dampening=dampening,
        weight_decay=weight_decay,
        nesterov=nesterov,
    )
    rule = sgd(lr_schedule(0.1), **kwargs)

    ours = assert_same_trajectory(
        rule, lambda ps: torch.optim.SGD(ps, lr=0.1, foreach=False, **kwargs), problem
    )

    assert rule.name == "sgd"
    if weight_decay == 0:
        torch.testing.assert_close(ours["dead"], problem[2]["dead"], rtol=0, atol=0)


@pytest.mark.parametrize(
    "momentum, dampening, weight_decay",
    [c[:3] for c in SGD_GRID if not nesterov_is_valid(c[0], c[1], c[3])],
)
def test_sgd_invalid_nesterov_raises(momentum, dampening, weight_decay):
    with pytest.raises(ValueError, match="Nesterov momentum requires"):
        torch.optim.SGD(
            [torch.zeros(1)],
            lr=0.1,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=True,
        )
    message = (
        "hypergrad.optim.sgd: nesterov=True needs momentum > 0 and dampening == 0, "
        f"got momentum={momentum!r}, dampening={dampening!r}. Set a momentum, "
        "or pass nesterov=False."
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        sgd(
            0.1,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=True,
        )


# -- Adam and AdamW ----------------------------------------------------------


ADAM_GRID = [
    (betas, weight_decay)
    for betas in ((0.9, 0.999), (0.5, 0.9))
    for weight_decay in (0.0, 1e-2)
]


@pytest.mark.parametrize("betas, weight_decay", ADAM_GRID)
def test_adam_matches_torch(problem, betas, weight_decay):
    kwargs = dict(betas=betas, eps=1e-8, weight_decay=weight_decay)
    rule = adam(lr_schedule(0.02), **kwargs)

    ours = assert_same_trajectory(
        rule, lambda ps: torch.optim.Adam(ps, lr=0.02, foreach=False, **kwargs), problem
    )

    assert rule.name == "adam"
    if weight_decay == 0:
        # Zero gradient at every step: m = v = 0, the weights do not move.
        torch.testing.assert_close(ours["dead"], problem[2]["dead"], rtol=0, atol=0)


@pytest.mark.parametrize("betas, weight_decay", ADAM_GRID)
def test_adamw_matches_torch(problem, betas, weight_decay):
    kwargs = dict(betas=betas, eps=1e-8, weight_decay=weight_decay)
    rule = adamw(lr_schedule(0.02), **kwargs)

    ours = assert_same_trajectory(
        rule,
        lambda ps: torch.optim.AdamW(ps, lr=0.02, foreach=False, **kwargs),
        problem,
    )

    assert rule.name == "adamw"
    dead0 = problem[2]["dead"]
    if weight_decay == 0:
        torch.testing.assert_close(ours["dead"], dead0, rtol=0, atol=0)
    else:
        # Decoupled decay shrinks the dead tensor by prod_t (1 - eta_t wd).
        rates = [lr_schedule(0.02)(t) for t in range(STEPS)]
        shrink = math.prod(1 - rate * weight_decay for rate in rates)
        torch.testing.assert_close(ours["dead"], dead0 * shrink, rtol=1e-13, atol=0)


def test_adam_zero_gradient_state_stays_zero(problem):
    _, state = run_rule(adam(0.02), problem)

    assert torch.equal(state.slots["exp_avg"]["dead"], torch.zeros(3, dtype=DTYPE))
    assert torch.equal(state.slots["exp_avg_sq"]["dead"], torch.zeros(3, dtype=DTYPE))
    for slot in state.slots.values():
        for value in slot.values():
            assert torch.isfinite(value).all()


def test_adamw_default_weight_decay_matches_torch():
    defaults = torch.optim.AdamW([torch.zeros(1)]).defaults
    rule = adamw()
    x, y, params = make_problem()
    grads = grad(loss_fn)(params, x, y)
    ref = {k: v.clone() for k, v in params.items()}
    optimizer = torch.optim.AdamW(list(ref.values()), foreach=False)
    for name, p in ref.items():
        p.grad = grads[name].clone()
    optimizer.step()

    ours, _ = rule.step(grads, rule.init(params), params)

    assert defaults["weight_decay"] == 1e-2
    for name in params:
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-14, atol=1e-16)


# -- a user-written rule ------------------------------------------------------


def rmsprop(lr, alpha: float = 0.99, eps: float = 1e-8) -> UpdateRule:
    """RMSprop without momentum, written against the public protocol."""

    def init(params):
        zeros = {k: torch.zeros_like(v) for k, v in params.items()}
        return RuleState(count=0, slots={"square_avg": zeros})

    def update(grads, state, params, rate):
        new_params, new_avg = {}, {}
        for name, w in params.items():
            g = grads[name]
            s = alpha * state.slots["square_avg"][name] + (1 - alpha) * g * g
            new_params[name] = w - rate * g / (s.sqrt() + eps)
            new_avg[name] = s
        return new_params, RuleState(state.count + 1, {"square_avg": new_avg})

    return UpdateRule(init, update, lr=lr, name="rmsprop")


def test_user_rmsprop_matches_torch(problem):
    rule = rmsprop(lr_schedule(0.01), alpha=0.9, eps=1e-6)

    assert_same_trajectory(
        rule,
        lambda ps: torch.optim.RMSprop(ps, lr=0.01, alpha=0.9, eps=1e-6, foreach=False),
        problem,
    )

    assert rule.name == "rmsprop"


# -- purity --------------------------------------------------------------------


RULES = {
    "sgd": lambda: sgd(0.1),
    "sgd_momentum": lambda: sgd(0.1, momentum=0.9, weight_decay=1e-2),
    "sgd_dampening": lambda: sgd(0.1, momentum=0.9, dampening=0.5),
    "sgd_nesterov": lambda: sgd(0.1, momentum=0.9, weight_decay=1e-2, nesterov=True),
    "adam": lambda: adam(0.02, weight_decay=1e-2),
    "adamw": lambda: adamw(0.02, weight_decay=1e-2),
}


def clone_tree(tree):
    if isinstance(tree, dict):
        return {k: clone_tree(v) for k, v in tree.items()}
    return tree.clone()


def assert_tree_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict):
            assert_tree_equal(a[k], b[k])
        else:
            assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("name", list(RULES))
def test_rule_does_not_modify_inputs(problem, name):
    x, y, params = problem
    rule = RULES[name]()
    state = rule.init(params)
    params_before = clone_tree(params)

    # Three steps: the first one takes PyTorch's "first step" branches.
    for _ in range(3):
        grads = grad(loss_fn)(params, x, y)
        before = clone_tree({"grads": grads, "params": params, "slots": state.slots})
        count = state.count

        new_params, new_state = rule.step(grads, state, params)

        after = {"grads": grads, "params": params, "slots": state.slots}
        assert_tree_equal(after, before)
        assert state.count == count
        assert new_state.count == count + 1
        params, state = new_params, new_state

    assert_tree_equal(problem[2], params_before)


# -- forward mode ----------------------------------------------------------------


def state_after(rule, problem, steps: int):
    """Params, grads and state after ``steps`` steps, ready for one more."""
    x, y, _ = problem
    params, state = run_rule(rule, problem, steps)
    # grad() returns the dead tensor's zero gradient expanded (stride 0),
    # which jvp refuses as a primal: clone to give it its own memory.
    grads = clone_tree(grad(loss_fn)(params, x, y))
    return params, grads, state


def random_like(tree, generator):
    if isinstance(tree, tuple):
        return tuple(random_like(t, generator) for t in tree)
    if isinstance(tree, dict):
        return {k: random_like(v, generator) for k, v in tree.items()}
    return torch.randn(tree.shape, generator=generator, dtype=tree.dtype)


def as_function(rule, state: RuleState, rate: float):
    """``(params, grads, slots) -> (new_params, new_slots)`` at a fixed count."""

    def f(params, grads, slots):
        new_params, new_state = rule.update(
            grads, RuleState(state.count, slots), params, rate
        )
        return new_params, new_state.slots

    return f


def combine(a, b, scale: float):
    if isinstance(a, dict):
        return {k: combine(a[k], b[k], scale) for k in a}
    return a + scale * b


def flat(tree) -> torch.Tensor:
    if isinstance(tree, (tuple, list)):
        return torch.cat([flat(t) for t in tree])
    if isinstance(tree, dict):
        parts = [flat(tree[k]) for k in sorted(tree)]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=DTYPE)
    return tree.reshape(-1)


@pytest.mark.parametrize("steps", [0, 3])
@pytest.mark.parametrize("name", list(RULES))
@jvp_warning
def test_jvp_through_update(problem, name, steps):
    rule = RULES[name]()
    params, grads, state = state_after(rule, problem, steps)
    primals = (params, grads, state.slots)
    tangents = random_like(primals, torch.Generator().manual_seed(1))

    out, tangent_out = jvp(as_function(rule, state, 0.05), primals, tangents)

    assert torch.isfinite(flat(tangent_out)).all()
    ref_params, ref_state = rule.update(grads, state, params, 0.05)
    torch.testing.assert_close(flat(out), flat((ref_params, ref_state.slots)))


SGD_RULES = [name for name in RULES if name.startswith("sgd")]


@pytest.mark.parametrize("steps", [0, 3])
@pytest.mark.parametrize("name", SGD_RULES)
@jvp_warning
def test_sgd_tangent_matches_finite_difference(problem, name, steps):
    rule = RULES[name]()
    params, grads, state = state_after(rule, problem, steps)
    primals = (params, grads, state.slots)
    tangents = random_like(primals, torch.Generator().manual_seed(2))
    f = as_function(rule, state, 0.05)
    h = 1e-4

    _, tangent_out = jvp(f, primals, tangents)
    plus = f(*(combine(p, t, h) for p, t in zip(primals, tangents, strict=True)))
    minus = f(*(combine(p, t, -h) for p, t in zip(primals, tangents, strict=True)))
    finite_difference = (flat(plus) - flat(minus)) / (2 * h)

    torch.testing.assert_close(
        flat(tangent_out), finite_difference, rtol=1e-9, atol=1e-10
    )


@jvp_warning
def test_adam_tangent_matches_finite_difference(problem):
    rule = adam(0.02, betas=(0.5, 0.9))
    params, grads, state = state_after(rule, problem, 5)
    primals = (params, grads, state.slots)
    tangents = random_like(primals, torch.Generator().manual_seed(3))
    # Relative tangents, so that the small second moments stay positive along
    # the line; the dead tensor sits at v = 0, where sqrt has no derivative.
    leaves = (primals[0], primals[1], *primals[2].values())
    for tree, primal in zip(
        (tangents[0], tangents[1], *tangents[2].values()), leaves, strict=True
    ):
        for key in tree:
            tree[key] = tree[key] * primal[key].abs()
        tree["dead"] = torch.zeros_like(tree["dead"])
    f = as_function(rule, state, 0.02)
    h = 1e-5

    _, tangent_out = jvp(f, primals, tangents)
    plus = f(*(combine(p, t, h) for p, t in zip(primals, tangents, strict=True)))
    minus = f(*(combine(p, t, -h) for p, t in zip(primals, tangents, strict=True)))
    finite_difference = (flat(plus) - flat(minus)) / (2 * h)

    torch.testing.assert_close(
        flat(tangent_out), finite_difference, rtol=1e-6, atol=1e-9
    )


# -- validation --------------------------------------------------------------------


def range_message(where, name, value):
    return (
        f"{where}: expected {name} in [0.0, 1.0), got {value!r}. "
        f"Pass a {name} inside that range."
    )


SGD = "hypergrad.optim.sgd"
ADAM = "hypergrad.optim.adam"
ADAMW = "hypergrad.optim.adamw"
LR_MESSAGE = "expected a finite learning rate >= 0, got {!r}. Pass a non-negative lr."
WD_MESSAGE = (
    "{}: expected weight_decay >= 0, got -0.01. Pass a non-negative weight_decay."
)

BAD_HYPERPARAMETERS = {
    "sgd_negative_lr": (
        lambda: sgd(-0.1),
        f"{SGD}: " + LR_MESSAGE.format(-0.1),
    ),
    "sgd_nan_lr": (lambda: sgd(float("nan")), f"{SGD}: " + LR_MESSAGE.format(math.nan)),
    "sgd_momentum_one": (
        lambda: sgd(0.1, momentum=1.0),
        range_message(SGD, "momentum", 1.0),
    ),
    "sgd_momentum_negative": (
        lambda: sgd(0.1, momentum=-0.1),
        range_message(SGD, "momentum", -0.1),
    ),
    "sgd_dampening_negative": (
        lambda: sgd(0.1, momentum=0.9, dampening=-0.5),
        f"{SGD}: expected dampening in [0.0, ",
    ),
    "sgd_nesterov_without_momentum": (
        lambda: sgd(0.1, nesterov=True),
        f"{SGD}: nesterov=True needs momentum > 0 and dampening == 0, got "
        "momentum=0.0, dampening=0.0.",
    ),
    "sgd_negative_weight_decay": (
        lambda: sgd(0.1, weight_decay=-1e-2),
        WD_MESSAGE.format(SGD),
    ),
    "adam_negative_lr": (lambda: adam(-1e-3), f"{ADAM}: " + LR_MESSAGE.format(-1e-3)),
    "adam_beta1_one": (
        lambda: adam(betas=(1.0, 0.999)),
        range_message(ADAM, "betas[0]", 1.0),
    ),
    "adam_beta1_negative": (
        lambda: adam(betas=(-0.1, 0.999)),
        range_message(ADAM, "betas[0]", -0.1),
    ),
    "adam_beta2_one": (
        lambda: adam(betas=(0.9, 1.0)),
        range_message(ADAM, "betas[1]", 1.0),
    ),
    "adamw_beta2_negative": (
        lambda: adamw(betas=(0.9, -0.5)),
        range_message(ADAMW, "betas[1]", -0.5),
    ),
    "adam_betas_not_a_pair": (
        lambda: adam(betas=(0.9, 0.99, 0.999)),
        f"{ADAM}: expected betas as a pair, got (0.9, 0.99, 0.999).",
    ),
    "adam_eps_zero": (
        lambda: adam(eps=0.0),
        f"{ADAM}: expected eps > 0, got 0.0. Pass e.g. 1e-8.",
    ),
    "adamw_eps_negative": (
        lambda: adamw(eps=-1e-8),
        f"{ADAMW}: expected eps > 0, got -1e-08. Pass e.g. 1e-8.",
    ),
    "adam_negative_weight_decay": (
        lambda: adam(weight_decay=-1e-2),
        WD_MESSAGE.format(ADAM),
    ),
    "adamw_negative_weight_decay": (
        lambda: adamw(weight_decay=-1e-2),
        WD_MESSAGE.format(ADAMW),
    ),
    "rule_negative_lr": (
        lambda: UpdateRule(lambda p: RuleState(0, {}), lambda *a: a, lr=-1.0),
        "UpdateRule: " + LR_MESSAGE.format(-1.0),
    ),
}


@pytest.mark.parametrize("case", list(BAD_HYPERPARAMETERS))
def test_bad_hyperparameters_raise_value_error(case):
    build, message = BAD_HYPERPARAMETERS[case]

    with pytest.raises(ValueError, match=re.escape(message)):
        build()


def test_non_callable_init_raises_type_error():
    message = (
        "UpdateRule: expected callables for init and update, got int and function."
    )

    with pytest.raises(TypeError, match=re.escape(message)):
        UpdateRule(3, lambda *args: args, lr=0.1)


def test_non_callable_update_raises_type_error():
    message = "UpdateRule: expected callables for init and update, got function and "

    with pytest.raises(TypeError, match=re.escape(message) + "NoneType"):
        UpdateRule(lambda params: RuleState(0, {}), None, lr=0.1)


@pytest.mark.parametrize("lr", ["0.1", True, torch.tensor(0.1)])
def test_lr_of_wrong_type_raises_type_error(lr):
    message = (
        f"{SGD}: expected the learning rate as a float or a schedule "
        f"(a callable step -> lr), got {type(lr).__name__}."
    )

    with pytest.raises(TypeError, match=re.escape(message)):
        sgd(lr)
