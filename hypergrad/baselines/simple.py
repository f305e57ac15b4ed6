"""Building blocks of the baselines, and the two simplest: self-loss and random.

Every score in :mod:`hypergrad.baselines` has the sign of HYDRA's
contribution ``C(z, i)``: positive when training sample ``i`` helps the
reference set (up-weighting it lowers the reference loss), negative when it
hurts it. The most harmful sample has the most negative score, so
:func:`harmful_first` (an ascending sort) is the order in which to inspect
the training set for wrong labels.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from functools import partial

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp

from hypergrad._compat import quiet_forward_ad
from hypergrad.step import LossFn, per_sample_losses


class FunctionalLoss:
    """Per-sample losses of a network as a pure function of chosen weights.

    The chosen parameters are flattened, in the order of ``names``, into one
    vector ``theta`` of length P; the other parameters and all buffers are
    constants. The network runs in eval mode (BatchNorm running statistics,
    no dropout), as HYDRA's test losses do.

    Args:
        model: The network at the weights of interest; copied, never modified.
        loss_fn: ``loss_fn(outputs, targets) -> (B,)`` per-sample losses.
        names: The parameters that make up ``theta``; default every
            parameter with ``requires_grad``.

    Attributes:
        theta: ``(P,)`` the network's own values of the chosen parameters.
        names: Their names.
    """

    def __init__(
        self, model: nn.Module, loss_fn: LossFn, names: Sequence[str] | None = None
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"FunctionalLoss: expected an nn.Module, got {type(model).__name__}."
            )
        self.module = copy.deepcopy(model).eval()
        self.loss_fn = loss_fn
        named = dict(self.module.named_parameters())
        if names is None:
            names = [n for n, p in named.items() if p.requires_grad]
        unknown = [n for n in names if n not in named]
        if unknown or not names:
            raise ValueError(
                f"FunctionalLoss: expected parameter names of the model, got "
                f"{list(names)!r}; the model has {list(named)!r}. Pass names=None "
                "to use every trainable parameter."
            )
        self.names = list(names)
        self.shapes = [named[n].shape for n in self.names]
        self.theta = torch.cat([named[n].detach().reshape(-1) for n in self.names])
        self.constants = {
            **{n: p.detach() for n, p in named.items() if n not in self.names},
            **{n: b.detach() for n, b in self.module.named_buffers()},
        }

    @property
    def num_params(self) -> int:
        """P, the length of ``theta``."""
        return self.theta.numel()

    def unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        """``theta`` ``(P,)`` as parameter name -> tensor of its shape."""
        sizes = [math.prod(shape) for shape in self.shapes]
        pieces = torch.split(theta, sizes)
        return {
            n: piece.reshape(shape)
            for n, piece, shape in zip(self.names, pieces, self.shapes, strict=True)
        }

    def losses(self, theta: Tensor, inputs: Tensor, targets: Tensor) -> Tensor:
        """``(B,)`` the per-sample losses at weights ``theta``."""
        tensors = {**self.unflatten(theta), **self.constants}
        outputs = functional_call(self.module, tensors, (inputs,), strict=True)
        return per_sample_losses(self.loss_fn, outputs, targets)


def row_blocks(inputs: Tensor, targets: Tensor, batch_size: int):
    """Yields ``(inputs, targets)`` in blocks of ``batch_size`` rows."""
    if batch_size < 1:
        raise ValueError(
            f"hypergrad.baselines: expected batch_size >= 1, got {batch_size}."
        )
    for start in range(0, inputs.shape[0], batch_size):
        yield inputs[start : start + batch_size], targets[start : start + batch_size]


def sample_losses(
    loss: FunctionalLoss,
    inputs: Tensor,
    targets: Tensor,
    *,
    theta: Tensor | None = None,
    batch_size: int = 512,
) -> Tensor:
    """``(n,)`` the loss of every row at ``theta`` (default ``loss.theta``)."""
    theta = loss.theta if theta is None else theta
    with torch.no_grad():
        parts = [
            loss.losses(theta, x, y) for x, y in row_blocks(inputs, targets, batch_size)
        ]
    return torch.cat(parts)


def summed_gradient(
    loss: FunctionalLoss,
    inputs: Tensor,
    targets: Tensor,
    *,
    theta: Tensor | None = None,
    batch_size: int = 512,
) -> Tensor:
    """``(P,)`` the gradient of ``sum_j l_j(theta)`` over every row."""
    theta = loss.theta if theta is None else theta

    def total(t, x, y):
        return loss.losses(t, x, y).sum()

    out = torch.zeros_like(theta)
    for x, y in row_blocks(inputs, targets, batch_size):
        out = out + grad(total)(theta, x, y)
    return out


def directional_derivatives(
    loss: FunctionalLoss,
    inputs: Tensor,
    targets: Tensor,
    direction: Tensor,
    *,
    theta: Tensor | None = None,
    batch_size: int = 512,
) -> Tensor:
    """``(n,)`` ``grad l_j(theta) . direction`` for every row ``j``.

    One forward-mode pass over the rows gives all the dot products at once,
    with no per-sample gradient ever formed.
    """
    theta = loss.theta if theta is None else theta
    if direction.shape != theta.shape:
        raise ValueError(
            f"directional_derivatives: expected a direction of shape "
            f"{tuple(theta.shape)}, got {tuple(direction.shape)}."
        )
    quiet_forward_ad()
    parts = []
    for x, y in row_blocks(inputs, targets, batch_size):
        losses = partial(loss.losses, inputs=x, targets=y)
        _, tangent = jvp(losses, (theta,), (direction,))
        parts.append(tangent.detach())
    return torch.cat(parts)


def self_loss_scores(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    *,
    batch_size: int = 512,
) -> Tensor:
    """``(n,)`` minus each training sample's own loss at the trained weights.

    The highest training loss is the most suspicious label; negated, it
    sorts first under :func:`harmful_first`, like the other scores.
    """
    return -sample_losses(
        FunctionalLoss(model, loss_fn), inputs, targets, batch_size=batch_size
    )


def random_scores(num: int, seed: int) -> Tensor:
    """``(num,)`` uniform random scores from a seeded CPU generator."""
    if num < 1:
        raise ValueError(f"random_scores: expected num >= 1, got {num}.")
    return torch.rand(num, generator=torch.Generator().manual_seed(seed))


def harmful_first(scores: Tensor) -> Tensor:
    """``(n,)`` positions by score, most negative (most harmful) first."""
    if scores.dim() != 1:
        raise ValueError(
            f"harmful_first: expected scores of shape (n,), got {tuple(scores.shape)}."
        )
    if not bool(torch.isfinite(scores).all()):
        raise ValueError(
            "harmful_first: the scores are not all finite; the method that made "
            "them diverged. Check its settings (damping, scale, learning rate)."
        )
    return torch.sort(scores.detach().cpu(), stable=True).indices


def found_counts(order: Tensor, flipped: Tensor) -> Tensor:
    """``(n + 1,)`` flipped samples among the first k inspected, k = 0..n."""
    order = order.cpu()
    is_flipped = torch.zeros(len(order), dtype=torch.bool)
    is_flipped[flipped.cpu()] = True
    hits = is_flipped[order].to(torch.float64).cumsum(0)
    return torch.cat([hits.new_zeros(1), hits])


def detection_curve(order: Tensor, flipped: Tensor, fractions: Sequence[float]):
    """Share of the flipped labels found after inspecting each fraction.

    Args:
        order: ``(n,)`` positions in the order of inspection.
        flipped: ``(m,)`` positions whose labels are wrong, m >= 1.
        fractions: Fractions of the training set inspected, in [0, 1].

    Returns:
        A list of floats, one per fraction.
    """
    if len(flipped) == 0:
        raise ValueError(
            "detection_curve: no label is flipped, so nothing can be found; "
            "use a noise fraction above 0."
        )
    counts = found_counts(order, flipped)
    n = len(order)
    return [float(counts[round(f * n)]) / len(flipped) for f in fractions]


def detection_auc(order: Tensor, flipped: Tensor) -> float:
    """Area under the detection curve over every inspected count (trapezoid).

    Random inspection gives 0.5 in expectation; a perfect ranking gives
    ``1 - m / (2 n)`` for m flipped of n (0.75 at 50% noise).
    """
    if len(flipped) == 0:
        raise ValueError("detection_auc: no label is flipped; use noise above 0.")
    found = found_counts(order, flipped) / len(flipped)
    return float(((found[1:] + found[:-1]) / 2).mean())
