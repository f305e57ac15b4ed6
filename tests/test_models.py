"""Tests for hypergrad.models: parameter counts, modes and torch.func."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, jvp, replace_all_batch_norm_modules_

from hypergrad.models import (
    DenseNet,
    densenet40,
    lenet5,
    make_out_of_place,
    mlp,
    mobilenetv2,
    small_cnn,
)

# torch.func.jvp loads torch's jvp decompositions on first use, which calls the
# deprecated torch.jit.script; the warning is torch's own, not the models'.
ignore_jit_warning = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:FutureWarning"
)

# name -> (builder, input shape for a batch of 2)
MODELS = {
    "lenet5": (lenet5, (2, 1, 28, 28)),
    "densenet40": (densenet40, (2, 3, 32, 32)),
    "densenet40_bc": (
        lambda: densenet40(bottleneck=True, compression=0.5),
        (2, 3, 32, 32),
    ),
    "mobilenetv2": (mobilenetv2, (2, 3, 32, 32)),
    "mlp": (lambda: mlp(64, [16, 12], 10), (2, 1, 8, 8)),
    "small_cnn": (lambda: small_cnn(1, 10, 8), (2, 1, 8, 8)),
}
# Few enough ReLUs that no kink lies within the finite-difference step.
FD_MODELS = ["lenet5", "mlp", "small_cnn"]


def _build(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    builder, shape = MODELS[name]
    torch.manual_seed(seed)
    return builder(), torch.randn(shape)


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.named_parameters()}


def _random_tangents(params, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        k: torch.randn(v.shape, generator=generator, dtype=v.dtype)
        for k, v in params.items()
    }


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("lenet5", 61_706),
        ("mobilenetv2", 2_236_682),
        ("densenet40", 1_019_722),
        ("densenet40_bc", 176_122),
        ("mlp", 64 * 16 + 16 + 16 * 12 + 12 + 12 * 10 + 10),
        ("small_cnn", 1_946),
    ],
)
def test_parameter_count(name, expected):
    model, _ = _build(name)

    assert _num_params(model) == expected


def test_densenet40_batchnorm_share():
    model = densenet40()
    bn = sum(
        p.numel()
        for m in model.modules()
        if isinstance(m, nn.BatchNorm2d)
        for p in m.parameters()
    )

    assert bn == 18_096
    assert _num_params(model) - bn == 1_001_626
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_forward_shapes(name, mode):
    model, x = _build(name)
    getattr(model, mode)()

    with torch.no_grad():
        out = model(x)

    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", list(MODELS))
def test_no_inplace_modules(name):
    model, _ = _build(name)

    flagged = [
        n for n, m in model.named_modules() if getattr(m, "inplace", False) is True
    ]

    assert flagged == []


@pytest.mark.parametrize("name", list(MODELS))
def test_functional_call_uses_given_parameters(name):
    model, x = _build(name)
    model.eval()
    perturbed = {k: v + 0.01 * torch.randn_like(v) for k, v in _params(model).items()}
    buffers = dict(model.named_buffers())
    reference = copy.deepcopy(model)
    reference.load_state_dict({**perturbed, **buffers}, strict=True)

    with torch.no_grad():
        out = functional_call(model, (perturbed, buffers), (x,), strict=True)
        expected = reference(x)
        unchanged = model(x)

    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, unchanged)


@ignore_jit_warning
@pytest.mark.parametrize("name", list(MODELS))
def test_jvp_eval_mode(name):
    model, x = _build(name)
    model.eval()
    params = _params(model)
    tangents = _random_tangents(params)

    out, out_tangent = jvp(
        lambda p: functional_call(model, p, (x,)), (params,), (tangents,)
    )

    assert out.shape == out_tangent.shape == (2, 10)
    assert torch.isfinite(out_tangent).all()
    assert out_tangent.abs().sum() > 0


@ignore_jit_warning
@pytest.mark.parametrize("name", list(MODELS))
def test_jvp_train_mode_without_running_stats(name):
    # Train-mode BatchNorm updates running statistics in place, which jvp
    # refuses for buffers captured from outside; the tracker computes them
    # functionally. With them removed, every remaining train-mode op
    # (activations, dropout, batch statistics) must be jvp-compatible.
    model, x = _build(name)
    replace_all_batch_norm_modules_(model)
    model.train()
    params = _params(model)

    out, out_tangent = jvp(
        lambda p: functional_call(model, p, (x,)),
        (params,),
        (_random_tangents(params),),
    )

    assert out.shape == out_tangent.shape == (2, 10)
    assert torch.isfinite(out_tangent).all()


@ignore_jit_warning
@pytest.mark.parametrize("name", FD_MODELS)
def test_jvp_matches_finite_differences(name):
    model, x = _build(name)
    model = model.double().eval()
    x = x.double()
    params = _params(model)
    tangents = _random_tangents(params)
    step = 1e-6

    def f(p):
        return functional_call(model, p, (x,))

    _, out_tangent = jvp(f, (params,), (tangents,))
    with torch.no_grad():
        plus = f({k: v + step * tangents[k] for k, v in params.items()})
        minus = f({k: v - step * tangents[k] for k, v in params.items()})
    finite_difference = (plus - minus) / (2 * step)

    torch.testing.assert_close(out_tangent, finite_difference, rtol=1e-6, atol=1e-8)


@ignore_jit_warning
@pytest.mark.parametrize("name", [m for m in MODELS if m != "mobilenetv2"])
def test_jvp_matches_reverse_mode(name):
    # MobileNetV2's float64 double backward takes minutes on a CPU; its jvp
    # runs in test_jvp_eval_mode and through the Tracker in
    # test_tracker_runs_exact_and_approx.
    # J t by the double-vjp trick: d/du <u, J^T ...> gives the same product.
    model, x = _build(name)
    model = model.double().eval()
    x = x.double()
    params = _params(model)
    tangents = _random_tangents(params)

    _, out_tangent = jvp(
        lambda p: functional_call(model, p, (x,)), (params,), (tangents,)
    )
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    out = functional_call(model, leaves, (x,))
    probe = torch.zeros_like(out, requires_grad=True)
    grads = torch.autograd.grad(out, list(leaves.values()), probe, create_graph=True)
    (reverse,) = torch.autograd.grad(grads, probe, [tangents[k] for k in leaves])

    torch.testing.assert_close(out_tangent, reverse, rtol=1e-10, atol=1e-12)


def test_make_out_of_place_turns_flags_off():
    model = nn.Sequential(nn.ReLU(inplace=True), nn.Dropout(inplace=True), nn.ReLU6())

    assert make_out_of_place(model) is model
    assert [m.inplace for m in model] == [False, False, False]


def test_invalid_arguments():
    with pytest.raises(ValueError, match=r"expected num_classes to be a positive"):
        lenet5(num_classes=0)
    with pytest.raises(
        ValueError, match=r"expected depth = 4 \+ 3 \* n .* got depth=41"
    ):
        DenseNet(depth=41)
    with pytest.raises(ValueError, match=r"expected depth = 4 \+ 6 \* n"):
        DenseNet(depth=40 - 3, bottleneck=True)
    with pytest.raises(ValueError, match=r"expected compression in \(0, 1\]"):
        densenet40(compression=0.0)
    with pytest.raises(ValueError, match=r"expected image_size of at least 4x4"):
        small_cnn(1, 10, 3)
    with pytest.raises(ValueError, match=r"expected image_size to be an int or"):
        small_cnn(1, 10, (8, 8, 8))
    with pytest.raises(ValueError, match=r"expected hidden_width to be a positive"):
        mlp(64, [16, 0], 10)
    with pytest.raises(ValueError, match=r"expected num_classes to be a positive"):
        mobilenetv2(num_classes=-1)


def test_small_cnn_rectangular_and_lenet_channels():
    model = small_cnn(3, 5, (12, 20))
    rgb_lenet = lenet5(num_classes=7, in_channels=3)

    assert model(torch.randn(2, 3, 12, 20)).shape == (2, 5)
    assert rgb_lenet(torch.randn(2, 3, 28, 28)).shape == (2, 7)


@pytest.mark.cuda
@ignore_jit_warning
def test_jvp_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    model = lenet5().cuda().eval()
    x = torch.randn(2, 1, 28, 28, device="cuda")
    params = _params(model)
    tangents = {k: torch.randn_like(v) for k, v in params.items()}

    _, out_tangent = jvp(
        lambda p: functional_call(model, p, (x,)), (params,), (tangents,)
    )

    assert out_tangent.device.type == "cuda"
    assert out_tangent.shape == (2, 10)


@pytest.mark.parametrize("name", ["lenet5", "densenet40_bc", "mobilenetv2"])
def test_tracker_runs_exact_and_approx(name):
    import torch.nn.functional as F

    import hypergrad as hg
    from hypergrad.models import densenet40, lenet5, mobilenetv2

    build = {
        "lenet5": (lenet5, (1, 28, 28)),
        "densenet40_bc": (
            lambda: densenet40(bottleneck=True, compression=0.5),
            (3, 32, 32),
        ),
        "mobilenetv2": (mobilenetv2, (3, 32, 32)),
    }
    make, shape = build[name]
    torch.manual_seed(0)
    x = torch.randn(2, *shape)
    y = torch.tensor([1, 3])

    def loss(out, target):
        return F.cross_entropy(out, target, reduction="none")

    for mode in ("exact", "approx"):
        rule = hg.optim.sgd(0.01, momentum=0.9)
        tracker = hg.Tracker(make(), loss, rule, num_train=4, tracked=[0], mode=mode)
        tracker.step(x, y, torch.tensor([0, 1]))
        hypergradient = torch.cat(
            [h.flatten() for h in tracker.hypergradients().values()]
        )
        assert torch.isfinite(hypergradient).all()
        assert hypergradient.abs().sum() > 0
