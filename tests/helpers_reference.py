"""Shared pieces of the Tracker tests: tiny models, data, batch orders, references.

Everything here is deterministic: models and data come from explicit seeds,
and the reference trainer is plain ``torch.optim`` on an ``nn.Module``. The
HYDRA perturbation enters the reference as the weight ``1 + N * eps`` on the
loss of the perturbed sample inside the batch mean, once per occurrence, so
that a central difference in ``eps`` estimates ``d w_T / d eps_i``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import hypergrad as hg

DTYPE = torch.float64
FD_STEP = 1e-5


def one_thread():
    """Generator for a fixture: one intra-op thread while the module's tests run.

    The models here are tiny; on a shared machine several threads per
    process only fight over the cores (measured: ten times slower).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# -- losses --------------------------------------------------------------------


def ce_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """Per-sample cross-entropy, ``(B,)``."""
    return F.cross_entropy(outputs, targets, reduction="none")


def bce_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """Per-sample logistic loss of a one-logit model, ``(B,)``."""
    return F.binary_cross_entropy_with_logits(
        outputs.squeeze(-1), targets, reduction="none"
    )


# -- models and data -----------------------------------------------------------


def reinit(module: nn.Module, seed: int, dtype=DTYPE) -> nn.Module:
    """Overwrites every parameter from a seeded generator; casts to ``dtype``."""
    module = module.to(dtype)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 1
            scale = 1.0 / math.sqrt(fan_in) if p.dim() > 1 else 0.1
            if "bn" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen, dtype=dtype))
            else:
                p.copy_(scale * torch.randn(p.shape, generator=gen, dtype=dtype))
    return module


def make_mlp(
    seed: int = 0, d_in: int = 4, hidden: int = 6, d_out: int = 3, dropout=0.0
) -> nn.Module:
    """A ``d_in -> hidden -> d_out`` tanh MLP, with dropout if asked."""
    layers: list[nn.Module] = [nn.Linear(d_in, hidden), nn.Tanh()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(hidden, d_out))
    return reinit(nn.Sequential(*layers), seed)


class SmallCNN(nn.Module):
    """Conv (no bias, it would sit before BatchNorm) -> BN -> tanh -> pool -> fc.

    Input ``(B, 1, 6, 6)``, three classes.
    """

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(3)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(3 * 3 * 3, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.pool(torch.tanh(self.bn(self.conv(x))))
        return self.fc(h.flatten(1))


def make_cnn(seed: int = 0) -> nn.Module:
    return reinit(SmallCNN(), seed)


def make_data(seed: int, n: int, shape: Sequence[int], classes: int = 3):
    """``(x, y)``: standard normal inputs ``(n, *shape)`` and integer labels."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=gen, dtype=DTYPE)
    y = torch.randint(0, classes, (n,), generator=gen)
    return x, y


def epoch_batches(
    n: int, batch_size: int, epochs: int, seed: int = 0, drop_last: bool = False
) -> list[Tensor]:
    """Shuffled mini-batches for ``epochs`` epochs; the last one may be short."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(epochs):
        for idx in torch.randperm(n, generator=gen).split(batch_size):
            if drop_last and len(idx) < batch_size:
                continue
            batches.append(idx)
    return batches


# -- hypergrad side ------------------------------------------------------------


def run_tracker(
    model: nn.Module,
    rule: hg.UpdateRule,
    data,
    batches: Sequence[Tensor],
    tracked,
    *,
    loss_fn=ce_loss,
    num_train: int | None = None,
    seed: int | None = None,
    **kwargs,
) -> hg.Tracker:
    """Builds a Tracker and takes one step per batch."""
    x, y = data
    tracker = hg.Tracker(
        model,
        loss_fn,
        rule,
        num_train=len(x) if num_train is None else num_train,
        tracked=tracked,
        **kwargs,
    )
    if seed is not None:
        torch.manual_seed(seed)
    for idx in batches:
        tracker.step(x[idx], y[idx], idx)
    return tracker


def flat_tree(tree: dict[str, Tensor], names: Sequence[str] | None = None) -> Tensor:
    """``(K, P)``: the leaves ``(K, *shape)`` of ``tree`` side by side."""
    names = list(tree) if names is None else names
    return torch.cat([tree[n].reshape(tree[n].shape[0], -1) for n in names], dim=1)


def rel_error(ours: Tensor, ref: Tensor) -> float:
    """``||ours - ref|| / ||ref||`` over every entry."""
    scale = float(ref.norm())
    assert scale > 0, "the reference is zero; the comparison would be meaningless"
    return float((ours - ref).norm()) / scale


def assert_trees_close(a: dict, b: dict, rtol: float, atol: float = 0.0):
    assert a.keys() == b.keys()
    for name in a:
        if isinstance(a[name], dict):
            assert_trees_close(a[name], b[name], rtol, atol)
        else:
            torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol)


