"""Influence functions (Koh & Liang, ICML 2017) with Hessian-free solves.

Koh & Liang's influence of up-weighting training sample ``i`` on the loss of
a point ``z`` is ``I_up,loss(z, i) = -grad l(z)^T H^{-1} grad l(z_i)``, the
derivative ``d l(z) / d eps_i`` of the objective
``(1 / N) sum_j l_j(theta) + eps_i l_i(theta)`` at a minimum. Its positive
values hurt ``z``. The scores here have HYDRA's sign instead (positive
helps), summed over a reference set:

    score_i = -sum_z I_up,loss(z, i) = g_ref^T (H + damping I)^{-1} grad l_i

with ``g_ref = sum_z grad l(z)`` and ``H`` the Hessian, at the trained
weights, of the training objective
``(1 / N) sum_j l_j(theta) + (weight_decay / 2) ||theta||^2``. So a score is
on the scale of HYDRA's total contribution: the same derivative, taken at a
stationary point instead of along the trajectory.

One solve ``s = (H + damping I)^{-1} g_ref`` (conjugate gradients or
LiSSA, Hessian-vector products by forward-over-reverse ``torch.func``),
then one forward-mode pass gives ``s . grad l_i`` for every ``i``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn
from torch.func import grad, jvp

from hypergrad._compat import quiet_forward_ad
from hypergrad.baselines.simple import (
    FunctionalLoss,
    directional_derivatives,
    row_blocks,
    summed_gradient,
)
from hypergrad.step import LossFn

MatVec = Callable[[Tensor], Tensor]


def hessian_vector_product(
    loss: FunctionalLoss,
    inputs: Tensor,
    targets: Tensor,
    vector: Tensor,
    *,
    weight_decay: float = 0.0,
    batch_size: int = 512,
) -> Tensor:
    """``H v`` for the mean loss over the rows plus ``(wd / 2) ||theta||^2``.

    Forward-over-reverse: ``jvp`` of ``grad`` along ``v``, summed over blocks.
    """
    quiet_forward_ad()
    theta, n = loss.theta, inputs.shape[0]

    block_gradient = grad(lambda t, x, y: loss.losses(t, x, y).sum())

    out = weight_decay * vector
    for x, y in row_blocks(inputs, targets, batch_size):
        _, hv = jvp(partial(block_gradient, x=x, y=y), (theta,), (vector,))
        out = out + hv.detach() / n
    return out


def conjugate_gradient(
    matvec: MatVec, b: Tensor, *, tol: float = 1e-10, max_iter: int | None = None
) -> tuple[Tensor, dict]:
    """Solves ``A x = b`` for a symmetric positive definite ``A``.

    Args:
        matvec: ``v -> A v``.
        b: ``(P,)`` the right-hand side.
        tol: Stop when ``||b - A x|| <= tol ||b||``.
        max_iter: At most this many products (default ``P``, in exact
            arithmetic enough).

    Returns:
        ``(x, info)``, info with ``iterations``, ``relative_residual`` and
        ``converged``.

    Raises:
        ValueError: If ``A`` has a direction of non-positive curvature.
    """
    max_iter = b.numel() if max_iter is None else max_iter
    x = torch.zeros_like(b)
    r, norm_b = b.clone(), float(b.norm())
    if norm_b == 0.0:
        return x, {"iterations": 0, "relative_residual": 0.0, "converged": True}
    p, rs = r.clone(), r.dot(r)
    done = 0
    while done < max_iter:
        done += 1
        ap = matvec(p)
        curvature = p.dot(ap)
        if not curvature > 0:
            raise ValueError(
                f"conjugate_gradient: the matrix has non-positive curvature "
                f"{float(curvature):.3g} along a search direction, so it is not "
                "positive definite. Raise the damping."
            )
        alpha = rs / curvature
        x, r = x + alpha * p, r - alpha * ap
        rs_new = r.dot(r)
        if float(rs_new.sqrt()) <= tol * norm_b:
            rs = rs_new
            break
        p, rs = r + (rs_new / rs) * p, rs_new
    residual = float(rs.sqrt()) / norm_b
    return x, {
        "iterations": done,
        "relative_residual": residual,
        "converged": residual <= tol,
    }


def lissa(
    matvec_at: Callable[[Tensor, int], Tensor],
    b: Tensor,
    *,
    damping: float,
    scale: float,
    depth: int,
    repeats: int = 1,
) -> tuple[Tensor, dict]:
    """LiSSA (Agarwal et al. 2017): ``(H + damping I)^{-1} b`` by a series.

    With ``H_j`` the Hessian estimate of iteration ``j`` (a mini-batch)::

        h_0 = b
        h_j = b + h_{j-1} - (H_j h_{j-1} + damping h_{j-1}) / scale
        x   = h_depth / scale                      (mean over repeats)

    Its fixed point is exactly ``(H + damping I)^{-1} b``; it converges when
    the eigenvalues of ``(H_j + damping I) / scale`` lie in (0, 2). Koh &
    Liang's code writes ``h = b + (1 - d) h - H h / s``, which is this with
    ``damping = s * d``.

    Args:
        matvec_at: ``(v, j) -> H_j v``.
        b: ``(P,)`` the right-hand side.
        damping, scale: As above; ``scale > 0``.
        depth: Terms of the series per repeat.
        repeats: Independent series averaged.

    Returns:
        ``(x, info)``, info with ``last_relative_change`` (of the last term)
        and ``growth``, the norm of the last term over that of the middle
        one: about 1 when the series converged, far above 1 when a
        direction of negative curvature deeper than ``-damping`` dominates.

    Raises:
        ValueError: If the series stops being finite (raise ``scale``).
    """
    if scale <= 0 or depth < 1 or repeats < 1:
        raise ValueError(
            f"lissa: expected scale > 0, depth >= 1 and repeats >= 1, got "
            f"{scale!r}, {depth!r}, {repeats!r}."
        )
    estimates, change, middle = [], float("nan"), 1.0
    for r in range(repeats):
        h = b.clone()
        for j in range(depth):
            new = b + h - (matvec_at(h, r * depth + j) + damping * h) / scale
            change = float((new - h).norm() / new.norm().clamp_min(1e-30))
            h = new
            if j == depth // 2:
                middle = float(h.norm())
            if not bool(torch.isfinite(h).all()):
                raise ValueError(
                    f"lissa: the series diverged at term {j} of repeat {r} "
                    f"(scale {scale:.3g}); raise the scale or the damping."
                )
        estimates.append(h / scale)
    x = torch.stack(estimates).mean(0)
    growth = float(h.norm()) / max(middle, 1e-30)
    return x, {
        "last_relative_change": change,
        "growth": growth,
        "scale": scale,
        "depth": depth,
    }


def top_eigenvalue(
    matvec: MatVec, like: Tensor, *, iters: int = 20, seed: int = 0
) -> float:
    """Largest-magnitude eigenvalue of a symmetric matrix, by power iteration.

    Args:
        matvec: ``v -> A v``.
        like: A vector with the shape and dtype that ``matvec`` takes.
        iters: Products taken.
        seed: Of the random start.
    """
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(like.shape, generator=g, dtype=torch.float64).to(like)
    value = 0.0
    for _ in range(iters):
        v = v / v.norm()
        w = matvec(v)
        value, v = float(v.dot(w)), w
    return value


def last_linear_features(
    model: nn.Module, inputs: Tensor, *, batch_size: int = 512
) -> tuple[str, nn.Linear, Tensor]:
    """The final ``nn.Linear`` of a network and its inputs on ``inputs``.

    The layer must produce the network's output itself (eval mode), so that
    the loss of the network in that layer's weights is the loss of the layer
    alone on these features.

    Returns:
        ``(name, head, features)``: the layer's module name, a copy of it,
        and its inputs ``(n, in_features)``.

    Raises:
        ValueError: If no ``nn.Linear`` produces the network's output.
    """
    net = copy.deepcopy(model).eval()
    names = {m: n for n, m in net.named_modules()}
    calls = []
    hooks = [
        m.register_forward_hook(lambda mod, args, out: calls.append((mod, args, out)))
        for m in net.modules()
        if isinstance(m, nn.Linear)
    ]
    features, head = [], None
    try:
        with torch.no_grad():
            for start in range(0, inputs.shape[0], batch_size):
                calls.clear()
                out = net(inputs[start : start + batch_size])
                if not calls or not torch.equal(calls[-1][2], out):
                    raise ValueError(
                        "influence on the last layer: the network's output is "
                        "not the output of an nn.Linear layer. Use the "
                        "all-parameter solver (method='lissa') instead."
                    )
                head = calls[-1][0]
                features.append(calls[-1][1][0].detach())
    finally:
        for hook in hooks:
            hook.remove()
    return names[head], copy.deepcopy(head), torch.cat(features)


def influence_scores(
    model: nn.Module,
    loss_fn: LossFn,
    train: tuple[Tensor, Tensor],
    reference: tuple[Tensor, Tensor],
    *,
    method: str = "cg",
    damping: float = 0.01,
    weight_decay: float = 0.0,
    tol: float = 1e-10,
    max_iter: int | None = None,
    depth: int = 1000,
    repeats: int = 1,
    scale: float | None = None,
    lissa_batch_size: int = 128,
    batch_size: int = 512,
    seed: int = 0,
) -> tuple[Tensor, dict]:
    """``(N,)`` influence of each training sample on a reference set.

    Args:
        model: The trained network.
        loss_fn: ``loss_fn(outputs, targets) -> (B,)``.
        train: ``(inputs, targets)`` of the N training samples (the Hessian's
            data, and the samples scored).
        reference: ``(inputs, targets)`` of the set whose loss is explained.
        method: ``"cg"``: the last layer only, in float64, by conjugate
            gradients on the full training Hessian (convex for cross-entropy).
            ``"lissa"``: every parameter, by LiSSA on mini-batch Hessians.
        damping: Added to the Hessian's diagonal.
        weight_decay: The L2 coefficient of the training objective.
        tol, max_iter: Of conjugate gradients.
        depth, repeats, lissa_batch_size: Of LiSSA.
        scale: Of LiSSA; default twice the largest top eigenvalue (power
            iteration) of three mini-batch Hessians, plus the damping.
        batch_size: Rows per block for gradients and products.
        seed: Of LiSSA's mini-batches and the power iteration.

    Returns:
        ``(scores, info)``: the scores (HYDRA's sign: positive helps) and
        the solver's report.
    """
    if method not in ("cg", "lissa"):
        raise ValueError(
            f"influence_scores: expected method 'cg' or 'lissa', got {method!r}."
        )
    if damping < 0 or weight_decay < 0:
        raise ValueError(
            f"influence_scores: expected damping >= 0 and weight_decay >= 0, got "
            f"{damping!r} and {weight_decay!r}."
        )
    (train_x, train_y), (ref_x, ref_y) = train, reference
    if method == "cg":
        _, head, train_x = last_linear_features(model, train_x, batch_size=batch_size)
        _, _, ref_x = last_linear_features(model, ref_x, batch_size=batch_size)
        loss = FunctionalLoss(head.double(), loss_fn)
        train_x, ref_x = train_x.double(), ref_x.double()
    else:
        loss = FunctionalLoss(model, loss_fn)
    g_ref = summed_gradient(loss, ref_x, ref_y, batch_size=batch_size)

    def full(v):
        return hessian_vector_product(
            loss,
            train_x,
            train_y,
            v,
            weight_decay=weight_decay,
            batch_size=batch_size,
        )

    if method == "cg":
        s, info = conjugate_gradient(
            lambda v: full(v) + damping * v, g_ref, tol=tol, max_iter=max_iter
        )
    else:
        s, info = _lissa_solve(
            loss,
            train_x,
            train_y,
            g_ref,
            damping=damping,
            weight_decay=weight_decay,
            scale=scale,
            depth=depth,
            repeats=repeats,
            batch_size=lissa_batch_size,
            seed=seed,
        )
    scores = directional_derivatives(loss, train_x, train_y, s, batch_size=batch_size)
    info = {"method": method, "num_params": loss.num_params, **info}
    return scores.float(), info


def _lissa_solve(
    loss: FunctionalLoss,
    train_x: Tensor,
    train_y: Tensor,
    b: Tensor,
    *,
    damping: float,
    weight_decay: float,
    scale: float | None,
    depth: int,
    repeats: int,
    batch_size: int,
    seed: int,
) -> tuple[Tensor, dict]:
    """LiSSA on mini-batch Hessians of the training objective."""
    n = train_x.shape[0]
    g = torch.Generator().manual_seed(seed)
    if scale is None:
        # Mini-batch Hessians peak higher than the full one: probe a few.
        tops = []
        for _ in range(3):
            rows = torch.randperm(n, generator=g)[:batch_size]
            tops.append(
                top_eigenvalue(
                    partial(
                        hessian_vector_product,
                        loss,
                        train_x[rows],
                        train_y[rows],
                        weight_decay=weight_decay,
                    ),
                    b,
                    seed=seed,
                )
            )
        scale = 2.0 * (max(abs(t) for t in tops) + damping)

    def matvec_at(v, j):
        # A fresh batch without replacement: the whole set when batch_size >= n.
        rows = torch.randperm(n, generator=g)[:batch_size]
        return hessian_vector_product(
            loss, train_x[rows], train_y[rows], v, weight_decay=weight_decay
        )

    return lissa(
        matvec_at, b, damping=damping, scale=scale, depth=depth, repeats=repeats
    )
