"""The pieces of the supplement's Theorem 1: a bound on the approx error.

For SGD the approximate hypergradient drops only the Hessian term of the
exact recurrence (DESIGN section 2). Its error ``e_t = nabla_exact -
nabla_approx`` obeys, with no momentum,

    e_t = (1 - eta_t lambda) e_{t-1} - eta_t H_t nabla_exact_{t-1},  e_0 = 0

so that, when ``||H_s|| <= L`` and ``||nabla_exact_s|| <= M_w`` for every
step ``s < t``, the rates are non-increasing and ``0 < eta_t lambda <= 1``,

    ||e_t|| <= sum_s eta_s L M_w (1 - eta_t lambda)^(t - s)
            <  L M_w eta_1 / (eta_t lambda).

This module gives the two measured quantities, ``L`` (the largest absolute
eigenvalue of a batch Hessian, by power iteration on Hessian-vector
products) and the bound itself; :class:`Theorem1` keeps their running
maxima along a run.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import grad, jvp

from hypergrad._compat import quiet_forward_ad
from hypergrad.functional import FunctionalModel, Params
from hypergrad.step import LossFn, per_sample_losses

ScalarFn = Callable[[Params], Tensor]


def batch_loss(
    fmodel: FunctionalModel,
    loss_fn: LossFn,
    buffers: Params,
    inputs: Tensor,
    targets: Tensor,
) -> ScalarFn:
    """The regulariser-free mean training loss of a batch, as ``f(params)``.

    The network runs in train mode (batch statistics, dropout), as in the
    training step whose Hessian ``H_t`` appears in the recurrence. Weight
    decay is not part of it: the update rule adds it.

    Args:
        fmodel: The functional network.
        loss_fn: ``loss_fn(outputs, targets) -> (B,)`` per-sample losses.
        buffers: All buffers by name (running statistics are not updated).
        inputs: ``(B, ...)`` the batch.
        targets: ``(B, ...)`` its targets.
    """

    def loss(params: Params) -> Tensor:
        outputs, _ = fmodel(params, buffers, inputs, train=True)
        return per_sample_losses(loss_fn, outputs, targets).mean()

    return loss


def hessian_vector_product(loss: ScalarFn, params: Params, vector: Params) -> Params:
    """``H v`` for the Hessian ``H`` of ``loss`` at ``params``.

    Forward over reverse: ``jvp`` of ``grad(loss)`` in the direction ``v``.

    Args:
        loss: A scalar function of a parameter dict.
        params: Where to take the Hessian.
        vector: ``v``, the same names and shapes as ``params``.

    Returns:
        ``H v`` by name.
    """
    quiet_forward_ad()
    _, product = jvp(grad(loss), (params,), (vector,))
    return {n: t.detach() for n, t in product.items()}


def top_hessian_eigenvalue(
    loss: ScalarFn,
    params: Params,
    *,
    iters: int = 20,
    vector: Params | None = None,
    tol: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[float, Params]:
    """The eigenvalue of largest magnitude of the Hessian of ``loss``.

    Power iteration: ``v <- H v / ||H v||``, with the Rayleigh quotient
    ``v . H v`` (``v`` of unit norm) as the estimate. It converges to the
    dominant eigenvalue, signed, at the rate ``(lambda_2 / lambda_1)^2``
    per iteration; its absolute value is the spectral norm ``||H||``.

    Args:
        loss: A scalar function of a parameter dict.
        params: Where to take the Hessian.
        iters: The most Hessian-vector products to spend, >= 1.
        vector: A starting direction (for example the one returned by the
            previous call, to warm-start along a run); random if None.
        tol: Stop early once the estimate changes by at most
            ``tol * |estimate|`` between two iterations; 0 runs all ``iters``.
        generator: Random source of the starting direction.

    Returns:
        ``(eigenvalue, direction)``: the estimate and the last unit vector,
        by name.

    Raises:
        ValueError: If ``iters < 1`` or ``tol < 0``.
    """
    where = "hypergrad.bounds.top_hessian_eigenvalue"
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"{where}: expected an int iters >= 1, got {iters!r}.")
    if not tol >= 0:
        raise ValueError(f"{where}: expected tol >= 0, got {tol!r}.")
    params = {n: p.detach() for n, p in params.items()}
    if vector is None:
        vector = {
            n: torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device)
            for n, p in params.items()
        }
    v = _scale(vector, 1.0 / _norm(vector))

    estimate = 0.0
    for _ in range(iters):
        hv = hessian_vector_product(loss, params, v)
        previous, estimate = estimate, _dot(v, hv)
        size = _norm(hv)
        if size == 0:  # v lies in the null space: the Rayleigh quotient is 0
            return 0.0, v
        v = _scale(hv, 1.0 / size)
        if tol > 0 and abs(estimate - previous) <= tol * abs(estimate):
            break
    return estimate, v


def theorem1_bound(
    hessian_norm: float,
    tangent_norm: float,
    first_lr: float,
    lr: float,
    weight_decay: float,
) -> float:
    """``L M_w eta_1 / (eta_t lambda)``; infinite for ``lambda`` or ``eta_t`` 0.

    Args:
        hessian_norm: ``L``, a bound on the batch Hessians' spectral norm.
        tangent_norm: ``M_w``, a bound on the exact hypergradients' norm.
        first_lr: ``eta_1``, the rate of the first step.
        lr: ``eta_t``, the rate of the current step.
        weight_decay: ``lambda``, PyTorch's SGD ``weight_decay``.

    Raises:
        ValueError: If a value is negative or not a number.
    """
    values = dict(
        hessian_norm=hessian_norm,
        tangent_norm=tangent_norm,
        first_lr=first_lr,
        lr=lr,
        weight_decay=weight_decay,
    )
    for name, value in values.items():
        if not value >= 0:
            raise ValueError(
                f"hypergrad.bounds.theorem1_bound: expected {name} >= 0, got {value!r}."
            )
    if lr == 0 or weight_decay == 0:
        return math.inf
    return hessian_norm * tangent_norm * first_lr / (lr * weight_decay)


class Theorem1:
    """Running estimates of ``L`` and ``M_w`` and the bound along a run.

    ``L`` is the largest ``|eigenvalue|`` seen so far by
    :meth:`observe_hessian` (a few warm-started power iterations on the
    batch Hessian ``H_t`` at ``w_{t-1}``); ``M_w`` is the largest norm of an
    exact hypergradient seen so far by :meth:`observe_tangents`. Both are
    measured lower estimates of the suprema the theorem asks for.

    Args:
        weight_decay: ``lambda``.
        first_lr: ``eta_1``.
        iters: Hessian-vector products per Hessian evaluation.
        seed: Seed of the first power-iteration direction.
    """

    def __init__(self, weight_decay: float, first_lr: float, iters: int, seed=0):
        if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
            raise ValueError(
                f"hypergrad.bounds.Theorem1: expected an int iters >= 1, got {iters!r}."
            )
        self.weight_decay, self.first_lr, self.iters = weight_decay, first_lr, iters
        self.hessian_norm = 0.0
        self.tangent_norm = 0.0
        self.last_eigenvalue: float | None = None
        self._vector: Params | None = None
        self._generator = torch.Generator().manual_seed(seed)

    def observe_hessian(self, loss: ScalarFn, params: Params) -> float:
        """Estimates the top eigenvalue of ``loss``'s Hessian; returns it."""
        value, self._vector = top_hessian_eigenvalue(
            loss,
            params,
            iters=self.iters,
            vector=self._vector,
            generator=self._generator,
        )
        self.last_eigenvalue = value
        self.hessian_norm = max(self.hessian_norm, abs(value))
        return value

    def observe_tangents(self, hypergradients: Params) -> Tensor:
        """Takes exact hypergradients ``(K, *shape)``; returns their norms."""
        norms = row_norms(hypergradients)
        self.tangent_norm = max(self.tangent_norm, float(norms.max()))
        return norms

    def bound(self, lr: float) -> float:
        """The bound at a step with rate ``lr``, from the estimates so far."""
        return theorem1_bound(
            self.hessian_norm, self.tangent_norm, self.first_lr, lr, self.weight_decay
        )


def row_norms(tree: Params) -> Tensor:
    """Row norms ``(K,)`` of a batched tree ``(K, *shape)``, all leaves."""
    squares = [t.reshape(t.shape[0], -1).pow(2).sum(1) for t in tree.values()]
    return torch.stack(squares).sum(0).sqrt()


def _dot(a: Params, b: Params) -> float:
    return float(sum((a[n] * b[n]).sum() for n in a))


def _norm(tree: Params) -> float:
    return math.sqrt(_dot(tree, tree))


def _scale(tree: Params, factor: float) -> Params:
    return {n: t * factor for n, t in tree.items()}