# -- torch.optim reference -------------------------------------------------------


def trainable_names(module: nn.Module) -> list[str]:
    return [n for n, p in module.named_parameters() if p.requires_grad]


def flat_params(module: nn.Module) -> Tensor:
    """``(P,)``: the trainable parameters in ``named_parameters`` order."""
    named = dict(module.named_parameters())
    return torch.cat([named[n].detach().reshape(-1) for n in trainable_names(module)])


def train_reference(
    model: nn.Module,
    make_optimizer: Callable,
    data,
    batches: Sequence[Tensor],
    *,
    loss_fn=ce_loss,
    make_scheduler: Callable | None = None,
    sample: int | None = None,
    sample_weight: float = 0.0,
    seed: int | None = None,
    losses_out: list | None = None,
) -> nn.Module:
    """Trains a copy of ``model`` with ``torch.optim``; returns it in eval mode.

    Every occurrence of ``sample`` in a batch has its loss weighted by
    ``1 + sample_weight`` inside the mean over the real batch size.
    """
    x, y = data
    net = copy.deepcopy(model).train()
    optimizer = make_optimizer([p for p in net.parameters() if p.requires_grad])
    scheduler = make_scheduler(optimizer) if make_scheduler else None
    if seed is not None:
        torch.manual_seed(seed)
    for idx in batches:
        weights = torch.ones(len(idx), dtype=DTYPE)
        if sample is not None:
            weights = weights + sample_weight * (idx == sample).to(DTYPE)
        losses = loss_fn(net(x[idx]), y[idx])
        if losses_out is not None:
            losses_out.append(float(losses.detach().mean()))
        optimizer.zero_grad()
        ((weights * losses).sum() / len(idx)).backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    return net.eval()


def eval_losses(net: nn.Module, x: Tensor, y: Tensor, loss_fn=ce_loss) -> Tensor:
    with torch.no_grad():
        return loss_fn(net.eval()(x), y)


def finite_differences(
    model: nn.Module,
    make_optimizer: Callable,
    data,
    batches: Sequence[Tensor],
    tracked: Sequence[int],
    test,
    *,
    num_train: int | None = None,
    h: float = FD_STEP,
    **kwargs,
) -> tuple[Tensor, Tensor]:
    """Central differences in ``eps_i`` of the final weights and test losses.

    The five-point stencil ``(8 (f(h) - f(-h)) - (f(2h) - f(-2h))) / (12 h)``:
    its error is ``O(h**4)``, so ``h = 1e-5`` leaves the truncation far below
    the tolerances even where Adam's ``m / sqrt(v)`` curves sharply (the
    three-point stencil measured ``3e-7`` there).

    Returns:
        ``(dw, dloss)``: ``(K, P)`` and ``(n_test, K)``.
    """
    n = len(data[0]) if num_train is None else num_train
    loss_fn = kwargs.get("loss_fn", ce_loss)
    stencil = ((1.0, 8.0), (-1.0, -8.0), (2.0, -1.0), (-2.0, 1.0))
    dw, dloss = [], []
    for i in tracked:
        w_sum, loss_sum = 0.0, 0.0
        for shift, coef in stencil:
            net = train_reference(
                model,
                make_optimizer,
                data,
                batches,
                sample=int(i),
                sample_weight=shift * n * h,
                **kwargs,
            )
            w_sum = w_sum + coef * flat_params(net)
            loss_sum = loss_sum + coef * eval_losses(net, *test, loss_fn=loss_fn)
        dw.append(w_sum / (12 * h))
        dloss.append(loss_sum / (12 * h))
    return torch.stack(dw), torch.stack(dloss, dim=1)
